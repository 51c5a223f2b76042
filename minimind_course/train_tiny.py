"""Rebuild the bundled MiniMind-Tiny from the course corpus on a CPU: tokenizer, corpus, training, saved folder.

    python -m minimind_course.train_tiny [--out DIR] [--seconds N] [--seed S]

Training is time-budgeted (the learning-rate schedule follows elapsed time), so the exact weights depend on
the machine's speed; ``--steps N`` fixes the number of steps instead for a bit-for-bit rerun on one machine.
Loss is taken on assistant tokens only. The folder loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from minimind_course.corpus_gen import build_corpus, corpus_sha256, tokenizer_texts
from minimind_course.model import MiniMindConfig, MiniMindForCausalLM
from minimind_course.tiny_tokenizer import train_bpe, wrap_fast_tokenizer

DEFAULT_OUT = Path(__file__).parent / "assets" / "minimind-tiny"
IGNORE = -100

# Model shape from tiny-model-notes.md: head_dim 64 (vLLM's CPU attention rejects smaller heads), tied embeddings.
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=704)


def render_with_spans(messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text of a dialogue and the character spans the loss is taken on (assistant content + <|im_end|>)."""
    text, spans = "", []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def encode_dialogue(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a dialogue and labels that keep only assistant tokens (others are -100)."""
    text, spans = render_with_spans(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if any(s <= a < e for s, e in spans) else IGNORE
              for tid, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def name_pieces(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """Lower-case alphabetic sub-words of the vocabulary, from which random training names are built."""
    return sorted(t for t in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{2,6}", t))


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor * peak``."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_batch(data: list[tuple[list[int], list[int]]], idx: list[int], micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A mixed batch, sorted by length and cut into ``micro`` right-padded micro-batches (less padding)."""
    rows = sorted((data[i] for i in idx), key=lambda r: len(r[0]))
    size = math.ceil(len(rows) / micro)
    out = []
    for k in range(0, len(rows), size):
        chunk = rows[k:k + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in chunk])
        labels = torch.tensor([r[1] + [IGNORE] * (width - len(r[1])) for r in chunk])
        out.append((ids, labels))
    return out


def train(args: argparse.Namespace) -> dict:
    """Build tokenizer and corpus, train the model, save the folder; returns the training record."""
    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    tokenizer = wrap_fast_tokenizer(train_bpe(tokenizer_texts(), args.vocab_size), args.max_len)
    corpus = build_corpus(args.seed, args.examples, name_pieces(tokenizer))
    data = [encode_dialogue(tokenizer, ex["messages"]) for ex in corpus]
    data = [d for d in data if len(d[0]) <= args.max_len]
    n_tokens = sum(len(d[0]) for d in data)
    print(f"tokenizer {len(tokenizer)} tokens; corpus {len(data)} dialogues, {n_tokens} tokens, "
          f"{time.time() - t_start:.0f}s", flush=True)

    config = MiniMindConfig(vocab_size=len(tokenizer), max_position_embeddings=args.max_len, qk_norm=False,
                            **MODEL_SHAPE)
    model = MiniMindForCausalLM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed + 1)
    order: list[int] = []
    step, seen_tokens, loss_ema, t0 = 0, 0, None, time.time()
    model.train()
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / args.seconds
        if progress >= 1.0:
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        if len(order) < args.batch:  # epochs over the corpus in a fresh random order
            order += rng.sample(range(len(data)), len(data))
        idx, order = order[:args.batch], order[args.batch:]
        micro_batches = make_batch(data, idx, args.micro)
        n_target = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in micro_batches)
        total = 0.0
        for ids, labels in micro_batches:
            loss = model(ids, labels=labels).loss
            share = int((labels[:, 1:] != IGNORE).sum()) / n_target
            (loss * share).backward()
            total += loss.item() * share
            seen_tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        loss_ema = total if loss_ema is None else 0.95 * loss_ema + 0.05 * total
        if step % 25 == 0:
            dt = time.time() - t0
            print(f"step {step:5d}  loss {loss_ema:.4f}  lr {optim.param_groups[0]['lr']:.2e}  "
                  f"{seen_tokens / dt:,.0f} tok/s  {dt:.0f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    save_folder(model, tokenizer, args.out)
    record = {
        "model": "MiniMind-Tiny",
        "seed": args.seed,
        "corpus_sha256": corpus_sha256(corpus),
        "corpus_dialogues": len(data),
        "corpus_tokens": n_tokens,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_shape": MODEL_SHAPE,
        "max_position_embeddings": args.max_len,
        "default_system_prompt": None,
        "training": {"steps": step, "batch": args.batch, "micro_batches": args.micro, "lr": args.lr,
                     "schedule": "3% linear warm-up, cosine to 10%", "optimizer": "AdamW(0.9, 0.95), wd 0.1",
                     "grad_clip": 1.0, "loss": "assistant tokens only", "budget_seconds": args.seconds,
                     "budget_steps": args.steps, "threads": args.threads},
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "tokens_per_second": round(seen_tokens / train_s),
        "tokens_seen": seen_tokens,
        "final_loss_ema": round(loss_ema, 4),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    with open(args.out / "training.json", "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return record


def save_folder(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save weights in float16 (tied lm_head stored once), tokenizer and greedy generation defaults."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False,
                                               max_new_tokens=256)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    # Upstream's keys, also read by tools outside transformers 5 (which would not know "TokenizersBackend").
    config_path = out / "tokenizer_config.json"
    with open(config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=660, help="training time budget (default 660)")
    parser.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=60000, help="dialogues drawn from the corpus generator")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=1024, help="longest training dialogue = max_position_embeddings")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    record = train(args)
    print(json.dumps({k: record[k] for k in ("steps", "train_seconds", "tokens_per_second", "final_loss_ema")
                      if k in record} | {"steps": record["training"]["steps"]}))


if __name__ == "__main__":
    main()
