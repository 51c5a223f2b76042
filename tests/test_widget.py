"""The notebook chat widget, driven the way a click drives it, against the running server."""

import html

from minimind_course.client import ChatSession
from minimind_course.client.widget import ChatWidget
from minimind_course.launch import free_port

EN_NAME = "Dmitri"


def test_click_send_streams_answer_and_updates_history(base_url):
    session = ChatSession(base_url, temperature=0, max_tokens=48, max_pairs=None)
    chat = ChatWidget(session, max_history=4)
    assert session.max_pairs == 4 and chat.history_slider.value == 4
    assert "no history yet" in chat.history_view.value

    chat.input.value = f"My name is {EN_NAME}."
    chat.send_button.click()
    chat.input.value = "What is my name?"
    chat.send_button.click()

    assert chat.input.value == ""
    assert [pair.question for pair in session.pairs] == [f"My name is {EN_NAME}.", "What is my name?"]
    assert "What is my name?" in chat.history_view.value and "2 of 2 pairs" in chat.history_view.value
    answer = session.pairs[-1].answer
    assert answer and html.escape(answer) in chat.answer_view.value  # the streamed text, escaped for HTML
    assert EN_NAME in answer
    assert "prompt" in chat.status.value and "completion tokens" in chat.status.value


def test_slider_sets_the_window_and_reset_clears(base_url):
    session = ChatSession(base_url, temperature=0, max_tokens=16)
    chat = ChatWidget(session)
    chat.send("我叫王思远。")
    chat.history_slider.value = 0
    assert session.max_pairs == 0 and "0 of 1 pairs" in chat.history_view.value
    assert chat.send("我叫什么名字？").sent == [{"role": "user", "content": "我叫什么名字？"}]
    chat.reset_button.click()
    assert session.pairs == [] and "no history yet" in chat.history_view.value and chat.answer_view.value == ""


def test_errors_show_in_the_status_line():
    chat = ChatWidget(ChatSession(f"http://127.0.0.1:{free_port()}/v1", max_retries=0))
    chat.input.value = "hello"
    chat.send_button.click()
    assert "error" in chat.status.value and chat.session.pairs == []
    assert not chat.send_button.disabled
