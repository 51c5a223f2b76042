"""Run an ASGI app with uvicorn in a daemon thread, for notebooks and tests (``uvicorn.run`` would block,
and inside Jupyter it fails because an event loop is already running).

    with BackgroundServer(app) as server:
        httpx.get(server.base_url + "/health")

The port is chosen by the OS (bind to port 0) before uvicorn starts, so parallel runs never collide.
"""

from __future__ import annotations

import atexit
import socket
import threading
import time

import uvicorn


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` in a daemon thread; ``.base_url``, ``.stop()``, context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
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
