"""Run ``python -m minimind_course.serve`` as a child process, the way a user runs it, for benchmarks.

A benchmark must not share a Python process (and its GIL) with the load generator, or the client's own work
slows the server it measures; vLLM runs in its own process too, so both backends are compared alike.

    with ServeProcess() as server:          # the bundled model on a free port
        print(server.base_url)              # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from minimind_course.vllm_server import free_port


class ServeProcess:
    """``python -m minimind_course.serve --port PORT ...`` in its own process group; ``.base_url``, ``.stop()``."""

    def __init__(self, extra_args: Sequence[str] = (), *, host: str = "127.0.0.1", port: int | None = None,
                 served_model_name: str = "minimind", startup_timeout: float = 120.0):
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.served_model_name = served_model_name
        self.command = [sys.executable, "-m", "minimind_course.serve", "--host", host, "--port", str(self.port),
                        "--served-model-name", served_model_name, "--log-level", "warning", *extra_args]
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkdtemp(prefix="minimind-serve-")) / "serve.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> ServeProcess:
        """Start the server and wait for ``/health``; RuntimeError with its log when it exits or hangs."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)  # a kernel restart must not leave the port taken
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(encoding="utf-8", errors="replace")
                self.stop()
                raise RuntimeError(f"{' '.join(self.command)} did not become healthy:\n{log}")
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group (uvicorn shuts down gracefully), SIGKILL if it hangs. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
