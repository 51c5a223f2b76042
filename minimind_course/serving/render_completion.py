"""Legacy completions' wire objects: a whole ``text_completion``, or its chunks (the text of each step, the
finish reason on the last), usage when asked, ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import Iterator

from openai.types import Completion, CompletionChoice, CompletionUsage

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput
from minimind_course.serving.protocol import error_body
from minimind_course.serving.rendering import Renderer, ResponseMeta, usage
from minimind_course.serving.sse import DONE, sse


class CompletionRenderer(Renderer):
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

    def end(self, last: StepOutput | None) -> Iterator[str]:
        if self.include_usage and last is not None:
            yield self.chunk([], usage(last.prompt_tokens, last.completion_tokens))
        yield DONE

    def failure(self, message: str) -> Iterator[str]:
        yield sse(json.dumps(error_body(500, message)))
        yield DONE
