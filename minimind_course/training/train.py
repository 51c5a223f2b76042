"""Rebuild the bundled MiniMind-Tiny from the course corpus on a CPU: tokenizer, corpus, training, saved folder.

    python -m minimind_course.train_tiny [--out DIR] [--seconds N] [--seed S]

Training is time-budgeted (the learning-rate schedule follows elapsed time), so the exact weights depend on
the machine's speed; ``--steps N`` fixes the number of steps instead for a bit-for-bit rerun on one machine.
Loss is taken on assistant tokens only. The folder loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from minimind_course.paths import CORPUS_DIR
from minimind_course.training.corpus import CorpusBuilder, dialogue_line, tokenizer_texts
from minimind_course.model.minimind import MiniMindConfig, MiniMindForCausalLM
from minimind_course.training.tokenizer import train_bpe, wrap_fast_tokenizer

DEFAULT_OUT = Path("runs") / "minimind-tiny"  # never the package: installing is eval_tiny --install
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
    return sorted(t for t in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{1,6}", t))


def lr_at(progress: float, peak: float, warmup: float = 0.03, decay: float = 0.2, floor: float = 0.1) -> float:
    """Warm-up, stable, decay: linear warm-up, ``peak`` until the last ``decay`` share, then linear to ``floor * peak``.

    A long stable phase keeps the learning rate high while the name-copying attention heads are still forming.
    """
    if progress < warmup:
        return peak * progress / warmup
    if progress < 1 - decay:
        return peak
    return peak * (1 - (1 - floor) * min(1.0, (progress - (1 - decay)) / decay))


def assistant_loss(model: MiniMindForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss on labelled positions only; the LM head runs just there (about half the tokens)."""
    hidden, _ = model.model(ids)
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def make_batch(rows: list[tuple[list[int], list[int]]], micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A mixed batch, sorted by length and cut into ``micro`` right-padded micro-batches (less padding)."""
    rows = sorted(rows, key=lambda r: len(r[0]))
    size = math.ceil(len(rows) / micro)
    out = []
    for k in range(0, len(rows), size):
        chunk = rows[k:k + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in chunk])
        labels = torch.tensor([r[1] + [IGNORE] * (width - len(r[1])) for r in chunk])
        out.append((ids, labels))
    return out


class ThreadTuner:
    """Pick 1 or ``max_threads`` torch threads by measured tokens/s, re-measured every ``every_s`` seconds.

    On a shared 2-core machine two threads can be several times slower than one (they wait for each other
    while other processes run), and on an idle machine the opposite holds.
    """

    def __init__(self, max_threads: int, every_s: float = 60.0, probe: int = 3):
        self.options = sorted({1, max_threads})
        self.every_s, self.probe = every_s, probe
        self.speed: dict[int, float] = {}
        self.queue: list[int] = []
        self.trial: list[float] = []
        self.next_probe = 0.0

    def before_step(self, now: float) -> None:
        """Set the thread count for the coming step (probing each option for a few steps when due)."""
        if not self.queue and now >= self.next_probe:
            self.queue = [n for n in self.options for _ in range(self.probe)]
            self.next_probe = now + self.every_s
        n = self.queue[0] if self.queue else max(self.speed, key=self.speed.get)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def after_step(self, tokens_per_second: float) -> None:
        if not self.queue:
            return
        n = self.queue.pop(0)
        self.trial.append(tokens_per_second)
        if not self.queue or self.queue[0] != n:  # this option's probe is over; its first step is warm-up
            self.speed[n] = sum(self.trial[1:]) / max(1, len(self.trial) - 1)
            self.trial = []


def train(args: argparse.Namespace) -> dict:
    """Build tokenizer and corpus, train the model, save the folder; returns the training record."""
    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tuner = ThreadTuner(args.threads) if not args.steps else None  # --steps: fixed threads, reproducible

    tokenizer = wrap_fast_tokenizer(train_bpe(tokenizer_texts(), args.vocab_size), args.max_len)
    # Dialogues are drawn fresh for every batch (new random names each time) and hashed as they are used.
    builder, corpus_hash, n_dialogues = CorpusBuilder(args.seed, name_pieces(tokenizer)), hashlib.sha256(), 0

    def draw(progress: float) -> tuple[list[int], list[int]]:
        nonlocal n_dialogues
        while True:
            example = builder.example(progress)
            ids, labels = encode_dialogue(tokenizer, example["messages"])
            if len(ids) <= args.max_len:
                corpus_hash.update(dialogue_line(example).encode("utf-8"))
                n_dialogues += 1
                return ids, labels

    print(f"tokenizer {len(tokenizer)} tokens, {time.time() - t_start:.0f}s", flush=True)

    shape = MODEL_SHAPE | {k: v for k, v in vars(args).items() if k in MODEL_SHAPE and v is not None}
    config = MiniMindConfig(vocab_size=len(tokenizer), max_position_embeddings=args.max_len, qk_norm=False,
                            rope_theta=args.rope_theta, **shape)
    model = MiniMindForCausalLM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95))
    step, seen_tokens, loss_ema, t0 = 0, 0, None, time.time()
    model.train()
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / args.seconds
        if progress >= 1.0:
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        rows = [draw(progress) for _ in range(args.batch)]
        if tuner:
            tuner.before_step(time.time())
        t_step, step_tokens = time.time(), 0
        micro_batches = make_batch(rows, args.micro)
        n_target = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in micro_batches)
        total = 0.0
        for ids, labels in micro_batches:
            loss = assistant_loss(model, ids, labels)
            share = int((labels[:, 1:] != IGNORE).sum()) / n_target
            (loss * share).backward()
            total += loss.item() * share
            step_tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if tuner:
            tuner.after_step(step_tokens / (time.time() - t_step))
        seen_tokens += step_tokens
        step += 1
        loss_ema = total if loss_ema is None else 0.95 * loss_ema + 0.05 * total
        if step % 25 == 0:
            dt = time.time() - t0
            print(f"step {step:5d}  loss {loss_ema:.4f}  lr {optim.param_groups[0]['lr']:.2e}  "
                  f"{seen_tokens / dt:,.0f} tok/s  {torch.get_num_threads()} threads  {dt:.0f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    save_folder(model, tokenizer, args.out)
    record = {
        "model": "MiniMind-Tiny",
        "seed": args.seed,
        "corpus_sha256": corpus_hash.hexdigest(),
        "corpus_dialogues": n_dialogues,
        "corpus_files_sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                                for f in sorted(CORPUS_DIR.iterdir()) if f.is_file()},
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_shape": shape,
        "max_position_embeddings": args.max_len,
        "rope_theta": args.rope_theta,
        "default_system_prompt": None,
        "training": {"steps": step, "batch": args.batch, "micro_batches": args.micro, "lr": args.lr,
                     "schedule": "3% linear warm-up, constant, last 20% linear to 10%",
                     "optimizer": "AdamW(0.9, 0.95), wd 0.1",
                     "grad_clip": 1.0, "loss": "assistant tokens only", "budget_seconds": args.seconds,
                     "budget_steps": args.steps, "max_threads": args.threads,
                     "thread_speed_tokens_per_s": tuner.speed if tuner else None},
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folder to write (default: %(default)s); put it into the package with "
                        "python -m minimind_course.eval_tiny --model DIR --install")
    parser.add_argument("--seconds", type=float, default=840, help="training time budget (default 840)")
    parser.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=1024, help="longest training dialogue = max_position_embeddings")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    for key in MODEL_SHAPE:
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int, help=f"default {MODEL_SHAPE[key]}")
    parser.add_argument("--rope-theta", type=float, default=1e6, help="RoPE base (default 1e6, as upstream)")
    parser.add_argument("--threads", type=int, default=2, help="most torch threads (tuned between 1 and this)")
    args = parser.parse_args(argv)
    record = train(args)
    print(json.dumps({k: record[k] for k in ("steps", "train_seconds", "tokens_per_second", "final_loss_ema")
                      if k in record} | {"steps": record["training"]["steps"]}))
