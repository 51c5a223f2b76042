"""The conversation window: which past turns a stateless chat API gets to see on each request.

An OpenAI-style server remembers nothing between requests; the client re-sends the conversation every
time. Sending all of it soon overflows a small model's context, so the client sends a *window*:

* the system prompt, pinned (it never falls out of the window);
* the last ``max_pairs`` whole question/answer pairs (a pair is never split: the tool calls the model made on
  the way to its answer and their results travel with it);
* the current question.

With a token budget, the oldest pairs are dropped first until the window fits. If the system prompt and the
question alone do not fit, nothing can be sent and :class:`PromptTooLongError` says so.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minimind_course.tool_format import render_assistant

Message = dict[str, Any]  # an OpenAI chat message: content may be None next to tool_calls
TokenCounter = Callable[[list[Message]], int]

# Estimate, measured on the bundled tokenizer: tokens the chat template adds around each message
# (`<|im_start|>role\n ... <|im_end|>\n`, the role name split into pieces) and for the generation prompt
# that opens the answer (`<|im_start|>assistant\n`).
MESSAGE_OVERHEAD_TOKENS = 7
GENERATION_PROMPT_TOKENS = 5
# Estimate: characters per token for text that is not CJK. Ordinary English runs at 4-4.5 characters per token
# with the bundled tokenizer (and MiniMind2's), so 3 errs high; rare names split finer and can exceed it.
CHARS_PER_TOKEN = 3


class PromptTooLongError(ValueError):
    """The system prompt plus the current question alone exceed the token budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"The system prompt and the question need {needed} tokens, more than the budget of {budget}; "
            "shorten the question or raise the budget."
        )
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class QAPair:
    """One finished exchange: the user's question, the tool round trips on the way (assistant messages with
    ``tool_calls`` and the ``tool`` results), and the assistant's answer."""

    question: str
    answer: str
    steps: tuple[Message, ...] = ()

    def messages(self) -> list[Message]:
        """The pair as chat messages: user first, then the tool steps, then the answer."""
        return [{"role": "user", "content": self.question}, *self.steps, {"role": "assistant", "content": self.answer}]


def is_cjk(char: str) -> bool:
    """True for Chinese/Japanese/Korean characters and full-width punctuation (one token each, roughly)."""
    code = ord(char)
    return (
        0x3000 <= code <= 0x9FFF  # CJK punctuation, kana, CJK unified ideographs (and extension A)
        or 0xAC00 <= code <= 0xD7AF  # Hangul syllables
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF00 <= code <= 0xFFEF  # full-width forms ("，", "？")
        or 0x20000 <= code <= 0x3FFFF  # CJK extensions B and later
        or (unicodedata.east_asian_width(char) == "W" and unicodedata.category(char).startswith("L"))
    )


def estimate_text_tokens(text: str) -> int:
    """Estimate the tokens of ``text``: one per CJK character, one per 3 other characters (rounded up)."""
    cjk = sum(1 for char in text if is_cjk(char))
    return cjk + math.ceil((len(text) - cjk) / CHARS_PER_TOKEN)


def message_text(message: Message) -> str:
    """What a template writes for a message: its content and, for tool calls, each call's name and arguments."""
    calls = [(call["function"]["name"], call["function"]["arguments"]) for call in message.get("tool_calls") or []]
    return render_assistant(message.get("content") or "", calls)


def estimate_tokens(messages: list[Message]) -> int:
    """Estimate the prompt tokens of ``messages`` as a ChatML template renders them (no tokenizer needed)."""
    return GENERATION_PROMPT_TOKENS + sum(
        MESSAGE_OVERHEAD_TOKENS + estimate_text_tokens(message_text(message)) for message in messages
    )


def tokenizer_counter(tokenizer: Any) -> TokenCounter:
    """Count exactly with a local tokenizer: the tokens of the rendered chat template with generation prompt."""

    def count(messages: list[Message]) -> int:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer.encode(prompt, add_special_tokens=False))  # the template already placed them

    return count


def build_window(
    question: str,
    pairs: Sequence[QAPair],
    *,
    system: str | None = None,
    max_pairs: int | None = None,
    max_tokens: int | None = None,
    count_tokens: TokenCounter = estimate_tokens,
) -> list[Message]:
    """The messages to send: pinned system prompt, the last whole pairs that fit, then the question.

    ``max_pairs`` None keeps every pair, 0 keeps none. ``max_tokens`` None means no budget; otherwise the
    oldest pairs are dropped until ``count_tokens(window) <= max_tokens``.
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    tail: list[Message] = [{"role": "user", "content": question}]
    if max_pairs is None:
        kept = list(pairs)
    elif max_pairs == 0:
        kept = []  # not pairs[-0:], which is the whole list
    else:
        kept = list(pairs)[-max_pairs:]

    def assemble(chosen: Sequence[QAPair]) -> list[Message]:
        return head + [message for pair in chosen for message in pair.messages()] + tail

    if max_tokens is None:
        return assemble(kept)
    minimum = count_tokens(assemble([]))
    if minimum > max_tokens:
        raise PromptTooLongError(minimum, max_tokens)
    # Dropping the oldest pairs until the rest fits keeps the longest run of newest pairs that fits. Grow that
    # run from the newest pair backwards, so a long conversation is never counted (or tokenized) whole.
    fits = 0
    while fits < len(kept) and count_tokens(assemble(kept[len(kept) - fits - 1 :])) <= max_tokens:
        fits += 1
    return assemble(kept[len(kept) - fits :])


def upstream_window(history: list[Message], n: int) -> list[Message]:
    """Upstream's client, for contrast: ``history[-n:]`` over messages that already end with the question.

    With n=2 it sends [previous answer, current question], losing the previous question; with n=0 it sends
    everything, because ``-0 == 0``.
    """
    return history[-n:]


def pairs_to_messages(pairs: Sequence[QAPair], system: str | None = None) -> list[Message]:
    """The whole conversation as OpenAI chat messages (system first when there is one)."""
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    return head + [message for pair in pairs for message in pair.messages()]


def _is_tool_step(message: Message) -> bool:
    return message.get("role") == "tool" or (message.get("role") == "assistant" and bool(message.get("tool_calls")))


def messages_to_pairs(messages: Sequence[Message]) -> tuple[str | None, list[QAPair]]:
    """Split OpenAI chat messages into (system prompt, pairs); the inverse of :func:`pairs_to_messages`.
    Assistant messages with ``tool_calls`` and ``tool`` results between a question and its answer stay in its pair."""
    items = list(messages)
    system = None
    if items and items[0].get("role") == "system":
        system = items.pop(0)["content"]
    pairs, index = [], 0
    while index < len(items):
        user = items[index]
        end = index + 1
        while end < len(items) and _is_tool_step(items[end]):
            end += 1
        if end >= len(items):
            raise ValueError(f"expected alternating user/assistant messages in pairs: message {index} has no answer")
        assistant = items[end]
        if user.get("role") != "user" or assistant.get("role") != "assistant":
            raise ValueError(
                f"messages {index} and {end} must be user then assistant, "
                f"got {user.get('role')!r} then {assistant.get('role')!r}"
            )
        if not isinstance(user.get("content"), str) or not isinstance(assistant.get("content"), str):
            raise ValueError(f"messages {index} and {end} must have string content")
        pairs.append(QAPair(user["content"], assistant["content"], tuple(items[index + 1 : end])))
        index = end + 1
    return system, pairs
