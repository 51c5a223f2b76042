"""MiniMind, readable top to bottom: config, RMSNorm, RoPE (+ YaRN), LoRA linear, attention, MLP, MoE, block, LM.

One implementation covers both upstream generations:
MiniMind2 (Llama-like) and MiniMind-3 (Qwen3-like: an extra RMSNorm on every query/key head), dense or
mixture-of-experts (MiniMind-3-MoE: softmax router, top-k, no shared expert; MiniMind2-MoE: the same router
plus always-on shared experts, DeepSeek-MoE style), with upstream's optional YaRN rope scaling and any number of
upstream LoRA adapters chosen per batch row. Parameter names match upstream, so real checkpoints load with
``strict=True``.
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
    yarn: dict | None = None  # upstream's YaRN parameters (UPSTREAM_YARN) when rope scaling is on, else None
    use_moe: bool = False
    num_experts: int = 4  # routed experts (upstream MiniMind2 calls it n_routed_experts)
    num_experts_per_tok: int = 1
    n_shared_experts: int = 0  # MiniMind2-MoE: experts every token goes through, added to the routed sum
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True  # rescale the chosen experts' weights to sum to 1
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
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)


# What upstream's ``inference_rope_scaling=True`` switches on (both generations; its values are fixed in code).
UPSTREAM_YARN = {"factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
                 "attention_factor": 1.0}


class RMSNorm(nn.Module):
    """Root-mean-square norm: scale each vector to unit RMS, then by a learned weight (computed in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def yarn_correction_range(head_dim: int, theta: float, yarn: dict) -> tuple[int, int]:
    """The rotary dimensions where YaRN's ramp starts and ends (``beta_fast``/``beta_slow`` turns in the original
    context), clamped as upstream does to [0, head_dim/2 - 1]."""
    original, half = yarn["original_max_position_embeddings"], head_dim // 2

    def dim_of(turns: float) -> float:
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(dim_of(yarn["beta_fast"])), 0), min(math.ceil(dim_of(yarn["beta_slow"])), half - 1)


def rope_frequencies(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary pairs, and the factor YaRN multiplies cos/sin by (1.0 without YaRN).

    YaRN (upstream ``precompute_freqs_cis``): when the context exceeds the original one, each frequency f becomes
    f * ((1 - ramp) + ramp / factor), the ramp rising linearly from 0 (fast pairs, kept) to 1 (slow pairs,
    interpolated). It changes every position, short prompts included."""
    head_dim, theta, yarn = config.head_dim, config.rope_theta, config.yarn
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if yarn is None:
        return inv_freq, 1.0
    if config.max_position_embeddings > yarn["original_max_position_embeddings"]:
        low, high = yarn_correction_range(head_dim, theta, yarn)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq * (1 - ramp + ramp / yarn["factor"])
    return inv_freq, float(yarn["attention_factor"])


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) tables, rotate-half convention as in upstream and HF Llama."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [batch, seq, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads [batch, heads, seq, head_dim] by their positions."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def zero_pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` grown to ``size`` along ``dim`` with zeros (zero LoRA rows/columns add nothing)."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class LoRALinear(nn.Linear):
    """A bias-free linear layer plus stacked LoRA adapters: row b of a batch gets W x + B_a (A_a x), a = lora_ids[b].

    Adapter a (upstream: A [rank, in], B [out, rank], scale 1; smaller ranks zero-padded) owns rows
    a*rank..(a+1)*rank-1 of ``lora_A`` [adapters*rank, in] and the same columns of ``lora_B`` [out, adapters*rank].
    One matmul computes every adapter's few low-rank activations, a mask keeps each row's own (none for -1, the
    base model), a second matmul maps them back: rows for different adapters share a forward pass without ever
    mixing weights, with no per-row weight copies and no loop over adapters (see docs/api.md for the measurement).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.lora_rank = 0
        self.register_buffer("lora_A", torch.zeros(0, in_features), persistent=False)
        self.register_buffer("lora_B", torch.zeros(out_features, 0), persistent=False)

    @property
    def num_adapters(self) -> int:
        return self.lora_A.shape[0] // self.lora_rank if self.lora_rank else 0

    def adapter(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``index``'s (A [rank, in], B [out, rank]), zero-padded to the common rank."""
        rows = slice(index * self.lora_rank, (index + 1) * self.lora_rank)
        return self.lora_A[rows], self.lora_B[:, rows]

    def add_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Append one adapter (A [rank, in], B [out, rank]); its index is the number of adapters before it."""
        n, rank = self.num_adapters, max(self.lora_rank, a.shape[0])
        stack_a = zero_pad(self.lora_A.view(n, self.lora_rank, self.in_features), rank, dim=1)
        stack_b = zero_pad(self.lora_B.view(self.out_features, n, self.lora_rank), rank, dim=2)
        a, b = zero_pad(a.to(self.weight), rank, dim=0), zero_pad(b.to(self.weight), rank, dim=1)
        self.lora_A = torch.cat([stack_a, a[None]]).flatten(0, 1)
        self.lora_B = torch.cat([stack_b, b[:, None]], dim=1).flatten(1, 2)
        self.lora_rank = rank

    def forward(self, x: torch.Tensor, lora_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if lora_ids is None or not self.lora_rank:
            return out
        owner = torch.arange(self.lora_A.shape[0], device=x.device) // self.lora_rank  # adapter of each A row
        keep = (lora_ids[:, None] == owner[None]).to(x.dtype)  # [batch, adapters*rank]
        return out + ((x @ self.lora_A.T) * keep[:, None]) @ self.lora_B.T


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional per-head q/k RMSNorm, and a KV cache."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = LoRALinear(config.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = LoRALinear(config.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = LoRALinear(config.hidden_size, self.n_kv_heads * self.head_dim)
        self.o_proj = LoRALinear(self.n_heads * self.head_dim, config.hidden_size)
        if config.qk_norm:  # MiniMind-3
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None, lora_ids=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x, lora_ids).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x, lora_ids).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x, lora_ids).view(batch, seq, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:  # append this step's keys/values, get the whole history back
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1), lora_ids)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture of experts: a router scores every token, the top-k SwiGLU experts run on it and their outputs are
    summed with the (optionally renormalised) softmax weights; shared experts, if any, run on every token."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        if config.n_shared_experts:  # MiniMind2-MoE
            self.shared_experts = nn.ModuleList(
                MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_shared_experts)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = F.softmax(self.gate(tokens), dim=-1).topk(self.top_k, dim=-1)  # [tokens, top_k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):  # inference loop: each expert runs once, on its tokens only
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        for shared in getattr(self, "shared_experts", ()):
            out = out + shared(tokens)
        return out.view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.use_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, past_key_values, lora_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values, lora_ids)
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
            module.inv_freq.copy_(rope_frequencies(self.config)[0])


class MiniMindModel(MiniMindPreTrainedModel):
    """Token embedding, a stack of blocks, final norm: returns hidden states."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                lora_ids=None):
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
            x = layer(x, cos, sin, mask, past_key_values, lora_ids)
        return self.norm(x), past_key_values


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with a language-model head (tied to the embedding, as upstream)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lora_names: list[str] = []  # adapter names; their position is the lora_ids value that selects them
        self.post_init()

    def add_lora(self, name: str, tensors: dict[str, torch.Tensor]) -> int:
        """Attach an upstream LoRA adapter (``{module}.lora.A.weight`` [rank, in], ``.lora.B.weight`` [out, rank],
        scale 1) under ``name`` and return its index; layers it does not touch get a zero update."""
        if name in self.lora_names:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        layers = {n: m for n, m in self.named_modules() if isinstance(m, LoRALinear)}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, sep, part = key.removeprefix("module.").rpartition(".lora.")
            if not sep or part not in ("A.weight", "B.weight"):
                raise ValueError(f"{key!r} is not a LoRA tensor (expected '<layer>.lora.A.weight' / '.lora.B.weight')")
            if module not in layers:
                raise ValueError(f"adapter targets {module!r}; supported: the attention projections "
                                 "(self_attn.q_proj/k_proj/v_proj/o_proj) of this model's layers")
            pairs.setdefault(module, {})[part[0]] = tensor
        for module, ab in pairs.items():
            layer = layers[module]
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None or a.shape[1] != layer.in_features or b.shape != (layer.out_features, a.shape[0]):
                raise ValueError(f"{module}: LoRA A {tuple(a.shape) if a is not None else None} / B "
                                 f"{tuple(b.shape) if b is not None else None} do not fit a "
                                 f"{layer.in_features}->{layer.out_features} layer")
        if not pairs:
            raise ValueError("no LoRA tensors found")
        for module, layer in layers.items():
            ab = pairs.get(module)
            zero = (layer.weight.new_zeros(1, layer.in_features), layer.weight.new_zeros(layer.out_features, 1))
            layer.add_adapter(*((ab["A"], ab["B"]) if ab else zero))
        self.lora_names.append(name)
        return len(self.lora_names) - 1

    def merge_lora(self, name: str) -> None:
        """Fold adapter ``name`` into the weights (W + B A, as upstream's merge_lora) and drop every adapter."""
        index = self.lora_names.index(name)
        with torch.no_grad():
            for layer in self.modules():
                if isinstance(layer, LoRALinear):
                    a, b = layer.adapter(index)
                    layer.weight += b @ a
                    layer.lora_A, layer.lora_B, layer.lora_rank = layer.lora_A[:0], layer.lora_B[:, :0], 0
        self.lora_names.clear()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        lora_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``lora_ids`` [batch]: the adapter (index into ``lora_names``) each row runs with, -1 for the base model."""
        hidden, past_key_values = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                             lora_ids)
        logits = self.lm_head(hidden[:, -logits_to_keep:])
        loss = None
        if labels is not None:  # next-token loss; label -100 marks tokens that are not trained on
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
