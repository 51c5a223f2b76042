"""Export MiniMind to an architecture vLLM serves natively: Llama (MiniMind2) or Qwen3 (MiniMind-3).

vLLM refuses the custom ``MiniMindForCausalLM`` ("not a registered model", upstream issues #352, #405).
MiniMind's parameter names and maths already are Llama's (MiniMind2) or Qwen3's (MiniMind-3, q/k-norm), so
exporting is a config translation plus a re-save: no ``--trust-remote-code``, no weight surgery.

    python -m minimind_course.export --model PATH --out DIR      # no --model: the bundled MiniMind-Tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from minimind_course.model.loading import BUNDLED_MODEL_DIR, ModelLoadError, load_model
from minimind_course.paths import CACHE_DIR

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Bump when the exported files change, so cached exports (see cached_export) are rebuilt.
EXPORT_FORMAT_VERSION = "1"
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


def vllm_native_config(config: PreTrainedConfig, qk_norm: bool, dtype: torch.dtype) -> LlamaConfig | Qwen3Config:
    """Translate a MiniMind config into the Llama (no q/k-norm) or Qwen3 (q/k-norm) config vLLM knows."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if rope_parameters.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope_parameters.get('rope_type')!r} is not supported by this export")
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
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(config)},
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=dtype,
    )
    if qk_norm:
        return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"], use_sliding_window=False)
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"], mlp_bias=False)


def to_vllm_native(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM | Qwen3ForCausalLM:
    """The same network as a transformers Llama/Qwen3 model; ``strict=True`` proves every weight found its place."""
    qk_norm = has_qk_norm(model)
    config = vllm_native_config(model.config, qk_norm, dtype)
    with torch.device("meta"):
        native = (Qwen3ForCausalLM if qk_norm else LlamaForCausalLM)(config)
    state_dict = {k: v.detach().to(device="cpu", dtype=dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:  # stored once; vLLM and transformers re-tie lm_head to the embedding
        state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])
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
) -> Path:
    """Write a Llama/Qwen3 transformers folder (config, safetensors, tokenizer, chat template, generation config).

    ``model_path`` None exports the bundled MiniMind-Tiny. ``dtype`` float32 (default: CPU vLLM and the parity
    tests use it) or bfloat16/float16 (half the size, for GPU serving).
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    model, tokenizer = load_model(model_path, device="cpu", dtype=torch_dtype)
    native = to_vllm_native(model, torch_dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    native.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _add_legacy_rope_theta(out / "config.json")
    return out


def _add_legacy_rope_theta(config_file: Path) -> None:
    """Also write the flat ``rope_theta`` that transformers 4.x (used by older vLLM builds) reads."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def source_fingerprint(model_path: str | Path | None, dtype: str = "float32") -> str:
    """A short hash of the source checkpoint's bytes (file or folder), the dtype and the export format."""
    path = Path(model_path).expanduser() if model_path is not None else BUNDLED_MODEL_DIR
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    digest = hashlib.sha256(f"{EXPORT_FORMAT_VERSION}:{dtype}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode("utf-8"))
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cached_export(
    model_path: str | Path | None = None, cache_dir: str | Path | None = None, *, dtype: str = "float32"
) -> Path:
    """Export once per source content: reuse ``cache_dir/<fingerprint>`` when it exists, else build it atomically."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache / source_fingerprint(model_path, dtype)
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        export_for_vllm(model_path, staging, dtype=dtype)
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
    args = parser.parse_args(argv)
    try:
        out = export_for_vllm(args.model, args.out, dtype=args.dtype)
    except (ModelLoadError, ExportError, OSError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    architecture = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"exported {architecture} to {out}")
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {out} --served-model-name minimind")
    return 0
