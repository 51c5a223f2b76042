"""MiniMind, readable top to bottom: config, RMSNorm, RoPE, attention, MLP, block, causal LM.

One implementation covers both upstream generations:
MiniMind2 (Llama-like) and MiniMind-3 (Qwen3-like: an extra RMSNorm on every query/key head).
Parameter names match upstream, so real checkpoints load with ``strict=True``.
It is a transformers ``PreTrainedModel`` with ``GenerationMixin``, so ``generate``, the KV cache
and HF streamers work, and it is registered as model_type ``minimind`` (no ``trust_remote_code``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


def minimind2_intermediate_size(hidden_size: int) -> int:
    """Upstream MiniMind2 MLP width: 8/3 of hidden, rounded up to a multiple of 64 (512 -> 1408)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def minimind3_intermediate_size(hidden_size: int) -> int:
    """Upstream MiniMind-3 MLP width: pi times hidden, rounded up to a multiple of 64 (768 -> 2432)."""
    return math.ceil(hidden_size * math.pi / 64) * 64


@dataclass(repr=False)
class MiniMindConfig(PreTrainedConfig):
    """Hyper-parameters of a MiniMind model; the defaults are MiniMind2-small (26M)."""

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int | None = None
    qk_norm: bool | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float | None = None
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    use_moe: bool = False
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        # MiniMind-3 configs carry head_dim, MiniMind2 configs do not: the loader confirms from the weights.
        if self.qk_norm is None:
            self.qk_norm = self.head_dim is not None
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            width = minimind3_intermediate_size if self.qk_norm else minimind2_intermediate_size
            self.intermediate_size = width(self.hidden_size)
        if self.rms_norm_eps is None:
            self.rms_norm_eps = 1e-6 if self.qk_norm else 1e-5
        super().__post_init__(**kwargs)


class RMSNorm(nn.Module):
    """Root-mean-square norm: scale each vector to unit RMS, then by a learned weight (computed in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) tables, rotate-half convention as in upstream and HF Llama."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [batch, seq, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads [batch, heads, seq, head_dim] by their positions."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional per-head q/k RMSNorm, and a KV cache."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # MiniMind-3
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:  # append this step's keys/values, get the whole history back
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean mask [batch or 1, 1, q_len, kv_len]: True where a query may look at a key."""
    if attention_mask is None and q_len == 1:
        return None  # one new token may look at everything cached
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]
    if attention_mask is not None:  # hide padding, but let every token see itself so no row is empty
        mask = (mask & attention_mask[:, None, None, -kv_len:].bool()) | (key_pos == query_pos)
    return mask


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    config: MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(self.config.head_dim, self.config.rope_theta)
            module.inv_freq.copy_(fresh.inv_freq)


class MiniMindModel(MiniMindPreTrainedModel):
    """Token embedding, a stack of blocks, final norm: returns hidden states."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        if config.use_moe:
            raise ValueError("Mixture-of-experts MiniMind checkpoints are not supported by this course's model.")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        if attention_mask is not None and attention_mask.dim() == 4:  # a ready [batch, 1, q, kv] mask (batching)
            mask = attention_mask
        else:
            mask = causal_mask(attention_mask, seq, past + seq, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values)
        return self.norm(x), past_key_values


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with a language-model head (tied to the embedding, as upstream)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden, past_key_values = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:])
        loss = None
        if labels is not None:  # next-token loss; label -100 marks tokens that are not trained on
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
