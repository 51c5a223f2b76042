"""The output processor: a sampled token becomes text (UTF-8 safe), stop strings are cut, finish reasons set.

Per choice it feeds the token to the choice's ``IncrementalDetokenizer`` and ``StopStringMatcher`` and decides
whether the choice ends: end-of-sequence ("stop", unless ``ignore_eos``), a stop string ("stop"), a finished
constraint ("stop") or ``max_tokens`` ("length").
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from minimind_course.engine.detokenize import IncrementalDetokenizer
from minimind_course.engine.outputs import ChoiceDelta, TokenLogprob
from minimind_course.engine.sampling import SamplingParams
from minimind_course.engine.sequence import Sequence
from minimind_course.engine.stop_strings import StopStringMatcher


def eos_token_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


class OutputProcessor:
    """Turns each choice's new token into its text delta and finish reason."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def text_state(self, params: SamplingParams) -> tuple[IncrementalDetokenizer, StopStringMatcher]:
        """A fresh detokenizer and stop-string matcher for one choice."""
        return IncrementalDetokenizer(self.tokenizer), StopStringMatcher(params.stop)

    def process(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> ChoiceDelta | None:
        """The delta for ``token`` (already appended to ``seq``); sets ``seq.finish_reason`` when it ends."""
        params = seq.request.params
        text, reason = self._advance(token, seq.detokenizer, seq.matcher, seq.num_generated, params)
        if reason is None and seq.constraint is not None and seq.constraint.done():
            text += seq.matcher.push(seq.detokenizer.flush()) + seq.matcher.flush()
            reason = "stop"
        seq.finish_reason = reason
        if text or reason or logprob:
            stop_string = seq.matcher.matched if reason == "stop" else None
            return ChoiceDelta(seq.index, text, reason, (logprob,) if logprob else (), stop_string)
        return None

    def _advance(
        self, token: int, detok: IncrementalDetokenizer, matcher: StopStringMatcher, count: int, params: SamplingParams
    ) -> tuple[str, str | None]:
        """Text this token releases for one choice, and its finish reason if the choice just ended."""
        if token in self.eos_ids and not params.ignore_eos:
            return matcher.push(detok.flush()) + matcher.flush(), "stop"
        text = matcher.push(detok.push(token))
        if matcher.stopped:
            return text, "stop"
        if count >= params.max_tokens:
            text += matcher.push(detok.flush())
            return text + matcher.flush(), "stop" if matcher.stopped else "length"
        return text, None
