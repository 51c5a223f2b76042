"""ChatSession: the wire handling (canned SSE through httpx.MockTransport) and memory against the running server."""

import json

import httpx
import openai
import pytest

from minimind_course.client import ChatSession, Delta
from minimind_course.client.history import PromptTooLongError, QAPair, tokenizer_counter

EN_NAME, ZH_NAME = "Dmitri", "王思远"  # held-out names (never in training); eval_tiny measures the recall rate
GREEDY = {"temperature": 0, "max_tokens": 48}


# ---------------------------------------------------------------- wire handling, no model needed


def sse_body(*events) -> bytes:
    lines = [f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode("utf-8")


def chunk(delta=None, finish_reason=None, choices=True, usage=None):
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "minimind"}
    base["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}] if choices else []
    if usage:
        base["usage"] = usage
    return base


def canned_session(body: bytes, requests: list, **kwargs) -> ChatSession:
    """A session whose HTTP traffic goes to a handler that records requests and returns ``body`` as SSE."""

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(
        base_url="http://test/v1", api_key="k", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    return ChatSession(client=client, **kwargs)


USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
THINKING_STREAM = sse_body(
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user "}),
    chunk({"reasoning": "asks."}),  # newer vLLM's field name
    chunk({"content": "你好"}),
    chunk({"content": "！"}),
    chunk(finish_reason="stop"),
    chunk(choices=False, usage=USAGE),
)


def test_stream_passes_reasoning_and_content_separately_and_skips_the_usage_chunk():
    requests = []
    session = canned_session(THINKING_STREAM, requests)
    deltas = list(session.stream("hi"))
    assert deltas == [Delta("", "The user "), Delta("", "asks."), Delta("你好"), Delta("！")]
    reply = session.last_reply
    assert (reply.content, reply.reasoning_content, reply.finish_reason) == ("你好！", "The user asks.", "stop")
    assert reply.usage.total_tokens == 15
    assert session.pairs == [QAPair("hi", "你好！")]  # reasoning is not sent back next time
    assert requests[0]["stream"] is True
    assert requests[0]["stream_options"] == {"include_usage": True}


def test_callback_gets_every_delta_and_options_reach_the_request():
    requests, seen = [], []
    session = canned_session(THINKING_STREAM, requests, system="Be kind.", temperature=0, max_tokens=9)
    reply = session.ask("hi", on_delta=seen.append)
    assert "".join(d.content for d in seen) == reply.content == "你好！"
    assert requests[0]["temperature"] == 0 and requests[0]["max_tokens"] == 9
    assert requests[0]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]


def test_abandoned_stream_is_not_recorded():
    session = canned_session(THINKING_STREAM, [])
    for delta in session.stream("hi"):
        if delta.content:
            break
    assert session.pairs == [] and session.last_reply is None


def test_stream_without_usage_still_works():
    session = canned_session(sse_body(chunk({"content": "ok"}), chunk(finish_reason="length")), [])
    reply = session.ask("hi")
    assert (reply.content, reply.finish_reason, reply.usage) == ("ok", "length", None)
    assert session.total_usage.total_tokens == 0


def test_over_budget_question_fails_before_any_request():
    requests = []
    session = canned_session(THINKING_STREAM, requests, max_history_tokens=10)
    with pytest.raises(PromptTooLongError):
        session.ask("a question far too long for a budget of ten tokens")
    assert requests == [] and session.pairs == []


def test_load_rejects_a_file_that_is_not_pairs(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"role": "user", "content": "only a question"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="alternating"):
        ChatSession().load(path)
    path.write_text(json.dumps({"messages": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list"):
        ChatSession().load(path)


# ---------------------------------------------------------------- against the running server


def session_for(base_url, **kwargs) -> ChatSession:
    return ChatSession(base_url, **GREEDY, **kwargs)


@pytest.mark.parametrize(
    ("intro", "question", "name"),
    [(f"My name is {EN_NAME}.", "What is my name?", EN_NAME), (f"我叫{ZH_NAME}。", "我叫什么名字？", ZH_NAME)],
)
def test_memory_comes_from_the_history_the_client_sends(base_url, intro, question, name):
    with_history = session_for(base_url, max_pairs=1)
    with_history.ask(intro)
    recalled = with_history.ask(question)
    assert recalled.sent[0] == {"role": "user", "content": intro}
    assert name in recalled.content

    without = session_for(base_url, max_pairs=0)
    without.ask(intro)
    forgot = without.ask(question)
    assert forgot.sent == [{"role": "user", "content": question}]
    assert name not in forgot.content
    assert "know" in forgot.content or "不知道" in forgot.content


def test_usage_is_recorded_and_prompt_tokens_match_the_local_tokenizer(base_url, engine):
    session = session_for(base_url)
    first = session.ask("My name is Ada.")
    second = session.ask("What is my name?", stream=False)
    for reply in (first, second):
        assert reply.usage.prompt_tokens == tokenizer_counter(engine.tokenizer)(reply.sent)
        assert reply.usage.completion_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert session.total_usage.total_tokens == first.usage.total_tokens + second.usage.total_tokens


def test_streamed_and_whole_answers_agree(base_url):
    deltas = []
    streamed = session_for(base_url).ask("我叫什么名字？", on_delta=deltas.append)
    whole = session_for(base_url).ask("我叫什么名字？", stream=False)
    assert len(deltas) > 1
    assert "".join(d.content for d in deltas) == streamed.content == whole.content
    assert streamed.finish_reason == whole.finish_reason


def test_save_load_round_trip_keeps_chinese_and_memory(base_url, tmp_path):
    session = session_for(base_url, max_pairs=1, system="你是一个乐于助人的助手。")
    session.ask(f"我叫{ZH_NAME}。")
    path = tmp_path / "chat.json"
    session.save(path)
    text = path.read_text(encoding="utf-8")
    assert ZH_NAME in text and "\\u" not in text

    restored = session_for(base_url, max_pairs=1)
    restored.load(path)
    assert restored.system == session.system and restored.pairs == session.pairs
    assert restored.messages == json.loads(text)
    assert ZH_NAME in restored.ask("我叫什么名字？").content


def test_reset_forgets(base_url):
    session = session_for(base_url, max_pairs=1)
    session.ask(f"My name is {EN_NAME}.")
    session.reset()
    reply = session.ask("What is my name?")
    assert reply.sent == [{"role": "user", "content": "What is my name?"}]
    assert EN_NAME not in reply.content


def test_server_errors_surface_and_leave_history_alone(base_url):
    session = ChatSession(base_url, model="no-such-model", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        session.ask("hi")
    assert session.pairs == []
