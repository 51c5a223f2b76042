"""An independent re-implementation of upstream MiniMind's forward pass, for parity tests.

Written from jingyaogong/minimind's ``model/model_minimind.py`` (HEAD for MiniMind-3 and MiniMind-3-MoE, commit
c090b69 for MiniMind2 and MiniMind2-MoE) and ``model/model_lora.py``: the same RoPE tables (``precompute_freqs_cis``
with YaRN), explicit repeat_kv attention with an additive causal mask, upstream's two MoE loops (MiniMind-3's
per-expert mask loop; MiniMind2's ``moe_infer`` argsort/bincount loop) and LoRA as ``W x + B(A(x))``. It works on
a plain state dict, shares no code with ``minimind_course``, and also builds random upstream-format weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UPSTREAM_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
                 "attention_factor": 1.0, "type": "yarn"}


def precompute_freqs_cis(dim: int, end: int, rope_base: float, rope_scaling: dict | None):
    """Upstream's RoPE tables, line for line."""
    freqs, attn_factor = 1.0 / (rope_base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim)), 1.0
    if rope_scaling is not None:
        orig_max, factor, beta_fast, beta_slow, attn_factor = (
            rope_scaling.get("original_max_position_embeddings", 2048), rope_scaling.get("factor", 16),
            rope_scaling.get("beta_fast", 32.0), rope_scaling.get("beta_slow", 1.0),
            rope_scaling.get("attention_factor", 1.0))
        if end / orig_max > 1.0:
            inv_dim = lambda b: (dim * math.log(orig_max / (b * 2 * math.pi))) / (2 * math.log(rope_base))
            low, high = max(math.floor(inv_dim(beta_fast)), 0), min(math.ceil(inv_dim(beta_slow)), dim // 2 - 1)
            ramp = torch.clamp((torch.arange(dim // 2).float() - low) / max(high - low, 0.001), 0, 1)
            freqs = freqs * (1 - ramp + ramp / factor)
    t = torch.arange(end)
    freqs = torch.outer(t, freqs).float()
    cos = torch.cat([torch.cos(freqs), torch.cos(freqs)], dim=-1) * attn_factor
    sin = torch.cat([torch.sin(freqs), torch.sin(freqs)], dim=-1) * attn_factor
    return cos, sin


def _rms(x, w, eps):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _linear(x, sd, name, lora):
    """nn.Linear, plus upstream's LoRA ``B(A(x))`` when the adapter has this layer."""
    out = x @ sd[name + ".weight"].T
    if lora is not None and f"{name}.lora.A.weight" in lora:
        out = out + (x @ lora[f"{name}.lora.A.weight"].float().T) @ lora[f"{name}.lora.B.weight"].float().T
    return out


def _ffn(x, sd, p):
    return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def _moe_v3(x, sd, p, c):
    """MiniMind-3 ``MOEFeedForward.forward`` (inference)."""
    scores = F.softmax(x @ sd[p + "gate.weight"].T, dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=c["top_k"], dim=-1, sorted=False)
    if c["norm_topk_prob"]:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    y = torch.zeros_like(x)
    for i in range(c["experts"]):
        mask = topk_idx == i
        if mask.any():
            token_idx = mask.any(dim=-1).nonzero().flatten()
            weight = topk_weight[mask].view(-1, 1)
            y.index_add_(0, token_idx, _ffn(x[token_idx], sd, f"{p}experts.{i}.") * weight)
    return y


def _moe_v2(x, sd, p, c):
    """MiniMind2 ``MoEGate`` + ``MOEFeedForward.moe_infer`` + shared experts (inference)."""
    scores = (x @ sd[p + "gate.weight"].T).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=c["top_k"], dim=-1, sorted=False)
    if c["top_k"] > 1 and c["norm_topk_prob"]:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    flat_idx, flat_w = topk_idx.view(-1), topk_weight.view(-1, 1)
    cache = torch.zeros_like(x)
    idxs = flat_idx.argsort()
    tokens_per_expert = flat_idx.bincount().cpu().numpy().cumsum(0)
    token_idxs = idxs // c["top_k"]
    for i, end in enumerate(tokens_per_expert):
        start = 0 if i == 0 else tokens_per_expert[i - 1]
        if start == end:
            continue
        exp_token_idx = token_idxs[start:end]
        out = _ffn(x[exp_token_idx], sd, f"{p}experts.{i}.")
        out.mul_(flat_w[idxs[start:end]])
        cache.scatter_add_(0, exp_token_idx.view(-1, 1).repeat(1, x.shape[-1]), out)
    for j in range(c["shared"]):
        cache = cache + _ffn(x, sd, f"{p}shared_experts.{j}.")
    return cache


@torch.no_grad()
def reference_logits(sd: dict, c: dict, ids: torch.Tensor, lora: dict | None = None) -> torch.Tensor:
    """Upstream's logits for token ids [batch, seq] (no padding, no cache); ``c`` as made by ``random_upstream``."""
    sd = {k: v.float() for k, v in sd.items()}
    batch, seq = ids.shape
    hd, heads, kv = c["head_dim"], c["heads"], c["kv_heads"]
    cos, sin = precompute_freqs_cis(hd, c["max_position_embeddings"], 1e6, UPSTREAM_YARN if c["yarn"] else None)
    cos, sin = cos[:seq], sin[:seq]
    h = sd["model.embed_tokens.weight"][ids]
    for layer in range(c["layers"]):
        p = f"model.layers.{layer}."
        x = _rms(h, sd[p + "input_layernorm.weight"], c["eps"])
        q = _linear(x, sd, p + "self_attn.q_proj", lora).view(batch, seq, heads, hd)
        k = _linear(x, sd, p + "self_attn.k_proj", lora).view(batch, seq, kv, hd)
        v = _linear(x, sd, p + "self_attn.v_proj", lora).view(batch, seq, kv, hd)
        if c["qk_norm"]:
            q = _rms(q, sd[p + "self_attn.q_norm.weight"], c["eps"])
            k = _rms(k, sd[p + "self_attn.k_norm.weight"], c["eps"])
        q = q * cos[None, :, None] + _rotate_half(q) * sin[None, :, None]
        k = k * cos[None, :, None] + _rotate_half(k) * sin[None, :, None]
        rep = heads // kv
        k = k[:, :, :, None].expand(batch, seq, kv, rep, hd).reshape(batch, seq, heads, hd)
        v = v[:, :, :, None].expand(batch, seq, kv, rep, hd).reshape(batch, seq, heads, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        scores = scores + torch.full((seq, seq), float("-inf")).triu(1)
        attn = (F.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
        h = h + _linear(attn, sd, p + "self_attn.o_proj", lora)
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], c["eps"])
        if c["moe"] is None:
            h = h + _ffn(x, sd, p + "mlp.")
        else:
            moe = _moe_v3 if c["moe"] == "v3" else _moe_v2
            h = h + moe(x.reshape(-1, x.shape[-1]), sd, p + "mlp.", c).view_as(x)
    h = _rms(h, sd["model.norm.weight"], c["eps"])
    return h @ sd["model.embed_tokens.weight"].T


def random_upstream(generation: int, *, moe: bool, hidden=64, heads=4, kv_heads=2, layers=2, vocab=300,
                    inter=96, experts=4, top_k=None, shared=1, yarn=False, max_position_embeddings=32768,
                    norm_topk_prob=True, seed=0) -> tuple[dict, dict]:
    """Random weights in upstream's key layout (``generation`` 2 or 3) and the reference's settings."""
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads

    def w(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 0.5 + torch.rand(n, generator=g)

    def ffn(prefix):
        return {prefix + "gate_proj.weight": w(inter, hidden, std=0.1),
                prefix + "up_proj.weight": w(inter, hidden, std=0.1),
                prefix + "down_proj.weight": w(hidden, inter, std=0.1)}

    sd = {"model.embed_tokens.weight": w(vocab, hidden, std=0.5), "model.norm.weight": norm(hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        sd.update({p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
                   p + "self_attn.q_proj.weight": w(heads * hd, hidden, std=0.2),
                   p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden, std=0.2),
                   p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden, std=0.2),
                   p + "self_attn.o_proj.weight": w(hidden, heads * hd, std=0.2)})
        if generation == 3:
            sd.update({p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
        if not moe:
            sd.update(ffn(p + "mlp."))
            continue
        sd[p + "mlp.gate.weight"] = w(experts, hidden, std=0.5)  # decisive routing: the choice matters
        for e in range(experts):
            sd.update(ffn(f"{p}mlp.experts.{e}."))
        for j in range(shared if generation == 2 else 0):
            sd.update(ffn(f"{p}mlp.shared_experts.{j}."))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    config = {"generation": generation, "head_dim": hd, "heads": heads, "kv_heads": kv_heads, "layers": layers,
              "eps": 1e-6 if generation == 3 else 1e-5, "qk_norm": generation == 3, "yarn": yarn,
              "max_position_embeddings": max_position_embeddings, "hidden": hidden, "vocab": vocab, "inter": inter,
              "moe": (f"v{generation}" if moe else None), "experts": experts,
              "top_k": top_k or (1 if generation == 3 else 2), "shared": shared if generation == 2 else 0,
              "norm_topk_prob": norm_topk_prob}
    return sd, config


def upstream_config_json(c: dict) -> dict:
    """The config.json upstream's ``save_pretrained`` writes for these settings (its own field names)."""
    cfg = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
           "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                        "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
           "hidden_size": c["hidden"], "num_hidden_layers": c["layers"], "vocab_size": c["vocab"],
           "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "intermediate_size": c["inter"],
           "rms_norm_eps": c["eps"], "rope_theta": 1e6, "max_position_embeddings": c["max_position_embeddings"],
           "flash_attn": True, "dropout": 0.0, "use_moe": c["moe"] is not None, "hidden_act": "silu",
           "inference_rope_scaling": c["yarn"], "rope_scaling": dict(UPSTREAM_YARN) if c["yarn"] else None,
           "bos_token_id": 1, "eos_token_id": 2, "norm_topk_prob": c["norm_topk_prob"],
           "num_experts_per_tok": c["top_k"], "tie_word_embeddings": True, "transformers_version": "4.57.1"}
    if c["generation"] == 3:
        cfg.update(head_dim=c["head_dim"], num_experts=c["experts"], moe_intermediate_size=c["inter"],
                   router_aux_loss_coef=5e-4)
    else:
        cfg.update(n_routed_experts=c["experts"], n_shared_experts=c["shared"], scoring_func="softmax",
                   aux_loss_alpha=0.01, seq_aux=True)
    return cfg


def random_lora(sd: dict, rank: int, seed: int, targets=("q_proj", "o_proj")) -> dict:
    """An upstream adapter: A/B on every square linear (MiniMind: q_proj, o_proj), fp16 as ``save_lora`` writes."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in sd.items():
        name = key.removesuffix(".weight")
        if any(name.endswith("self_attn." + t) for t in targets) and weight.shape[0] == weight.shape[1]:
            lora[f"{name}.lora.A.weight"] = (torch.randn(rank, weight.shape[1], generator=g) * 0.3).half()
            lora[f"{name}.lora.B.weight"] = (torch.randn(weight.shape[0], rank, generator=g) * 0.3).half()
    return lora
