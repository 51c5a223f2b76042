"""Legacy completions' wire objects: a whole ``text_completion``, or its chunks (the text of each step, the
finish reason on the last), usage when asked, ``[DONE]``."""

from __future__ import annotations

from collections.abc import Iterator

from openai.types import Completion, CompletionChoice, CompletionUsage

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput
from minimind_course.serving.rendering import ChunkRenderer, ResponseMeta, usage
from minimind_course.serving.sse import sse


class CompletionRenderer(ChunkRenderer):
    """Engine output as ``/v1/completions`` objects."""

    def __init__(self, meta: ResponseMeta, include_usage: bool = False):
        self.meta, self.include_usage = meta, include_usage

    def response(self, result: GenerationResult) -> Completion:
        choices = [CompletionChoice(index=i, text=text, logprobs=None, finish_reason=reason)
                   for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        return Completion(id=self.meta.id, object="text_completion", created=self.meta.created,
                          model=self.meta.model, choices=choices,
                          usage=usage(result.prompt_tokens, result.completion_tokens))

    def chunk(self, choices: list[CompletionChoice], usage_: CompletionUsage | None = None) -> str:
        chunk = Completion(id=self.meta.id, object="text_completion", created=self.meta.created,
                           model=self.meta.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage_
        return sse(chunk.model_dump_json(exclude_unset=True))

    def step(self, out: EngineDelta) -> Iterator[str]:
        yield self.chunk([CompletionChoice.model_construct(index=out.index, text=out.text, logprobs=None,
                                                           finish_reason=out.finish_reason)])
