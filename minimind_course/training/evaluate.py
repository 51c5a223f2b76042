"""Measure MiniMind-Tiny with greedy decoding in-process: course answers, the memory demo, determinism, speed.

    python -m minimind_course.eval_tiny [--model DIR] [--json FILE]

1. key terms: % of the corpus's course questions (both languages) whose answer mentions the concept's term;
2. memory demo on held-out names (never in the training corpus): recall with history (right after the
   greeting and after an unrelated Q&A turn), and "don't know" / "不知道" without the name in the context; in
   English, in Chinese, and in Chinese with names of common characters that are not single tokens ("zh_common");
3. determinism: the same prompts decoded twice give identical text;
4. decode speed: new tokens per second for single long answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import minimind_course.model  # noqa: F401  (registers model_type "minimind")
from minimind_course.paths import BUNDLED_MODEL_DIR
from minimind_course.training.corpus import (EN_ASK, EN_INTRO, ZH_ASK, ZH_INTRO, load_json, load_jsonl, qa_pairs)

DEFAULT_MODEL = BUNDLED_MODEL_DIR
DONT_KNOW = {"en": ("don't know", "don’t know"), "zh": ("不知道",)}
INTRO = {"en": EN_INTRO, "zh": ZH_INTRO}
NAME_SETS = {"en": "en", "zh": "zh", "zh_common": "zh"}  # held-out name list -> the language of its dialogues
ASK = {"en": EN_ASK, "zh": ZH_ASK}


class GreedyChat:
    """Greedy chat completion with a transformers model, as the course server does it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer
        self.new_tokens = 0

    @torch.inference_mode()
    def __call__(self, messages: Sequence[dict], max_new_tokens: int = 128) -> str:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        self.new_tokens += len(new)
        return self.tokenizer.decode(new, skip_special_tokens=True)


def load(model_dir: Path) -> GreedyChat:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return GreedyChat(model, AutoTokenizer.from_pretrained(model_dir))


def key_term_cases() -> list[dict]:
    """Every course question of the corpus with the terms its answer should mention."""
    return [{"lang": lang, "question": q, "terms": g[f"terms_{lang}"]}
            for g in load_jsonl("concepts.jsonl") for lang in ("en", "zh") for q in g[lang]["q"]]


def eval_key_terms(chat: GreedyChat) -> dict:
    results = {"en": [], "zh": []}
    failures = []
    for case in key_term_cases():
        answer = chat([{"role": "user", "content": case["question"]}])
        ok = any(t.lower() in answer.lower() for t in case["terms"])
        results[case["lang"]].append(ok)
        if not ok:
            failures.append({"question": case["question"], "answer": answer})
    return {"pct": {lang: pct(v) for lang, v in results.items()}, "n": {k: len(v) for k, v in results.items()},
            "failures": failures}


def eval_memory(chat: GreedyChat, lang: str, names: Sequence[str]) -> dict:
    """Memory demo for each held-out name: greeting, recall, recall after Q&A, don't-know with and without Q&A."""
    qa = qa_pairs(load_jsonl("concepts.jsonl"), lang)
    score = {k: [] for k in ("greet", "recall", "recall_after_qa", "dont_know_after_qa")}
    failures = []
    dont_know = chat([{"role": "user", "content": ASK[lang]}], 48)
    for i, name in enumerate(names):
        q, a = qa[(i * 7) % len(qa)]
        intro = [{"role": "user", "content": INTRO[lang].format(name=name)}]
        greeting = chat(intro, 48)
        history = intro + [{"role": "assistant", "content": greeting}]
        ask = [{"role": "user", "content": ASK[lang]}]
        between = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        answers = {"greet": greeting, "recall": chat(history + ask, 48),
                   "recall_after_qa": chat(history + between + ask, 48),
                   "dont_know_after_qa": chat(between + ask, 48)}
        for key, answer in answers.items():
            ok = any(s in answer for s in DONT_KNOW[lang]) if key.startswith("dont") else name in answer
            score[key].append(ok)
            if not ok:
                failures.append({"name": name, "case": key, "answer": answer})
    result = {k: pct(v) for k, v in score.items()}
    result["dont_know"] = 100.0 if any(s in dont_know for s in DONT_KNOW[lang]) else 0.0
    return {"pct": result, "n": len(names), "dont_know_answer": dont_know, "failures": failures}


def eval_determinism(chat: GreedyChat) -> bool:
    prompts = [[{"role": "user", "content": c["question"]}] for c in key_term_cases()[::6]]
    prompts += [[{"role": "user", "content": INTRO[lang].format(name=n)}] for lang, n in (("en", "Ada"), ("zh", "李华"))]
    first = [chat(p) for p in prompts]
    return first == [chat(p) for p in prompts]


def eval_speed(chat: GreedyChat) -> float:
    """Decode tokens/s for batch-1 long answers (prefill included, as a user would see it)."""
    prompts = ["Tell me a story.", "讲个故事。", "Explain how a chat request flows through the course server."]
    chat([{"role": "user", "content": "Hello"}], 8)  # warm-up
    chat.new_tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        chat([{"role": "user", "content": p}], 256)
    return chat.new_tokens / (time.perf_counter() - t0)


def pct(values: Sequence[bool]) -> float:
    return round(100.0 * sum(values) / max(1, len(values)), 1)


def run(model_dir: Path) -> dict:
    chat = load(model_dir)
    heldout = load_json("heldout_names.json")
    return {
        "model": str(model_dir),
        "key_terms": eval_key_terms(chat),
        "memory": {names: eval_memory(chat, lang, heldout[names]) for names, lang in NAME_SETS.items()},
        "deterministic": eval_determinism(chat),
        "decode_tokens_per_second": round(eval_speed(chat), 1),
        "torch_threads": torch.get_num_threads(),
    }


# The floors a model must reach to be bundled (``--install``); tests/test_tiny_model.py holds the same line.
FLOORS = {("key_terms", None): 95.0, ("memory", "recall"): 80.0, ("memory", "recall_after_qa"): 80.0,
          ("memory", "dont_know"): 90.0, ("memory", "dont_know_after_qa"): 90.0}


def missed_floors(r: dict) -> list[str]:
    """One line per language and metric below its floor (empty: the model may be bundled)."""
    missed = []
    for (group, key), floor in FLOORS.items():
        for names in ("en", "zh") if group == "key_terms" else NAME_SETS:
            value = r["key_terms"]["pct"][names] if group == "key_terms" else r["memory"][names]["pct"][key]
            if value < floor:
                missed.append(f"{key or group} ({names}): {value:.1f}% < {floor:.0f}%")
    return missed


def install(model_dir: Path, target: Path = BUNDLED_MODEL_DIR) -> None:
    """Replace the bundled model's files with ``model_dir``'s (the caller has checked the floors)."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.is_file():
            old.unlink()
    for new in model_dir.iterdir():
        if new.is_file():
            shutil.copy2(new, target / new.name)


def print_table(r: dict) -> None:
    rows = [("course answers mention key term", r["key_terms"]["pct"]["en"], r["key_terms"]["pct"]["zh"], None,
             ">= 95")]
    m = r["memory"]
    for key, label, target in (("greet", "greeting uses the name", ""),
                               ("recall", "recall with history", ">= 80"),
                               ("recall_after_qa", "recall after an unrelated Q&A", ">= 80"),
                               ("dont_know", "don't know, empty history", ">= 90"),
                               ("dont_know_after_qa", "don't know after an unrelated Q&A", ">= 90")):
        rows.append((label, m["en"]["pct"][key], m["zh"]["pct"][key], m["zh_common"]["pct"][key], target))
    print(f"{'metric':40s} {'English':>8s} {'Chinese':>8s} {'zh_common':>9s}  target")
    for label, en, zh, common, target in rows:
        common = "" if common is None else f"{common:.1f}%"
        print(f"{label:40s} {en:7.1f}% {zh:7.1f}% {common:>9s}  {target}")
    print(f"{'held-out names':40s} {m['en']['n']:8d} {m['zh']['n']:8d} {m['zh_common']['n']:9d}")
    print(f"greedy output identical across two runs: {r['deterministic']}")
    print(f"decode speed: {r['decode_tokens_per_second']:.0f} tokens/s (batch 1, {r['torch_threads']} threads)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder (default: bundled)")
    parser.add_argument("--json", type=Path, help="also write the results (with failures) to this file")
    parser.add_argument("--install", action="store_true",
                        help="if every floor is met, copy the model into the package as the bundled model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (batch-1 decoding of a tiny model gains little from more)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder (no config.json)")
    torch.set_num_threads(args.threads)
    results = run(args.model)
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=2)
            f.write("\n")
    if args.install:
        if missed := missed_floors(results):
            raise SystemExit(f"error: not installed, {args.model} misses floors: " + "; ".join(missed))
        install(args.model)
        print(f"installed {args.model} as the bundled model ({BUNDLED_MODEL_DIR})")
