"""Chat completions' wire objects: a whole ``chat.completion``, or ``chat.completion.chunk`` events.

``<think>`` is split into ``reasoning_content``, ``<tool_call>`` blocks into ``tool_calls``; the stream sends a
role chunk per choice, text deltas (with logprobs), tool-call deltas (the first of each call with index, id, type
and name, then its arguments under the same index), a finish chunk per choice, usage when asked, ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Iterator

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkChoiceLogprobs

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput
from minimind_course.serving.rendering import AnswerParser, ChunkRenderer, ResponseMeta, TokenText, tool_call_message, usage
from minimind_course.serving.sse import sse


def delta_choice(index: int, delta: ChoiceDelta, finish_reason: str | None = None) -> ChunkChoice:
    """A chunk's choice with ``logprobs`` and ``finish_reason`` always present (null until the end), as OpenAI sends."""
    return ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=finish_reason)


class ChatRenderer(ChunkRenderer):
    """Engine output as chat completions (``call_finish``: see ``AnswerParser``; ``tokens``: logprobs wanted)."""

    def __init__(self, meta: ResponseMeta, n: int, thinking: bool, tokens: TokenText | None = None,
                 call_finish: str | None = None, include_usage: bool = False):
        self.meta, self.include_usage, self.n, self.tokens = meta, include_usage, n, tokens
        self.thinking, self.call_finish = thinking, call_finish
        self.parsers = [AnswerParser(thinking, call_finish) for _ in range(n)]

    def response(self, result: GenerationResult) -> ChatCompletion:
        """One message per choice, ``<think>`` split off as ``reasoning_content``, tool calls parsed into
        ``tool_calls`` (then an empty content is null, as OpenAI sends it)."""
        choices = []
        for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
            parser = AnswerParser(self.thinking, self.call_finish)
            reasoning, content, calls = parser.push(text, last=True)
            fields = {"role": "assistant", "content": content}
            if parser.thought:
                fields.update(content=content or None, reasoning_content=reasoning)
            if self.call_finish:
                fields["content"] = content or None
            if calls:
                fields["tool_calls"] = [tool_call_message(call) for call in calls]
            logprobs = ChoiceLogprobs(content=self.tokens.logprobs(result.logprobs[i])) if self.tokens else None
            choices.append(Choice(index=i, message=ChatCompletionMessage(**fields), logprobs=logprobs,
                                  finish_reason=parser.finish_reason(reason)))
        return ChatCompletion(id=self.meta.id, object="chat.completion", created=self.meta.created,
                              model=self.meta.model, choices=choices,
                              usage=usage(result.prompt_tokens, result.completion_tokens))

    def chunk(self, choices: list[ChunkChoice], usage_: CompletionUsage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.meta.id, object="chat.completion.chunk", created=self.meta.created,
                                    model=self.meta.model, choices=choices)
        if self.include_usage:  # OpenAI: with include_usage every chunk has a usage field, null but on the last
            chunk.usage = usage_
        return sse(chunk.model_dump_json(exclude_unset=True))

    def start(self) -> Iterator[str]:
        for i in range(self.n):  # with tools, content stays null until text comes (it may be calls only)
            delta = ChoiceDelta(role="assistant") if self.call_finish else ChoiceDelta(role="assistant", content="")
            yield self.chunk([delta_choice(i, delta)])

    def step(self, out: EngineDelta) -> Iterator[str]:
        parser = self.parsers[out.index]
        reasoning, content, calls = parser.push(out.text, last=bool(out.finish_reason))
        if reasoning or content or (self.tokens and out.logprobs):
            delta = ChoiceDelta(reasoning_content=reasoning) if reasoning else ChoiceDelta()
            if content or not (reasoning or self.call_finish):  # with tools an empty content stays null
                delta.content = content
            choice = delta_choice(out.index, delta)
            if self.tokens:  # the tokens of this step; their text may come in a later chunk (held back)
                choice.logprobs = ChunkChoiceLogprobs(content=self.tokens.logprobs(out.logprobs))
            yield self.chunk([choice])
        for call in calls:
            head = ChoiceDeltaToolCall(index=call.index, id=call.id, type="function",
                                       function=ChoiceDeltaToolCallFunction(name=call.name, arguments=""))
            body = ChoiceDeltaToolCall(index=call.index, function=ChoiceDeltaToolCallFunction(arguments=call.arguments))
            for part in (head, body):
                yield self.chunk([delta_choice(out.index, ChoiceDelta(tool_calls=[part]))])
        if out.finish_reason:
            yield self.chunk([delta_choice(out.index, ChoiceDelta(), parser.finish_reason(out.finish_reason))])
