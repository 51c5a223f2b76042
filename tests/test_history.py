"""The history window: whole pairs, pinned system prompt, token budget, and upstream's slice bug."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimind_course.client.history import (
    PromptTooLongError,
    QAPair,
    build_window,
    estimate_text_tokens,
    estimate_tokens,
    messages_to_pairs,
    pairs_to_messages,
    tokenizer_counter,
    upstream_window,
)

PAIRS = [QAPair(f"question {i}", f"answer {i}") for i in range(1, 6)]


def contents(messages):
    return [m["content"] for m in messages]


def test_last_n_whole_pairs_then_question():
    window = build_window("now?", PAIRS, max_pairs=2)
    assert contents(window) == ["question 4", "answer 4", "question 5", "answer 5", "now?"]
    assert [m["role"] for m in window] == ["user", "assistant", "user", "assistant", "user"]


def test_one_pair_keeps_the_previous_question():
    window = build_window("What is my name?", [QAPair("My name is Ada.", "Nice to meet you, Ada.")], max_pairs=1)
    assert contents(window) == ["My name is Ada.", "Nice to meet you, Ada.", "What is my name?"]


def test_system_prompt_is_pinned_first():
    window = build_window("now?", PAIRS, system="Be brief.", max_pairs=1)
    assert window[0] == {"role": "system", "content": "Be brief."}
    assert contents(window)[1:] == ["question 5", "answer 5", "now?"]


def test_zero_pairs_sends_only_system_and_question():
    assert build_window("now?", PAIRS, system="S", max_pairs=0) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "now?"},
    ]


def test_none_keeps_every_pair_and_more_than_available_is_fine():
    assert len(build_window("now?", PAIRS, max_pairs=None)) == 11
    assert build_window("now?", PAIRS, max_pairs=50) == build_window("now?", PAIRS)


def test_empty_history():
    assert build_window("hello", [], system="S", max_pairs=3, max_tokens=1000) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hello"},
    ]


def test_negative_max_pairs_is_rejected():
    with pytest.raises(ValueError, match="max_pairs"):
        build_window("q", PAIRS, max_pairs=-1)


def test_budget_drops_oldest_pairs_first_and_is_respected():
    full = build_window("now?", PAIRS, system="S")
    budget = estimate_tokens(full) - 1  # one token short of everything: the oldest pair must go
    window = build_window("now?", PAIRS, system="S", max_tokens=budget)
    assert estimate_tokens(window) <= budget
    assert contents(window) == contents(full)[:1] + contents(full)[3:]


def test_budget_just_enough_for_system_and_question():
    minimal = build_window("now?", [], system="S")
    window = build_window("now?", PAIRS, system="S", max_tokens=estimate_tokens(minimal))
    assert window == minimal


def test_budget_applies_after_max_pairs():
    window = build_window("now?", PAIRS, max_pairs=2, max_tokens=10_000)
    assert contents(window) == ["question 4", "answer 4", "question 5", "answer 5", "now?"]


def test_single_message_larger_than_budget_is_a_clear_error():
    with pytest.raises(PromptTooLongError, match=r"need \d+ tokens, more than the budget of 20") as info:
        build_window("x" * 300, PAIRS, system="S", max_tokens=20)
    assert info.value.budget == 20
    assert info.value.needed > 20
    assert isinstance(info.value, ValueError)


def test_system_prompt_counts_against_the_budget():
    with pytest.raises(PromptTooLongError):
        build_window("hi", [], system="a long system prompt " * 20, max_tokens=30)


def test_chinese_characters_count_one_token_each():
    assert estimate_text_tokens("我叫什么名字？") == 7
    assert estimate_text_tokens("abcdef") == 2
    assert estimate_text_tokens("我叫Ada。") == 3 + 1  # 我, 叫, 。 + ceil(3 / 3)
    assert estimate_tokens([{"role": "user", "content": "我叫"}]) == 5 + 7 + 2  # generation prompt, markers, text


def test_chinese_budget_keeps_recent_pairs():
    pairs = [QAPair("我叫小明。", "你好，小明。"), QAPair("今天天气怎么样？", "今天天气很好。")]
    window = build_window("我叫什么名字？", pairs, max_tokens=estimate_tokens(build_window("我叫什么名字？", pairs)) - 1)
    assert contents(window) == ["今天天气怎么样？", "今天天气很好。", "我叫什么名字？"]


def test_exact_counter_from_a_tokenizer():
    class CharTokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return list(text)

    count = tokenizer_counter(CharTokenizer())
    assert count([{"role": "user", "content": "我叫"}]) == len("<user>我叫<assistant>")
    window = build_window("q", [QAPair("aaaa", "bbbb")], max_tokens=len("<user>q<assistant>"), count_tokens=count)
    assert contents(window) == ["q"]


def test_upstream_slice_loses_the_previous_question():
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert contents(upstream_window(history, 2)) == ["Nice to meet you, Ada.", "What is my name?"]
    assert upstream_window(history, 0) == history  # history[-0:] is everything, not nothing
    fixed = build_window("What is my name?", [QAPair("My name is Ada.", "Nice to meet you, Ada.")], max_pairs=1)
    assert contents(fixed) == ["My name is Ada.", "Nice to meet you, Ada.", "What is my name?"]


def test_messages_round_trip_and_validation():
    messages = pairs_to_messages(PAIRS[:2], system="S")
    assert messages_to_pairs(messages) == ("S", PAIRS[:2])
    assert messages_to_pairs([]) == (None, [])
    with pytest.raises(ValueError, match="alternating"):
        messages_to_pairs(messages[:-1])
    with pytest.raises(ValueError, match="user then assistant"):
        messages_to_pairs([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])


text = st.text(min_size=1, max_size=40)


@given(
    pairs=st.lists(st.builds(QAPair, text, text), max_size=8),
    question=text,
    max_pairs=st.one_of(st.none(), st.integers(0, 10)),
    slack=st.integers(0, 200),
)
def test_window_invariants(pairs, question, max_pairs, slack):
    budget = estimate_tokens(build_window(question, [], system="S")) + slack
    window = build_window(question, pairs, system="S", max_pairs=max_pairs, max_tokens=budget)
    assert window[0] == {"role": "system", "content": "S"}
    assert window[-1] == {"role": "user", "content": question}
    assert estimate_tokens(window) <= budget
    _, kept = messages_to_pairs(window[:-1])
    assert kept == pairs[len(pairs) - len(kept) :]  # a suffix of whole pairs
    assert max_pairs is None or len(kept) <= max_pairs
    allowed = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    if len(kept) < allowed:  # the budget stopped it: one more pair would not have fit
        one_more = build_window(question, pairs[len(pairs) - len(kept) - 1 :], system="S")
        assert estimate_tokens(one_more) > budget
