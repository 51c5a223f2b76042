"""What grammar-constrained decoding costs per token: xgrammar (what the server uses) against llguidance.

``python -m minimind_course.bench.grammar_mask`` walks a short JSON answer token by token through each library's
matcher, timing "fill the token mask + apply it to a logits row" at every step, on the bundled vocabulary and on a
6,400-token MiniMind-sized byte-level BPE trained here on the course's own text (no download). One CPU thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["city", "days", "unit"], "additionalProperties": False}
ANSWER = json.dumps({"city": "Tokyo 东京", "days": 3, "unit": "c"}, ensure_ascii=False)


def xgrammar_steps(tokenizer, vocab: int, ids: list[int]) -> list[float]:
    """Seconds per step with xgrammar: fill_next_token_bitmask + apply_token_bitmask_inplace."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(SCHEMA, any_whitespace=False)
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
    """Median and mean microseconds per token for each library on both vocabularies."""
    from transformers import AutoTokenizer

    from minimind_course.model.loading import BUNDLED_MODEL_DIR

    torch.set_num_threads(1)
    rows = []
    for label, tokenizer in (("bundled", AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)),
                             ("minimind-6400", minimind_sized_tokenizer())):
        ids, vocab = tokenizer.encode(ANSWER, add_special_tokens=False), len(tokenizer)
        for library, run in (("xgrammar", xgrammar_steps), ("llguidance", llguidance_steps)):
            steps = [s for _ in range(repeats) for s in run(tokenizer, vocab, ids)]
            rows.append({"vocabulary": label, "vocab_size": vocab, "library": library, "tokens": len(ids),
                         "median_us": statistics.median(steps) * 1e6, "mean_us": statistics.fmean(steps) * 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimind_course.bench.grammar_mask", description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="walks through the answer per library (default: 20)")
    args = parser.parse_args(argv)
    for row in measure(args.repeats):
        print(f"{row['vocabulary']:>14} ({row['vocab_size']:>5} tokens)  {row['library']:<10}  "
              f"median {row['median_us']:7.1f} us/token  mean {row['mean_us']:8.1f} us/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
