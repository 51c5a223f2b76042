"""Grammar-constrained decoding with xgrammar: forced tool calls and JSON output that always parse.

The request decides a grammar (``tool_choice`` required or named: ``<tool_call>`` blocks whose JSON follows the
function's parameters; ``response_format`` json_object / json_schema: one JSON value of that schema), xgrammar
compiles it once against the tokenizer, and every sequence gets its own ``GrammarConstraint``: before each draw it
sets the logits of tokens that would leave the grammar to -inf, after it advances the grammar by the drawn token.
JSON is generated compactly (``", "`` and ``": "`` separators, no free whitespace), so a model cannot wander in
spaces; numbers and strings are only bounded by ``max_tokens``.

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

from minimind_course.serving.internal import InternalRequest
from minimind_course.serving.tool_parser import CALL_END, CALL_START

THINK_END = "</think>"


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


def _literal(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def tool_call_grammar(tools: list[dict[str, Any]], parallel: bool, params: list[str] | None = None) -> xgr.Grammar:
    """``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`` for one of ``tools`` (OpenAI tool dicts),
    ARGS following that function's parameters; with ``parallel`` one or more calls separated by a newline.
    ``params``: the request field of each tool's schema, for errors (default ``tools.{i}.function.parameters``)."""
    bodies = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = {
            "type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object", "properties": {}}},
            "required": ["name", "arguments"],
        }
        bodies.append(json_grammar(schema, params[i] if params else f"tools.{i}.function.parameters"))
    body = bodies[0] if len(bodies) == 1 else xgr.Grammar.union(*bodies)
    call = xgr.Grammar.concat(_literal(CALL_START + "\n"), body, _literal("\n" + CALL_END))
    if not parallel:
        return call
    rules = re.sub(r"\broot\b", "tool_call", str(call))
    return xgr.Grammar.from_ebnf(f'root ::= tool_call ("\\n" tool_call)*\n{rules}')


def after_reasoning(grammar: xgr.Grammar) -> xgr.Grammar:
    """For a prompt that ends in an open ``<think>``: free reasoning (no ``<``), ``</think>``, then ``grammar``."""
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf("root ::= [^<]* " + json.dumps(THINK_END + "\n\n")), grammar)


def request_grammar(req: InternalRequest, thinking: bool) -> xgr.Grammar | None:
    """The grammar a request asks for (forced tool calls, or its output schema), or None for free text; it reads
    only the neutral request's fields, so every protocol gets the same grammars."""
    if forced := req.forced_tools():
        grammar = tool_call_grammar([tool for _, tool in forced],
                                    parallel=req.tool_choice == "required" and req.parallel_tool_calls,
                                    params=[req.names.tool_parameters.format(index=i) for i, _ in forced])
    elif req.output_schema is not None:
        grammar = json_grammar(req.output_schema, req.names.output_schema, strict=req.schema_strict)
    else:
        return None
    return after_reasoning(grammar) if thinking else grammar
