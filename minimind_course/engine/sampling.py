"""Sampling parameters and the logits pipeline that turns one step's logits into the next token.

Order as in vLLM: ``logit_bias`` and the penalties on the raw logits, then temperature, min-p, top-k, top-p,
then a draw from a per-request ``torch.Generator`` (so a ``seed`` reproduces the same text no matter what else
runs). Temperature 0 means greedy: bias and penalties still apply, then argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")  # generation_config may set these


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request (all ``n`` choices share it)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks want fixed-length outputs)
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's probability

    def __post_init__(self):
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not isinstance(token, int) or token < 0 for token in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids (non-negative integers)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties, on generated tokens only: logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence = presence
        self.frequency = frequency
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBias(LogitsProcessor):
    """OpenAI's ``logit_bias``: a fixed amount added to chosen tokens' logits (-100 bans, +100 all but forces)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self.ids.to(scores.device)
        return scores.index_add(1, ids, self.values.to(scores)[None].expand(scores.shape[0], -1))


def build_logits_pipeline(params: SamplingParams, prompt_len: int) -> LogitsProcessorList:
    """The HF processors/warpers this request needs, in vLLM's order (nothing for plain greedy)."""
    pipeline = LogitsProcessorList()
    if params.logit_bias:
        pipeline.append(LogitBias(params.logit_bias))
    if params.repetition_penalty != 1.0:  # HF and vLLM apply it to prompt and output tokens alike
        pipeline.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        pipeline.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_len))
    if params.greedy:
        return pipeline
    if params.temperature != 1.0:
        pipeline.append(TemperatureLogitsWarper(params.temperature))
    if params.min_p > 0.0:
        pipeline.append(MinPLogitsWarper(params.min_p))
    if params.top_k > 0:
        pipeline.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        pipeline.append(TopPLogitsWarper(params.top_p))
    return pipeline


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private random stream: seeded when the request asks for it, else from the OS."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def next_tokens(
    params: SamplingParams,
    pipeline: LogitsProcessorList,
    sequences: torch.LongTensor,
    logits: torch.Tensor,
    generator: torch.Generator,
) -> torch.LongTensor:
    """One token per row from the last position's logits [rows, vocab]."""
    scores = pipeline(sequences, logits.float())
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def generation_config_defaults(model) -> dict[str, float]:
    """Values the model's generation_config.json sets on purpose, used when a request leaves them out
    (as vLLM's ``--generation-config auto``); ``do_sample: false`` there means greedy by default."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    diff = config.to_diff_dict()
    defaults = {key: diff[key] for key in SAMPLING_DEFAULT_KEYS if diff.get(key) is not None}
    if diff.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
