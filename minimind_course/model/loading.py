"""Load a MiniMind model and its tokenizer from any of the formats a learner meets.

``load_model()`` with no path gives the bundled MiniMind-Tiny. A path may be an upstream ``.pth`` state dict
(config inferred from tensor shapes), a MiniMind transformers folder (``model_type: minimind``), or a
Llama/Qwen3 transformers folder such as our own vLLM export. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.model.minimind import MiniMindConfig, MiniMindForCausalLM
from minimind_course.paths import BUNDLED_MODEL_DIR

UPSTREAM_NUM_HEADS = 8
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file and what is wrong."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The requested dtype, else fp32 on CPU (fp16 matmuls there are slow and lossy), bf16/fp16 on GPUs."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def is_moe(keys) -> bool:
    """Mixture-of-experts checkpoints carry a router (`mlp.gate`) and `mlp.experts.*` weights."""
    return any(".mlp.experts." in k or k.endswith(".mlp.gate.weight") for k in keys)


def infer_config(state_dict: dict[str, torch.Tensor], num_attention_heads: int = UPSTREAM_NUM_HEADS) -> MiniMindConfig:
    """Rebuild a MiniMindConfig from tensor shapes and key names (upstream .pth files store no config)."""
    vocab_size, hidden_size = state_dict["model.embed_tokens.weight"].shape
    num_layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k)))
    attn = "model.layers.0.self_attn."
    qk_norm = attn + "q_norm.weight" in state_dict
    if qk_norm:  # MiniMind-3 stores head_dim in the norm's size, so the head count follows from q_proj
        head_dim = state_dict[attn + "q_norm.weight"].shape[0]
        num_attention_heads = state_dict[attn + "q_proj.weight"].shape[0] // head_dim
    else:
        head_dim = hidden_size // num_attention_heads
    return MiniMindConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=state_dict[attn + "k_proj.weight"].shape[0] // head_dim,
        head_dim=head_dim,
        intermediate_size=state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
        qk_norm=qk_norm,
    )


def _find_tokenizer_dir(checkpoint: Path) -> Path | None:
    """Where upstream keeps the tokenizer: next to the file, or in the repo's `model/` folder."""
    for folder in (checkpoint.parent, checkpoint.parent.parent / "model", checkpoint.parent / "model"):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder}: tokenizer files are unreadable ({err})") from err


def _load_pth(path: Path, num_attention_heads: int, tokenizer_path: Path | None):
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state_dict, dict) or "model.embed_tokens.weight" not in state_dict:
        raise ModelLoadError(f"{path}: not a MiniMind state dict (no 'model.embed_tokens.weight' key)")
    if is_moe(state_dict):
        raise ModelLoadError(f"{path}: mixture-of-experts (MoE) MiniMind checkpoints are not supported; use a dense one")
    state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])  # tied; some files omit it
    config = infer_config(state_dict, num_attention_heads)
    model = MiniMindForCausalLM(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n\t")[1:3]
        raise ModelLoadError(f"{path}: weights do not fit the inferred config ({'; '.join(first)})") from err
    folder = tokenizer_path or _find_tokenizer_dir(path)
    if folder is None:
        if config.vocab_size != len(_load_tokenizer(BUNDLED_MODEL_DIR)):
            raise ModelLoadError(
                f"{path}: no tokenizer next to the checkpoint; pass tokenizer_path= (upstream keeps it in model/)"
            )
        folder = BUNDLED_MODEL_DIR
    return model, _load_tokenizer(folder)


def _weight_keys(folder: Path) -> list[str]:
    """Parameter names stored in a transformers folder, read without loading the tensors when possible."""
    if (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return list(f.keys())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    if (folder / "pytorch_model.bin").is_file():
        return list(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True))
    raise ModelLoadError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")


def _load_folder(folder: Path, dtype: torch.dtype):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: not a transformers model folder (no config.json)")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    tokenizer = _load_tokenizer(folder)
    try:
        if model_type == "minimind":
            keys = _weight_keys(folder)
            if is_moe(keys):
                raise ModelLoadError(f"{folder}: mixture-of-experts (MoE) MiniMind checkpoints are not supported")
            config = MiniMindConfig.from_pretrained(folder)
            config.qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in keys)  # the weights decide
            model = MiniMindForCausalLM.from_pretrained(folder, config=config, dtype=dtype)
        else:  # Llama / Qwen3 and friends, e.g. our own vLLM export
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"{folder}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return model, tokenizer


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_attention_heads: int = UPSTREAM_NUM_HEADS,
    tokenizer_path: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode; no path means the bundled MiniMind-Tiny.

    ``num_attention_heads`` only matters for MiniMind2 ``.pth`` files, whose head count shapes cannot reveal.
    """
    path = Path(path).expanduser() if path is not None else BUNDLED_MODEL_DIR
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    transformers.utils.logging.disable_progress_bar()  # loading bars for a few MB are noise in notebooks
    if path.is_dir():
        model, tokenizer = _load_folder(path, dtype)
    elif path.suffix in (".pth", ".pt", ".bin"):
        model, tokenizer = _load_pth(path, num_attention_heads, Path(tokenizer_path) if tokenizer_path else None)
    else:
        raise ModelLoadError(f"{path}: expected a .pth state dict or a transformers folder")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
