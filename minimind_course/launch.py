"""Process plumbing shared by the CLIs, notebooks, benchmarks and tests: ports, health checks, servers.

* ``free_port`` / ``port_problem`` / ``bind_socket``: pick a port, ask why one cannot be listened on, claim one.
* ``wait_for_health``: poll ``/health`` until it answers 200, the process dies or the time is up.
* ``BackgroundServer``: an ASGI app under uvicorn in a daemon thread (notebooks, tests: ``uvicorn.run`` would block,
  and inside Jupyter it fails because an event loop is already running).
* ``ChildServer``: a server command in its own process group with its log kept in a file (vLLM spawns EngineCore
  and Worker processes that must stop with it); ``ServeProcess`` runs ``python -m minimind_course.serve`` that way.

Only the standard library, httpx and (for ``BackgroundServer``) uvicorn: importing this never imports torch.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: the OS picks); OSError when it cannot be listened on."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on ("Address already in use", ...), or None when it can."""
    try:
        bind_socket(host, port).close()
    except OSError as err:
        return err.strerror or str(err)
    return None


def wait_for_health(root_url: str, *, alive: Callable[[], bool] = lambda: True, timeout: float = 120.0,
                    interval: float = 0.2) -> float:
    """Poll ``root_url/health`` until it answers 200; the seconds waited. RuntimeError if ``alive()`` turns
    False (the process exited) and TimeoutError after ``timeout`` seconds."""
    began = time.monotonic()
    while True:
        if not alive():
            raise RuntimeError(f"the server behind {root_url} exited during start-up")
        try:
            if httpx.get(f"{root_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{root_url}/health did not answer within {timeout:.0f} s")
        time.sleep(interval)


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` in a daemon thread; ``.base_url``, ``.stop()``, context manager.

    The port is bound (port 0: chosen by the OS) before uvicorn starts, so parallel runs never collide."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    @property
    def base_url(self) -> str:
        """``http://host:port`` (append ``/v1`` for OpenAI clients)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving and wait until uvicorn accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.base_url} did not start")
            time.sleep(0.01)
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait for its thread, release the port. Safe to call twice."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()
        atexit.unregister(self.stop)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ChildServer:
    """A server command in its own process group, its output in ``log_path``; ``with ChildServer(...) as s:``.

    ``start`` waits for ``/health``; ``stop`` sends SIGTERM to the whole group, then SIGKILL to whatever is left.
    On Linux the child also gets SIGTERM when this process dies (a killed kernel), so no port stays taken."""

    def __init__(self, command: Sequence[str], *, host: str, port: int, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 120.0, log_path: str | Path | None = None, inherit_output: bool = False,
                 name: str = "server"):
        self.command = list(command)
        self.host, self.port = host, port
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.inherit_output = inherit_output
        self.name = name
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix=f"minimind-{name}-")) / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None  # also the process-group id; kept after stop() for inspection
        self.exit_code: int | None = None
        self.startup_seconds: float | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"{self.root_url}/v1"

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log file ('' when output goes to the terminal or nothing was written)."""
        try:
            with self.log_path.open(encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def start(self) -> ChildServer:
        """Start the command and wait for ``/health``; RuntimeError naming the log's last lines if it fails."""
        if self.process is not None:
            raise RuntimeError(f"this {self.name} is already started")
        began = time.monotonic()
        popen = dict(env=self.env, start_new_session=True, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
        if self.inherit_output:
            self.process = subprocess.Popen(self.command, **popen)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, **popen)
        self.pid = self.process.pid
        atexit.register(self.stop)
        try:
            wait_for_health(self.root_url, alive=lambda: self.process.poll() is None, timeout=self.startup_timeout,
                            interval=0.2)
        except (RuntimeError, TimeoutError) as err:
            code = self.process.poll()
            self.stop()
            why = f"exited with code {code}" if code is not None else f"was not healthy after {self.startup_timeout:.0f} s"
            raise self.start_error(f"{self.name} {why} during start-up ({err}).{self._log_hint()}") from None
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def start_error(self, message: str) -> RuntimeError:
        """The exception ``start`` raises (subclasses use their own type)."""
        return RuntimeError(message)

    def _log_hint(self) -> str:
        if self.inherit_output:
            return " Its log is above."
        return f" Last lines of {self.log_path}:\n{self.log_tail()}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group (a graceful shutdown), SIGKILL what is left after ``timeout``. Safe twice."""
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
        """Block until the server exits by itself; its exit code."""
        return self.process.wait()

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess(ChildServer):
    """``python -m minimind_course.serve --port PORT ...`` as a child process, the way a user runs it.

    Benchmarks use it so the server does not share a Python process (and its GIL) with the load generator."""

    def __init__(self, extra_args: Sequence[str] = (), *, host: str = "127.0.0.1", port: int | None = None,
                 served_model_name: str = "minimind", startup_timeout: float = 120.0):
        port = port if port is not None else free_port(host)
        self.served_model_name = served_model_name
        command = [sys.executable, "-m", "minimind_course.serve", "--host", host, "--port", str(port),
                   "--served-model-name", served_model_name, "--log-level", "warning", *extra_args]
        super().__init__(command, host=host, port=port, startup_timeout=startup_timeout, name="serve")

    def stop(self, timeout: float = 15.0) -> int | None:
        return super().stop(timeout)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies; atexit cannot cover that."""
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
