"""Shared fixtures: the bundled model served by our OpenAI-compatible server in a background thread.

Fixture names (session-scoped unless noted):
- ``engine``: ``Engine`` over the bundled model (one worker thread, default queue); set ``MINIMIND_TEST_MODEL``
  to a model folder or .pth file to run the whole suite against another checkpoint.
- ``server``: ``BackgroundServer`` running ``create_app(engine)``; ``server.base_url`` is ``http://127.0.0.1:PORT``.
- ``base_url``: ``server.base_url + "/v1"``, what OpenAI clients take.
- ``endpoint``: ``Endpoint(base_url, model, api_key)``, the only thing the backend-agnostic conformance checks
  (``tests/openai_conformance.py``) use. To run those checks against another server (e.g. vLLM), write a test
  module that does ``from openai_conformance import *`` and defines its own ``endpoint`` fixture.
- ``client`` / ``async_client`` (function scope): ``openai.OpenAI`` / ``openai.AsyncOpenAI`` for ``endpoint``.
  Async fixtures live on the session event loop (pyproject), so async tests are marked
  ``@pytest.mark.asyncio(loop_scope="session")``.
- ``make_server`` (function scope): ``make_server(**create_app_kwargs, max_queue=.., own=..)`` starts an extra
  server on the same model (e.g. with an API key, a tiny queue or a tiny body limit), or on an engine of the test's
  own, and stops it (and that engine) after the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch

from minimind_course.launch import BackgroundServer
from minimind_course.engine.engine import Engine
from minimind_course.serving.app import create_app

SERVED_MODEL_NAME = "minimind"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint under test."""

    base_url: str  # ends with /v1
    model: str
    api_key: str = "not-needed"


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    torch.set_num_threads(1)  # tiny models decode fastest on one thread, above all on a shared 2-core machine
    engine = Engine.from_pretrained(os.environ.get("MINIMIND_TEST_MODEL") or None)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(engine, served_model_name=SERVED_MODEL_NAME)) as running:
        yield running


@pytest.fixture(scope="session")
def base_url(server: BackgroundServer) -> str:
    return server.base_url + "/v1"


@pytest.fixture(scope="session")
def endpoint(base_url: str) -> Endpoint:
    return Endpoint(base_url=base_url, model=SERVED_MODEL_NAME)


@pytest.fixture
def client(endpoint: Endpoint) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture
async def async_client(endpoint: Endpoint):
    async with openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0,
                                  timeout=120) as sdk:
        yield sdk


@pytest.fixture
def make_server(engine: Engine):
    """Factory for extra servers over the same model; every one is stopped after the test."""
    started: list[tuple[BackgroundServer, Engine | None]] = []

    def start(max_queue: int | None = None, *, own: Engine | None = None, **app_kwargs) -> BackgroundServer:
        """``own``: an engine of the test's (closed afterwards); ``max_queue``: a fresh one over the same model."""
        if own is None and max_queue is not None:
            own = Engine(engine.model, engine.tokenizer, max_queue=max_queue)
        running = BackgroundServer(create_app(own or engine, **app_kwargs)).start()
        started.append((running, own))
        return running

    yield start
    for running, own in started:
        running.stop()
        if own is not None:
            own.close()


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """The bundled model exported to a Llama folder that vLLM serves natively."""
    from minimind_course.model.export import export_for_vllm

    return export_for_vllm(None, tmp_path_factory.mktemp("vllm-export"))


@pytest.fixture(scope="session")
def vllm(export_dir: Path):
    """Real vLLM serving the export, started once for the whole session (vLLM tests, ecosystem, browser)."""
    from minimind_course.serving.vllm_launcher import VLLMServer

    # -O0: no torch.compile. Start-up drops from 1-5 minutes (busy 2-core machine) to well under one; the model code
    # is the same.
    with VLLMServer(export_dir, served_model_name="minimind", startup_timeout=600, extra_args=["-O0"]) as running:
        yield running


def pytest_collection_modifyitems(items):
    """Tests that stop the shared vLLM server (marked ``stops_vllm``) run after everything else (stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("stops_vllm") is not None)


@pytest.fixture(scope="module", params=["minimind", "vllm"])
def backend(request) -> tuple[str, str]:
    """(base_url, model) of our server, then of real vLLM (whose launcher passes the CORS arguments browsers need)."""
    if request.param == "minimind":
        endpoint = request.getfixturevalue("endpoint")
        return endpoint.base_url, endpoint.model
    from minimind_course.serving.vllm_launcher import vllm_installed

    if not vllm_installed():
        pytest.skip("vLLM is not installed: pip install 'minimind-course[vllm]'")
    server = request.getfixturevalue("vllm")
    return server.base_url, server.served_model_name
