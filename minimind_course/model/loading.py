"""Load a MiniMind model and its tokenizer from any of the formats a learner meets.

``load_model()`` with no path gives the bundled MiniMind-Tiny. A path may be an upstream ``.pth`` state dict
(config inferred from tensor shapes), a MiniMind transformers folder (``model_type: minimind``), or a
Llama/Qwen3 transformers folder such as our own vLLM export. Every upstream kind is recognised from its weights
and config: MiniMind2 / MiniMind-3, dense or mixture-of-experts, YaRN rope scaling, and LoRA adapter ``.pth``
files attached next to a base. Config fields that would change the computation but are not implemented are
refused with one line, never ignored. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.model.minimind import UPSTREAM_YARN, MiniMindConfig, MiniMindForCausalLM
from minimind_course.paths import BUNDLED_MODEL_DIR

UPSTREAM_NUM_HEADS = 8
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"model\.layers\.0\.mlp\.(experts|shared_experts)\.(\d+)\.")
ROPE_SCALING_CHOICES = ("yarn",)
SUPPORTED_KINDS = ("MiniMind2 / MiniMind-3, dense or MoE (.pth or transformers folder), YaRN rope scaling, "
                   "LoRA adapter .pth files, Llama/Qwen3/Qwen3-MoE folders")
# Fields upstream writes that only matter for training or pick a kernel, never the result: read and ignored.
IGNORED_UPSTREAM_FIELDS = {"dropout", "flash_attn", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "max_seq_len",
                           "torch_dtype"}
# Fields that change the computation: each is translated below, so a config is loaded exactly or refused.
MODEL_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "qk_norm", "hidden_act", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "yarn", "inference_rope_scaling", "rope_scaling", "rope_parameters",
                "use_moe", "num_experts", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "moe_intermediate_size", "norm_topk_prob", "scoring_func", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "use_cache"}


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


def expert_counts(keys) -> tuple[int, int]:
    """(routed experts, shared experts) of layer 0, counted from the key names."""
    found: dict[str, set[int]] = {"experts": set(), "shared_experts": set()}
    for key in keys:
        if m := _EXPERT_KEY.match(key):
            found[m.group(1)].add(int(m.group(2)))
    return len(found["experts"]), len(found["shared_experts"])


def moe_fields(keys, qk_norm: bool, top_k: int | None, norm_topk_prob: bool = True) -> dict:
    """MiniMindConfig MoE fields from the weights; ``top_k`` None means the generation's default.

    MiniMind-3-MoE (q/k-norm) routes each token to 1 expert by default and always renormalises the chosen weights;
    MiniMind2-MoE routes to 2 and renormalises only when it picks more than one."""
    routed, shared = expert_counts(keys)
    if not routed:
        return {"use_moe": False}
    top_k = top_k or (1 if qk_norm else 2)
    if not 1 <= top_k <= routed:
        raise ModelLoadError(f"num_experts_per_tok must be between 1 and the {routed} experts, not {top_k}")
    return {"use_moe": True, "num_experts": routed, "n_shared_experts": shared, "num_experts_per_tok": top_k,
            "norm_topk_prob": norm_topk_prob and (qk_norm or top_k > 1)}


def infer_config(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int = UPSTREAM_NUM_HEADS,
    *,
    num_experts_per_tok: int | None = None,
    rope_scaling: str | None = None,
) -> MiniMindConfig:
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
    moe = moe_fields(state_dict, qk_norm, num_experts_per_tok)
    mlp = "model.layers.0.mlp." + ("experts.0." if moe["use_moe"] else "")
    width = state_dict[mlp + "gate_proj.weight"].shape[0]
    return MiniMindConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=state_dict[attn + "k_proj.weight"].shape[0] // head_dim,
        head_dim=head_dim,
        intermediate_size=width,
        moe_intermediate_size=width,
        qk_norm=qk_norm,
        yarn=_yarn(rope_scaling),
        **moe,
    )


def _yarn(rope_scaling: str | None) -> dict | None:
    if rope_scaling is None:
        return None
    if rope_scaling not in ROPE_SCALING_CHOICES:
        raise ModelLoadError(f"rope_scaling must be one of {', '.join(ROPE_SCALING_CHOICES)} or None, "
                             f"not {rope_scaling!r}")
    return dict(UPSTREAM_YARN)


def minimind_config(raw: dict, keys: list[str], source: Path, rope_scaling: str | None = None) -> MiniMindConfig:
    """Translate a MiniMind ``config.json`` (upstream's, either generation, or ours) into a MiniMindConfig.

    The weights decide q/k-norm and the expert counts; every field that changes the maths is either honoured or
    refused with one line naming the file, so nothing is silently computed differently from upstream."""
    where = f"{source / 'config.json'}"
    standard = set(PreTrainedConfig().to_dict())
    unknown = sorted(set(raw) - MODEL_FIELDS - IGNORED_UPSTREAM_FIELDS - standard - {"auto_map", "architectures"})
    if unknown:
        raise ModelLoadError(f"{where}: unknown fields {', '.join(unknown)} (a vision or other variant?); "
                             f"supported: {SUPPORTED_KINDS}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (MiniMind uses silu)")
    if raw.get("scoring_func", "softmax") != "softmax":
        raise ModelLoadError(f"{where}: MoE scoring_func {raw['scoring_func']!r} is not supported (only softmax)")
    fields = {k: raw[k] for k in MODEL_FIELDS & raw.keys() & set(MiniMindConfig.__dataclass_fields__)}
    fields["yarn"] = _config_yarn(raw, where) or _yarn(rope_scaling)
    fields.pop("rope_parameters", None)
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in keys)  # the weights decide
    fields["qk_norm"] = qk_norm
    if raw.get("use_moe") and not is_moe(keys):
        raise ModelLoadError(f"{where}: use_moe is true but the weights hold no experts")
    for name in ("num_experts", "n_shared_experts", "use_moe"):
        fields.pop(name, None)
    moe = moe_fields(keys, qk_norm, raw.get("num_experts_per_tok"), raw.get("norm_topk_prob", True))
    fields.update(moe)
    if not moe["use_moe"]:
        fields.pop("num_experts_per_tok", None)
    elif "moe_intermediate_size" not in raw:  # MiniMind2-MoE experts are as wide as its dense MLP
        fields["moe_intermediate_size"] = raw.get("intermediate_size")
    return MiniMindConfig(**fields)


def _config_yarn(raw: dict, where: str) -> dict | None:
    """YaRN parameters a MiniMind config asks for: upstream switches with ``inference_rope_scaling`` (its
    ``rope_scaling`` values are fixed in code), ours stores ``yarn``; anything else is refused, not ignored."""
    if raw.get("yarn"):
        return dict(raw["yarn"])
    stated = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    stated = {k: v for k, v in stated.items() if k not in ("rope_theta",)}
    kind = stated.get("rope_type", stated.get("type", "default"))
    if raw.get("inference_rope_scaling"):
        extra = {k: v for k, v in stated.items() if k not in ("type", "rope_type") and UPSTREAM_YARN.get(k) != v}
        if kind not in ("yarn", "default") or extra:
            raise ModelLoadError(f"{where}: rope_scaling {stated} differs from the YaRN parameters upstream computes "
                                 f"with when inference_rope_scaling is true ({UPSTREAM_YARN}); fix or remove it")
        return dict(UPSTREAM_YARN)
    if kind != "default":
        raise ModelLoadError(f"{where}: rope_scaling {stated} is set but inference_rope_scaling is not, and upstream "
                             "ignores rope_scaling then; set inference_rope_scaling: true (upstream's YaRN) or "
                             "remove rope_scaling")
    return None


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an upstream LoRA adapter ``.pth`` (``{layer}.lora.A.weight`` / ``.lora.B.weight``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such LoRA adapter file")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({type(err).__name__}: {err})") from err
    if not isinstance(tensors, dict) or not any(".lora." in str(k) for k in tensors):
        raise ModelLoadError(f"{path}: not an upstream LoRA adapter (no '<layer>.lora.A.weight' keys)")
    return {k: v.float() for k, v in tensors.items()}


def attach_lora(model: PreTrainedModel, adapters: dict[str, str | Path]) -> None:
    """Attach each named adapter file to a MiniMind model; select one per row with ``lora_ids``."""
    if adapters and not isinstance(model, MiniMindForCausalLM):
        raise ModelLoadError(f"LoRA adapters need a MiniMind base model, not {type(model).__name__}")
    for name, path in adapters.items():
        tensors = read_lora(path)
        try:
            model.add_lora(name, tensors)
        except ValueError as err:
            raise ModelLoadError(f"{path}: {err}") from err


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


def _load_pth(path: Path, num_attention_heads: int, tokenizer_path: Path | None, **config_options):
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from err
    if isinstance(state_dict, dict) and any(".lora." in str(k) for k in state_dict):
        raise ModelLoadError(f"{path}: a LoRA adapter, not a model; load it next to its base model "
                             "(load_model(BASE, lora=...), or serve --model BASE --lora NAME=PATH)")
    if not isinstance(state_dict, dict) or "model.embed_tokens.weight" not in state_dict:
        raise ModelLoadError(f"{path}: not a MiniMind state dict (no 'model.embed_tokens.weight' key); "
                             f"supported: {SUPPORTED_KINDS}")
    state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])  # tied; some files omit it
    config = infer_config(state_dict, num_attention_heads, **config_options)
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


def _load_folder(folder: Path, dtype: torch.dtype, rope_scaling: str | None):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: not a transformers model folder (no config.json)")
    if (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{folder}: a PEFT LoRA adapter folder, not a model; serve it with vLLM's --lora-modules "
                             "or pass upstream's adapter .pth with --lora")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if model_type != "minimind" and (model_type is None or "minimind" in str(model_type) or "vision_config" in raw):
        raise ModelLoadError(f"{config_file}: model_type {model_type!r} is not supported; supported: {SUPPORTED_KINDS}")
    tokenizer = _load_tokenizer(folder)
    try:
        if model_type == "minimind":
            config = minimind_config(raw, _weight_keys(folder), folder, rope_scaling)
            model = MiniMindForCausalLM.from_pretrained(folder, config=config, dtype=dtype)
        else:  # Llama / Qwen3 / Qwen3-MoE and friends, e.g. our own vLLM export
            if rope_scaling is not None:
                raise ModelLoadError(f"{folder}: rope_scaling applies to MiniMind checkpoints; a {model_type} folder "
                                     "states its own rope scaling in config.json")
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
    rope_scaling: str | None = None,
    num_experts_per_tok: int | None = None,
    lora: str | Path | dict[str, str | Path] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode; no path means the bundled MiniMind-Tiny.

    ``num_attention_heads`` only matters for MiniMind2 ``.pth`` files, whose head count shapes cannot reveal;
    ``num_experts_per_tok`` for MoE ``.pth`` files (default: upstream's, 1 for MiniMind-3-MoE, 2 for MiniMind2-MoE).
    ``rope_scaling="yarn"`` turns on upstream's YaRN (what ``inference_rope_scaling`` does in a folder config).
    ``lora``: an upstream adapter ``.pth`` (named after the file) or ``{name: path}``; the model then runs adapter
    ``i`` for the batch rows where ``lora_ids`` (a forward/generate argument, one id per row) is ``i``, -1 = base.
    """
    path = Path(path).expanduser() if path is not None else BUNDLED_MODEL_DIR
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    transformers.utils.logging.disable_progress_bar()  # loading bars for a few MB are noise in notebooks
    if path.is_dir():
        if num_experts_per_tok is not None:
            raise ModelLoadError(f"{path}: num_experts_per_tok is read from a folder's config.json")
        model, tokenizer = _load_folder(path, dtype, rope_scaling)
    elif path.suffix in (".pth", ".pt", ".bin"):
        model, tokenizer = _load_pth(path, num_attention_heads, Path(tokenizer_path) if tokenizer_path else None,
                                     num_experts_per_tok=num_experts_per_tok, rope_scaling=rope_scaling)
    else:
        raise ModelLoadError(f"{path}: expected a .pth state dict or a transformers folder")
    if lora is not None:
        attach_lora(model, lora if isinstance(lora, dict) else {Path(lora).stem: lora})
    return model.to(device=device, dtype=dtype).eval(), tokenizer
