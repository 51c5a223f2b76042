"""Ask two OpenAI-compatible backends the same questions: greedy answers side by side, and a concurrency probe.

Used by notebook 05 and ``tests/test_vllm.py`` to compare our FastAPI server with real vLLM serving the export.
Everything goes through the openai SDK, exactly as any client would talk to either server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai

from minimind_course.training.corpus import EN_ASK, EN_GREET, EN_INTRO, ZH_ASK, ZH_GREET, ZH_INTRO, load_jsonl

Messages = list[dict[str, str]]


def course_prompts() -> list[Messages]:
    """One English and one Chinese question per course topic and small-talk group, plus the memory demo."""
    prompts: list[Messages] = []
    for group in load_jsonl("concepts.jsonl") + load_jsonl("chat.jsonl"):
        for lang in ("en", "zh"):
            prompts.append([{"role": "user", "content": group[lang]["q"][0]}])
    for intro, greet, ask, name in ((EN_INTRO, EN_GREET, EN_ASK, "Alice"), (ZH_INTRO, ZH_GREET, ZH_ASK, "李华")):
        prompts.append([
            {"role": "user", "content": intro.format(name=name)},
            {"role": "assistant", "content": greet.format(name=name)},
            {"role": "user", "content": ask},
        ])  # fmt: skip
    return prompts


@dataclass(frozen=True)
class Answer:
    """One greedy completion: its text, why it stopped, and the token counts the server reported."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def greedy_answers(
    client: openai.OpenAI, model: str, prompts: Sequence[Messages], max_tokens: int = 96, concurrency: int = 4
) -> list[Answer]:
    """Temperature-0 answers to every prompt, in prompt order (``concurrency`` requests in flight)."""

    def ask(messages: Messages) -> Answer:
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens
        )
        choice = response.choices[0]
        usage = response.usage
        return Answer(choice.message.content or "", choice.finish_reason, usage.prompt_tokens, usage.completion_tokens)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(ask, prompts))


@dataclass(frozen=True)
class Comparison:
    """Answers of two backends to the same prompts."""

    prompts: list[Messages]
    left: list[Answer]
    right: list[Answer]

    @property
    def matches(self) -> list[bool]:
        return [a.text == b.text and a.finish_reason == b.finish_reason for a, b in zip(self.left, self.right)]

    @property
    def match_rate(self) -> float:
        """Share of prompts whose answers are identical, text and finish_reason."""
        return sum(self.matches) / len(self.matches)

    def rows(self, width: int = 60) -> list[tuple[str, str, str, str]]:
        """(question, left answer, right answer, ✓/✗) with texts cut to ``width`` characters, for a table."""

        def cut(text: str) -> str:
            text = text.replace("\n", " ")
            return text if len(text) <= width else text[: width - 1] + "…"

        return [
            (cut(p[-1]["content"]), cut(a.text), cut(b.text), "✓" if same else "✗")
            for p, a, b, same in zip(self.prompts, self.left, self.right, self.matches)
        ]


def compare_backends(
    left: openai.OpenAI,
    right: openai.OpenAI,
    model: str,
    prompts: Sequence[Messages],
    max_tokens: int = 96,
    concurrency: int = 4,
) -> Comparison:
    """Greedy answers of both backends to ``prompts``.

    ``concurrency`` 1 gives batch-independent results: batched kernels may round differently, which can flip a
    near-tie between two tokens.
    """
    return Comparison(list(prompts), greedy_answers(left, model, prompts, max_tokens, concurrency),
                      greedy_answers(right, model, prompts, max_tokens, concurrency))  # fmt: skip


@dataclass(frozen=True)
class Throughput:
    """How long ``requests`` requests with ``concurrency`` in flight took, and the tokens they produced."""

    concurrency: int
    requests: int
    seconds: float
    completion_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds


def measure_throughput(
    client: openai.OpenAI, model: str, messages: Messages, requests: int, concurrency: int, max_tokens: int = 64
) -> Throughput:
    """Send ``requests`` identical greedy requests, ``concurrency`` at a time; wall time and completion tokens.

    ``ignore_eos`` (a vLLM extra that our server honours too) makes every answer exactly ``max_tokens`` long.
    """

    def ask(_: int) -> int:
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True}
        )
        return response.usage.completion_tokens

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(ask, range(requests)))
    return Throughput(concurrency, requests, time.perf_counter() - began, tokens)
