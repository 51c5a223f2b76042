"""What grammar-constrained decoding costs per token: xgrammar (what the server uses) against llguidance.

``python -m minimind_course.bench.grammar_mask`` walks a short JSON answer token by token through each library's
matcher, timing "fill the token mask + apply it to a logits row" at every step, on the bundled vocabulary and on a
6,400-token MiniMind-sized byte-level BPE trained here on the course's own text (no download). One CPU thread.
It also walks an answer of ``tool_choice`` auto through the server's lazy tool grammar (free text, then a call):
per token over the whole answer, and over the free text and the call separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minimind_course.tool_format import render_call

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["city", "days", "unit"], "additionalProperties": False}
ANSWER = json.dumps({"city": "Tokyo 东京", "days": 3, "unit": "c"}, ensure_ascii=False)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
FREE_TEXT = "好的，我先查一下东京未来三天的天气，然后告诉你。\n"  # before the call: the grammar lets it be
TOOL_ANSWER = FREE_TEXT + render_call("get_weather", ANSWER)


def xgrammar_steps(tokenizer, vocab: int, ids: list[int], lazy_tools: bool = False) -> list[float]:
    """Seconds per step with xgrammar: fill_next_token_bitmask + apply_token_bitmask_inplace; the server's JSON
    grammar, or with ``lazy_tools`` its lazy tool grammar for ``TOOLS``."""
    import xgrammar as xgr

    from minimind_course.serving.structured_output import json_grammar, lazy_tool_grammar

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    grammar = lazy_tool_grammar(TOOLS, parallel=True) if lazy_tools else json_grammar(SCHEMA, "schema")
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(grammar)
    matcher, mask, logits = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab), torch.zeros(vocab)
    steps = []
    for token in ids:
        began = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits[None], mask)
        steps.append(time.perf_counter() - began)
        assert matcher.accept_token(token), f"token {token} refused"
    return steps


def llguidance_steps(tokenizer, vocab: int, ids: list[int]) -> list[float]:
    """Seconds per step with llguidance: fill_next_token_bitmask + apply_token_bitmask_inplace."""
    import llguidance
    import llguidance.hf
    import llguidance.torch

    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab), grammar)
    mask, logits = llguidance.torch.allocate_token_bitmask(1, vocab), torch.zeros(1, vocab)
    steps = []
    for token in ids:
        began = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)
        steps.append(time.perf_counter() - began)
        assert matcher.consume_token(token), matcher.get_error()
    return steps


def minimind_sized_tokenizer(vocab_size: int = 6400):
    """A byte-level BPE of upstream MiniMind's vocabulary size, trained on this package's text and docs."""
    from minimind_course.training.tokenizer import train_bpe, wrap_fast_tokenizer

    root = Path(__file__).resolve().parents[1]
    files = sorted(root.rglob("*.py")) + sorted(root.rglob("*.jsonl")) + sorted(root.parent.glob("docs/*.md"))
    texts = [line for path in files for line in path.read_text(encoding="utf-8", errors="ignore").splitlines()]
    return wrap_fast_tokenizer(train_bpe(texts, vocab_size), 2048)


def measure(repeats: int = 20) -> list[dict]:
    """Median and mean microseconds per token for each library on both vocabularies, and for the lazy tool grammar
    (whole answer, free text, call)."""
    from transformers import AutoTokenizer

    from minimind_course.model.loading import BUNDLED_MODEL_DIR

    torch.set_num_threads(1)
    rows = []
    for label, tokenizer in (("bundled", AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)),
                             ("minimind-6400", minimind_sized_tokenizer())):
        ids, vocab = tokenizer.encode(ANSWER, add_special_tokens=False), len(tokenizer)
        for library, run in (("xgrammar", xgrammar_steps), ("llguidance", llguidance_steps)):
            steps = [s for _ in range(repeats) for s in run(tokenizer, vocab, ids)]
            rows.append(_row(label, vocab, f"{library} json", steps, len(ids)))
        ids = tokenizer.encode(TOOL_ANSWER, add_special_tokens=False)
        free = len(tokenizer.encode(FREE_TEXT, add_special_tokens=False))  # the text splits there (it ends in \n)
        walks = [xgrammar_steps(tokenizer, vocab, ids, lazy_tools=True) for _ in range(repeats)]
        for part, steps in (("lazy tools", [s for w in walks for s in w]),
                            ("  free text", [s for w in walks for s in w[:free]]),
                            ("  the call", [s for w in walks for s in w[free:]])):
            rows.append(_row(label, vocab, f"xgrammar {part}", steps, len(steps) // repeats))
    return rows


def _row(vocabulary: str, vocab: int, grammar: str, steps: list[float], tokens: int) -> dict:
    return {"vocabulary": vocabulary, "vocab_size": vocab, "grammar": grammar, "tokens": tokens,
            "median_us": statistics.median(steps) * 1e6, "mean_us": statistics.fmean(steps) * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimind_course.bench.grammar_mask", description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="walks through the answer per library (default: 20)")
    args = parser.parse_args(argv)
    for row in measure(args.repeats):
        print(f"{row['vocabulary']:>14} ({row['vocab_size']:>5} tokens)  {row['grammar']:<21} {row['tokens']:>3} steps  "
              f"median {row['median_us']:7.1f} us/token  mean {row['mean_us']:8.1f} us/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
