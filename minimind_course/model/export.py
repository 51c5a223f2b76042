"""Export MiniMind to an architecture vLLM serves natively: Llama (MiniMind2), Qwen3 (MiniMind-3),
Qwen3-MoE (MiniMind-3-MoE) or DeepSeek-MoE v1 (MiniMind2-MoE, shared experts); LoRA adapters as PEFT folders.

vLLM refuses the custom ``MiniMindForCausalLM`` ("not a registered model", upstream issues #352, #405).
MiniMind's parameter names and maths already are those architectures', so exporting is a config translation plus
a re-save: no ``--trust-remote-code``. Upstream's YaRN becomes the ``yarn`` rope_parameters vLLM and transformers
compute identically (checked here, refused otherwise).

    python -m minimind_course.export --model PATH --out DIR      # no --model: the bundled MiniMind-Tiny
    python -m minimind_course.export --model BASE --lora medical=lora_medical_768.pth --out DIR   # + PEFT folder
    python -m minimind_course.export --model BASE --merge-lora lora_medical_768.pth --out DIR     # folded in
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from minimind_course.model.loading import (
    BUNDLED_MODEL_DIR,
    ROPE_SCALING_CHOICES,
    ModelLoadError,
    load_model,
    read_lora,
)
from minimind_course.model.minimind import MiniMindForCausalLM, yarn_correction_range
from minimind_course.paths import CACHE_DIR

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Bump when the exported files change, so cached exports (see cached_export) are rebuilt.
EXPORT_FORMAT_VERSION = "2"
DEFAULT_CACHE_DIR = CACHE_DIR / "vllm-export"


class ExportError(ValueError):
    """The model cannot be exported; the message says why."""


def has_qk_norm(model: PreTrainedModel) -> bool:
    """MiniMind-3 (Qwen3-like) carries a per-head RMSNorm on queries and keys; MiniMind2 does not."""
    return any(name.endswith("self_attn.q_norm.weight") for name in model.state_dict())


def _rope_theta(config: PreTrainedConfig) -> float:
    """RoPE base, whether the config keeps it flat (MiniMind) or in transformers 5's ``rope_parameters``."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ExportError("the model config has no rope_theta")
    return float(theta)


def vllm_rope_parameters(config: PreTrainedConfig) -> dict:
    """RoPE settings for vLLM/transformers: plain, or upstream's YaRN as ``rope_type: yarn``.

    vLLM's and transformers' YaRN equal upstream's formula when ``attention_factor`` is given (else they derive
    0.1 ln(factor) + 1) and the ramp's end is not clamped (upstream clamps it to head_dim/2 - 1, they to
    head_dim - 1); upstream also skips YaRN when the context is not longer than the original one."""
    theta = _rope_theta(config)
    yarn = getattr(config, "yarn", None)
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if rope_parameters.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope_parameters.get('rope_type')!r} is not supported by this export")
    if yarn is None or config.max_position_embeddings <= yarn["original_max_position_embeddings"]:
        return {"rope_type": "default", "rope_theta": theta}
    low, high = yarn_correction_range(config.head_dim, theta, yarn)
    original, half = yarn["original_max_position_embeddings"], config.head_dim // 2
    unclamped = math.ceil(config.head_dim * math.log(original / (yarn["beta_slow"] * 2 * math.pi))
                          / (2 * math.log(theta)))
    if high != min(unclamped, config.head_dim - 1) or low >= half:
        raise ExportError(f"this YaRN setting (head_dim {config.head_dim}, beta_slow {yarn['beta_slow']}) hits "
                          "upstream's ramp clamp at head_dim/2 - 1, which vLLM's yarn does not apply: the exported "
                          "model would compute different logits")
    if config.max_position_embeddings != yarn["factor"] * original:
        raise ExportError(f"vLLM's yarn serves factor x original = {yarn['factor'] * original} positions, but this "
                          f"model's max_position_embeddings is {config.max_position_embeddings}")
    return {"rope_type": "yarn", "rope_theta": theta, "factor": float(yarn["factor"]),
            "original_max_position_embeddings": original, "beta_fast": float(yarn["beta_fast"]),
            "beta_slow": float(yarn["beta_slow"]), "attention_factor": float(yarn["attention_factor"]),
            "truncate": True}


def vllm_native_config(config: PreTrainedConfig, qk_norm: bool, dtype: torch.dtype) -> PreTrainedConfig:
    """Translate a MiniMind config into the config of the vLLM-native architecture that computes the same:
    Llama (MiniMind2), Qwen3 (q/k-norm), Qwen3-MoE (MiniMind-3-MoE), DeepSeek-MoE v1 (MiniMind2-MoE)."""
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=vllm_rope_parameters(config),
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=dtype,
    )
    if getattr(config, "use_moe", False):
        moe = dict(num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob)
        if qk_norm and not config.n_shared_experts:
            return Qwen3MoeConfig(**common, **moe, num_experts=config.num_experts, decoder_sparse_step=1,
                                  mlp_only_layers=[], use_sliding_window=False, architectures=["Qwen3MoeForCausalLM"])
        if qk_norm:
            raise ExportError("a MoE model with both q/k-norm and shared experts matches no vLLM architecture")
        return deepseek_moe_config(common, moe, config)
    if qk_norm:
        return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"], use_sliding_window=False)
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"], mlp_bias=False)


# DeepSeek-MoE v1's config class is not part of transformers: vLLM reads it through this file (--trust-remote-code).
DEEPSEEK_CONFIG_CODE = '''"""DeepSeek-MoE v1 config (model_type "deepseek"): each config.json field is an attribute."""
from transformers import PretrainedConfig


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
'''


class DeepseekMoeConfig(PreTrainedConfig):
    """DeepSeek-MoE v1's config (upstream ships it as remote code); written with DEEPSEEK_CONFIG_CODE next to it."""

    model_type = "deepseek"


def deepseek_moe_config(common: dict, moe: dict, config: PreTrainedConfig) -> DeepseekMoeConfig:
    """MiniMind2-MoE as vLLM's ``DeepseekForCausalLM`` (DeepSeek-MoE v1): plain multi-head attention, softmax
    router, top-k, renormalised like upstream, routed scale 1, every layer MoE, and the shared experts summed as one
    MLP n_shared times as wide (the same sum of SwiGLUs)."""
    if common["head_dim"] * config.num_attention_heads != config.hidden_size:
        raise ExportError("DeepSeek-MoE v1 needs head_dim = hidden_size / num_attention_heads")
    fields = {k: v for k, v in common.items() if k not in ("head_dim", "attention_bias", "rope_parameters", "dtype")}
    fields["tie_word_embeddings"] = False  # lm_head is written out: vLLM's DeepSeek does not re-tie it
    rope = common["rope_parameters"]
    return DeepseekMoeConfig(
        **fields, **moe, rope_theta=rope["rope_theta"],
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None,
        n_routed_experts=config.num_experts, n_shared_experts=config.n_shared_experts or None,
        first_k_dense_replace=0, moe_layer_freq=1, routed_scaling_factor=1.0, scoring_func="softmax",
        topk_method="greedy", architectures=["DeepseekForCausalLM"], torch_dtype=str(common["dtype"]).split(".")[1],
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig"},
    )


def _native_state_dict(model: PreTrainedModel, config: PreTrainedConfig, dtype: torch.dtype) -> dict:
    """Our weights under the native architecture's names: fused experts for transformers' Qwen3-MoE (it saves them
    per expert again), shared experts as one MLP for DeepSeek; everything else keeps its name."""
    state = {k: v.detach().to(device="cpu", dtype=dtype) for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # stored once when tied
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        if isinstance(config, Qwen3MoeConfig):
            experts = range(config.num_experts)
            gate = torch.stack([state.pop(f"{p}experts.{e}.gate_proj.weight") for e in experts])
            up = torch.stack([state.pop(f"{p}experts.{e}.up_proj.weight") for e in experts])
            state[f"{p}experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            down = [state.pop(f"{p}experts.{e}.down_proj.weight") for e in experts]
            state[f"{p}experts.down_proj"] = torch.stack(down)
        if isinstance(config, DeepseekMoeConfig) and config.n_shared_experts:
            shared = range(config.n_shared_experts)
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                state[f"{p}shared_experts.{proj}.weight"] = torch.cat(
                    [state.pop(f"{p}shared_experts.{j}.{proj}.weight") for j in shared], dim=dim)
    return state


def to_vllm_native(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel | dict:
    """The same network as a transformers Llama/Qwen3/Qwen3-MoE model (``strict=True`` proves every weight found
    its place), or, for DeepSeek-MoE v1 (no transformers class), its config plus state dict to save as is."""
    qk_norm = has_qk_norm(model)
    config = vllm_native_config(model.config, qk_norm, dtype)
    state_dict = _native_state_dict(model, config, dtype)
    if isinstance(config, DeepseekMoeConfig):
        return {"config": config, "state_dict": state_dict, "generation_config": _generation_config(model)}
    cls = {LlamaConfig: LlamaForCausalLM, Qwen3Config: Qwen3ForCausalLM, Qwen3MoeConfig: Qwen3MoeForCausalLM}
    with torch.device("meta"):
        native = cls[type(config)](config)
    native.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        native.tie_weights()
    native.generation_config = _generation_config(model)
    return native.eval()


# vLLM turns a generation_config max_new_tokens into a server-wide output cap; our server ignores it, so it is
# not exported (to get that cap, pass --override-generation-config '{"max_new_tokens": N}' to vLLM).
NOT_EXPORTED_GENERATION_KEYS = ("max_new_tokens", "max_length", "transformers_version")


def _generation_config(model: PreTrainedModel) -> GenerationConfig:
    """Special-token ids for vLLM's stop logic plus the source's sampling defaults (temperature, top_p, ...)."""
    source = model.generation_config.to_diff_dict() if model.generation_config is not None else {}
    for key in NOT_EXPORTED_GENERATION_KEYS:
        source.pop(key, None)
    config = GenerationConfig(**source)
    config.bos_token_id = model.config.bos_token_id
    config.eos_token_id = model.config.eos_token_id
    config.pad_token_id = model.config.pad_token_id
    return config


def export_for_vllm(
    model_path: str | Path | None = None,
    out_dir: str | Path = "minimind-vllm",
    *,
    dtype: str = "float32",
    rope_scaling: str | None = None,
    lora: dict[str, str | Path] | None = None,
    merge_lora: str | Path | None = None,
) -> Path:
    """Write a vLLM-native transformers folder (config, safetensors, tokenizer, chat template, generation config).

    ``model_path`` None exports the bundled MiniMind-Tiny. ``dtype`` float32 (default: CPU vLLM and the parity
    tests use it) or bfloat16/float16 (half the size, for GPU serving). ``rope_scaling="yarn"``: upstream's YaRN for
    a ``.pth``. ``lora`` {name: adapter .pth}: each adapter also goes to ``out/lora/<name>`` as a PEFT folder (for
    vLLM's ``--lora-modules name=path``). ``merge_lora``: an adapter .pth folded into the exported weights instead.
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    model, tokenizer = load_model(model_path, device="cpu", rope_scaling=rope_scaling)  # fp32: merge before rounding
    if merge_lora is not None:
        model = merged_with_lora(model, merge_lora)
    native = to_vllm_native(model, torch_dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(native, dict):  # no transformers class: write the files vLLM reads ourselves
        native["config"].save_pretrained(out)
        (out / "configuration_deepseek.py").write_text(DEEPSEEK_CONFIG_CODE, encoding="utf-8")
        native["generation_config"].save_pretrained(out)
        save_file({k: v.clone().contiguous() for k, v in native["state_dict"].items()}, out / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        native.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not isinstance(native, dict):
        _add_legacy_rope_theta(out / "config.json")
    for name, path in (lora or {}).items():
        export_lora_peft(model, name, path, out / "lora" / name, torch_dtype)
    return out


def merged_with_lora(model: PreTrainedModel, adapter: str | Path) -> MiniMindForCausalLM:
    """The model with an upstream adapter folded into its weights (W + B A, scale 1), as upstream's merge_lora."""
    if not isinstance(model, MiniMindForCausalLM):
        raise ExportError(f"LoRA adapters need a MiniMind base model, not {type(model).__name__}")
    try:
        model.add_lora("merged", read_lora(adapter))
    except ValueError as err:
        raise ExportError(f"{adapter}: {err}") from err
    model.merge_lora("merged")
    return model


def export_lora_peft(model: PreTrainedModel, name: str, adapter: str | Path, out: Path, dtype: torch.dtype) -> Path:
    """Write an upstream adapter .pth as a PEFT folder vLLM loads: ``lora_alpha = r`` keeps upstream's scale 1."""
    tensors = read_lora(adapter)
    if not isinstance(model, MiniMindForCausalLM):
        raise ExportError(f"LoRA adapters need a MiniMind base model, not {type(model).__name__}")
    try:
        model.add_lora(name, tensors)  # validates names and shapes against the base
    except ValueError as err:
        raise ExportError(f"{adapter}: {err}") from err
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora.A.weight")}
    if len(ranks) != 1:
        raise ExportError(f"{adapter}: layers of different ranks {sorted(ranks)}; PEFT needs one rank")
    rank = ranks.pop()
    peft = {}
    for key, value in tensors.items():
        module, _, part = key.removeprefix("module.").rpartition(".lora.")
        peft[f"base_model.model.{module}.lora_{part[0]}.weight"] = value.to(dtype).contiguous()
    targets = sorted({k.rpartition(".lora.")[0].rpartition(".")[2] for k in tensors})
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def _add_legacy_rope_theta(config_file: Path) -> None:
    """Also write the flat ``rope_theta`` that transformers 4.x (used by older vLLM builds) reads."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def source_fingerprint(
    model_path: str | Path | None,
    dtype: str = "float32",
    rope_scaling: str | None = None,
    lora: dict[str, str | Path] | None = None,
) -> str:
    """A short hash of the source checkpoint's bytes (file or folder), its adapters' bytes and names, the options
    and the export format."""
    path = Path(model_path).expanduser() if model_path is not None else BUNDLED_MODEL_DIR
    digest = hashlib.sha256(f"{EXPORT_FORMAT_VERSION}:{dtype}:{rope_scaling}".encode())
    for label, source in [("", path)] + [(f"lora:{name}:", Path(p).expanduser()) for name, p in (lora or {}).items()]:
        if not source.exists():
            raise ModelLoadError(f"{source}: no such file or folder")
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for file in files:
            digest.update((label + str(file.relative_to(source) if source.is_dir() else file.name)).encode("utf-8"))
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def cached_export(
    model_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    *,
    dtype: str = "float32",
    rope_scaling: str | None = None,
    lora: dict[str, str | Path] | None = None,
) -> Path:
    """Export once per source content: reuse ``cache_dir/<fingerprint>`` when it exists, else build it atomically."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache / source_fingerprint(model_path, dtype, rope_scaling, lora)
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        export_for_vllm(model_path, staging, dtype=dtype, rope_scaling=rope_scaling, lora=lora)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: export a MiniMind checkpoint for vLLM; errors are one line on stderr and exit code 1."""
    parser = argparse.ArgumentParser(
        prog="python -m minimind_course.export",
        description="Export MiniMind as a Llama/Qwen3 folder that vLLM serves without --trust-remote-code.",
    )
    parser.add_argument("--model", help="a .pth state dict or a transformers folder (default: bundled MiniMind-Tiny)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="weight dtype (default: float32)")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALING_CHOICES, default=None,
                        help="upstream's YaRN for a .pth (a folder's config.json says it itself)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="also write this upstream adapter .pth as a PEFT folder OUT/lora/NAME (repeatable)")
    parser.add_argument("--merge-lora", metavar="PATH", help="fold this upstream adapter .pth into the weights")
    args = parser.parse_args(argv)
    try:
        out = export_for_vllm(args.model, args.out, dtype=args.dtype, rope_scaling=args.rope_scaling,
                              lora=parse_lora_modules(args.lora), merge_lora=args.merge_lora)
    except (ModelLoadError, ExportError, OSError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    architecture = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"exported {architecture} to {out}")
    loras = "".join(f" {name}={out / 'lora' / name}" for name in parse_lora_modules(args.lora))
    lora_flags = f" --enable-lora --lora-modules{loras}" if loras else ""
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {out} --served-model-name minimind"
          f"{lora_flags}")
    return 0


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """``["name=path", ...]`` (as vLLM's --lora-modules) to {name: path}; a bad or repeated name is an ExportError."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ExportError(f"--lora expects NAME=PATH, not {spec!r}")
        if name in adapters:
            raise ExportError(f"--lora name {name!r} is given twice")
        adapters[name.strip()] = path.strip()
    return adapters


if __name__ == "__main__":
    sys.exit(main())
