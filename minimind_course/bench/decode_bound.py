"""The physical limit of decoding: every new token reads all the weights once, so tokens/s <= bandwidth / bytes.

At batch 1 a decode step is a chain of matrix-vector products: each weight is used for one multiply-add per
token, so the step is limited by how fast memory delivers the weights, not by arithmetic. Batching (vLLM's
continuous batching) reuses each weight read for many sequences, which is where its throughput comes from.

Used by notebook 09 on a MiniMind2-small-shaped model (26M parameters) with random weights: no download needed,
and random weights cost exactly as much to read as trained ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minimind_course.model.minimind import MiniMindConfig, MiniMindForCausalLM


def random_minimind2_small(dtype: torch.dtype = torch.float32, seed: int = 0) -> MiniMindForCausalLM:
    """A MiniMind2-small (hidden 512, 8 layers, vocab 6400, tied embeddings) with random weights, in eval mode."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig()).to(dtype).eval()


def distinct_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter tensor once (a tied embedding and output projection are one tensor)."""
    return list({param.data_ptr(): param for param in model.parameters()}.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters: what one decode step must read.

    The tied embedding matrix is read in full by the output projection (logits for every vocabulary entry).
    """
    return sum(param.numel() * param.element_size() for param in distinct_parameters(model))


def measure_copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from the best of ``repeats`` copies of an ``nbytes`` buffer (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once, so page faults are not timed
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - began)
    return 2 * src.numel() * src.element_size() / best


@torch.inference_mode()
def measure_decode_tokens_per_s(model: MiniMindForCausalLM, new_tokens: int = 64, prompt_tokens: int = 16,
                                repeats: int = 3, batch_size: int = 1) -> float:
    """Greedy decode speed (tokens/s over all sequences) with the KV cache, best of ``repeats``, prefill excluded.

    ``batch_size`` sequences advance together: one forward pass, one read of the weights, per step.
    """
    vocab = model.config.vocab_size
    prompt = (torch.arange(prompt_tokens) + 3 + torch.arange(batch_size).unsqueeze(1)).remainder(vocab)
    best = float("inf")
    for _ in range(repeats):
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        began = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        best = min(best, time.perf_counter() - began)
    return batch_size * new_tokens / best


@dataclass(frozen=True)
class DecodeBound:
    """Weights read per token, bandwidth, the bound they imply and the measured decode speed."""

    parameters: int
    weight_bytes: int
    bandwidth: float  # bytes/s
    bound_tokens_per_s: float
    measured_tokens_per_s: float

    @property
    def fraction_of_bound(self) -> float:
        return self.measured_tokens_per_s / self.bound_tokens_per_s

    def report(self) -> str:
        return (f"parameters: {self.parameters / 1e6:.1f} M  ->  {self.weight_bytes / 1e6:.0f} MB read per token\n"
                f"bandwidth: {self.bandwidth / 1e9:.1f} GB/s  ->  bound {self.bound_tokens_per_s:.0f} tokens/s\n"
                f"measured decode (batch 1): {self.measured_tokens_per_s:.0f} tokens/s "
                f"= {self.fraction_of_bound:.0%} of the bound")


def decode_bound(model: MiniMindForCausalLM, bandwidth: float, new_tokens: int = 64) -> DecodeBound:
    """Compare the bandwidth bound with the measured batch-1 decode speed of ``model``."""
    nbytes = weight_bytes(model)
    parameters = sum(param.numel() for param in distinct_parameters(model))
    measured = measure_decode_tokens_per_s(model, new_tokens)
    return DecodeBound(parameters, nbytes, bandwidth, bandwidth / nbytes, measured)
