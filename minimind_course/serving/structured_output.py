"""Grammar-constrained decoding with xgrammar: tool calls and JSON output that always parse.

The request decides a grammar, built from xgrammar's structural tags: ``tool_choice`` required or named: only
``<tool_call>`` blocks (``tool_format``) whose JSON names an offered function and follows its parameters;
``tool_choice`` auto with the lazy tool grammar (the server's default, as llama.cpp's lazy grammars and SGLang's
triggered tags): free text until the model writes ``<tool_call>``, from there the same call grammar;
``response_format`` json_object / json_schema: one JSON value of that schema. xgrammar compiles it once against
the tokenizer, and every sequence gets its own ``GrammarConstraint``: before each draw it sets the logits of tokens
that would leave the grammar to -inf, after it advances the grammar by the drawn token. JSON is generated
compactly (``", "`` and ``": "`` separators, no free whitespace), so a model cannot wander in spaces; numbers and
strings are only bounded by ``max_tokens``. After a prompt's open ``<think>`` the reasoning is free text.

Why xgrammar (``python -m minimind_course.bench.grammar_mask``: per token, one CPU thread): a median of 15-20 us on
the bundled 2,786-token vocabulary and 24-32 us on a 6,400-token MiniMind vocabulary, against 34-67 us for
llguidance (whose mean is far higher from slow first steps). A decode step takes milliseconds, so masking costs about
1 % of it. xgrammar is also vLLM's default structured-output backend and composes grammars (tags around JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import torch
import xgrammar as xgr
from xgrammar import structural_tag as st

from minimind_course.serving.internal import InternalRequest
from minimind_course.serving.reasoning import THINK_END
from minimind_course.tool_format import CALL_SEPARATOR, CALL_START, CALL_TAIL, call_head


class GrammarError(ValueError):
    """The request's schema cannot be turned into a grammar (HTTP 400 naming ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class GrammarConstraint:
    """One sequence's grammar state: ``apply`` masks a logits row, ``accept`` advances, ``done`` ends the sequence."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar does not allow next to -inf (in place, a 1-D row)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits[None, : self.vocab_size], self.bitmask.to(logits.device))
        if logits.shape[0] > self.vocab_size:  # padded logits rows: ids no tokenizer entry has are never allowed
            logits[self.vocab_size:] = float("-inf")

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} is not allowed by the grammar (the mask was not applied)")

    def done(self) -> bool:
        """True once the grammar has taken its stop token: the sequence is complete."""
        return self.matcher.is_terminated()


ConstraintFactory = Callable[[], GrammarConstraint]  # the engine calls it once per choice (n > 1: one state each)


class StructuredOutput:
    """Compiles request grammars for one tokenizer (xgrammar caches compiled grammars by their text)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def factory(self, grammar: xgr.Grammar, param: str = "response_format") -> ConstraintFactory:
        """Compile once; the returned callable makes a fresh constraint for each sequence (each of ``n`` choices).
        ``param``: the request field a grammar that cannot compile is blamed on."""
        try:
            compiled = self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as err:
            raise GrammarError(param, f"the grammar cannot be compiled: {_first_line(err)}") from None
        return lambda: GrammarConstraint(compiled, self.vocab_size)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[\d:]+\] \S+: ", "", text)  # drop xgrammar's "[time] file.cc:line: " prefix


def json_grammar(schema: dict[str, Any], param: str, strict: bool = True) -> xgr.Grammar:
    """One JSON value following ``schema``, written compactly (no free whitespace)."""
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
    except (RuntimeError, ValueError) as err:
        raise GrammarError(param, f"{param}: the schema cannot be turned into a grammar: {_first_line(err)}") from None


EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _compact_json(schema: dict[str, Any], param: str, strict: bool = True) -> st.GrammarFormat:
    """A structural-tag piece for compact JSON (xgrammar's own ``json_schema`` piece allows free whitespace)."""
    return st.GrammarFormat(grammar=str(json_grammar(schema, param, strict)))


def _call_tags(tools: list[tuple[int, dict[str, Any]]]) -> list[st.TagFormat]:
    """One tag per (index in ``tools``, OpenAI tool dict): the call's head with the function's name spelt out, the
    arguments following its parameters, the tail; the same bytes as ``tool_format.render_call``."""
    return [st.TagFormat(begin=call_head(tool["function"]["name"]), end=CALL_TAIL,
                         content=_compact_json(tool["function"].get("parameters") or EMPTY_PARAMETERS,
                                               f"tools.{i}.function.parameters"))
            for i, tool in tools]


def _calls_only(tools: list[tuple[int, dict[str, Any]]], parallel: bool) -> st.TagsWithSeparatorFormat:
    return st.TagsWithSeparatorFormat(tags=_call_tags(tools), separator=CALL_SEPARATOR, at_least_one=True,
                                      stop_after_first=not parallel)


def _lazy_calls(tools: list[tuple[int, dict[str, Any]]], parallel: bool) -> st.TriggeredTagsFormat:
    return st.TriggeredTagsFormat(triggers=[CALL_START], tags=_call_tags(tools), stop_after_first=not parallel)


def _grammar(piece: st.Format, thinking: bool = False, param: str = "tools") -> xgr.Grammar:
    """The grammar of ``piece``; after a prompt's open ``<think>``, free reasoning up to ``</think>`` comes first."""
    if thinking:
        reasoning = st.TagFormat(begin="", content=st.AnyTextFormat(), end=THINK_END + "\n\n")
        piece = st.SequenceFormat(elements=[reasoning, piece])
    try:
        return xgr.Grammar.from_structural_tag(st.StructuralTag(format=piece))
    except (RuntimeError, ValueError) as err:
        raise GrammarError(param, f"{param}: no grammar can be built for it: {_first_line(err)}") from None


def tool_call_grammar(tools: list[dict[str, Any]], parallel: bool) -> xgr.Grammar:
    """Forced calls (``tool_choice`` required or named): only ``<tool_call>`` blocks of ``tools`` (OpenAI tool
    dicts), arguments following the function's parameters; with ``parallel`` one or more, one per line."""
    return _grammar(_calls_only(list(enumerate(tools)), parallel))


def lazy_tool_grammar(tools: list[dict[str, Any]], parallel: bool) -> xgr.Grammar:
    """``tool_choice`` auto: free text until the model writes ``<tool_call>``, then only a call of one of ``tools``;
    after it free text again (and more calls with ``parallel``; without, the answer ends with its one call)."""
    return _grammar(_lazy_calls(list(enumerate(tools)), parallel))


def _lazy(req: InternalRequest, tool_grammar: str) -> bool:
    """Whether the lazy tool grammar applies: it is on and the model is shown tools (``tool_choice`` not none)."""
    return tool_grammar == "lazy" and bool(req.active_tools())


def needs_grammar(req: InternalRequest, tool_grammar: str = "lazy") -> bool:
    """Whether a request is decoded under a grammar: forced tools, an output schema, or auto tools with the lazy
    tool grammar on."""
    return _lazy(req, tool_grammar) or bool(req.forced_tools()) or req.output_schema is not None


def request_grammar(req: InternalRequest, thinking: bool, tool_grammar: str = "lazy") -> xgr.Grammar | None:
    """The grammar a request asks for, or None for free text; it reads only the neutral request's fields, so every
    protocol gets the same grammars. Forced tools: calls only; auto with the lazy grammar: free text or calls (with
    an output schema: calls or that JSON); else the output schema."""
    if not needs_grammar(req, tool_grammar):
        return None
    indexed = list(enumerate(req.tools))
    if forced := req.forced_tools():
        return _grammar(_calls_only(forced, parallel=req.tool_choice == "required" and req.parallel_tool_calls),
                        thinking)
    if req.output_schema is not None:
        piece: st.Format = _compact_json(req.output_schema, req.names.output_schema, strict=req.schema_strict)
        if not _lazy(req, tool_grammar):
            return _grammar(piece, thinking, req.names.output_schema)
        return _grammar(st.OrFormat(elements=[_calls_only(indexed, req.parallel_tool_calls), piece]), thinking)
    return _grammar(_lazy_calls(indexed, req.parallel_tool_calls), thinking)
