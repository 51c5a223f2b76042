"""What HTTP + SSE cost: the same model streamed over HTTP vs. driven in-process (``bench overhead``).

The server runs as ``python -m minimind_course.serve`` in a subprocess (a real client/server split, no shared
GIL); the in-process side is an ``Engine`` in this process. Requests alternate between the two sides, so load
from other programs hits both alike. Reported: tokens/s (completion tokens / whole request time) both ways and
their ratio, and time to the first text (TTFT) percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from minimind_course.loadgen import percentile

PROMPT = [{"role": "user", "content": "请介绍一下你自己。"}]


@dataclass(frozen=True)
class OverheadConfig:
    model: str | None = None  # None: the bundled model
    tokens: int = 256  # per throughput request (ignore_eos keeps it exact)
    runs: int = 5  # throughput requests per side
    ttft_runs: int = 20  # short requests per side for TTFT
    threads: int | None = None  # torch threads on both sides


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


async def engine_request(engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """One greedy request straight on the engine: (seconds to the first text, tokens/s over the whole request)."""
    from minimind_course.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = None
    async for step in engine.submit(prompt_ids, params):
        if first is None and any(choice.text for choice in step.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, rate(step.completion_tokens, end - start)


def http_request(client: httpx.Client, max_tokens: int) -> tuple[float, float]:
    """One streamed greedy chat request: (seconds to the first text, tokens/s over the whole request).

    The end is ``[DONE]``, not the last text: with ignore_eos, tokens after an end-of-sequence carry no text."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, rate(tokens, end - start)


def start_server(model: str | None, threads: int | None) -> tuple[subprocess.Popen, httpx.Client]:
    """``python -m minimind_course.serve`` on a free port, once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "minimind_course.serve", "--port", str(port), "--log-level", "warning"]
    command += ["--model", model] if model else []
    command += ["--threads", str(threads)] if threads else []
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.get("/health").raise_for_status()
            return server, client
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                client.close()
                raise RuntimeError("the benchmark server did not start") from None
            time.sleep(0.2)


def measure_overhead(config: OverheadConfig) -> dict[str, object]:
    """Run both sides, interleaved, and return the report (also what ``--out`` writes)."""
    import torch

    from minimind_course.engine import Engine

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = Engine.from_pretrained(config.model)  # first: a bad model path fails here with a clear message
    server, client = start_server(config.model, config.threads)
    loop = asyncio.new_event_loop()
    local_rate, http_rate, local_ttft, http_ttft = [], [], [], []
    try:
        prompt_ids = engine.encode(engine.chat_prompt(PROMPT))
        loop.run_until_complete(engine_request(engine, prompt_ids, 8))  # warm-up, both sides
        http_request(client, 8)
        for _ in range(config.runs):
            local_rate.append(loop.run_until_complete(engine_request(engine, prompt_ids, config.tokens))[1])
            http_rate.append(http_request(client, config.tokens)[1])
        for _ in range(config.ttft_runs):
            local_ttft.append(1000 * loop.run_until_complete(engine_request(engine, prompt_ids, 2))[0])
            http_ttft.append(1000 * http_request(client, 2)[0])
    finally:
        loop.close()
        engine.close()
        client.close()
        server.terminate()
        server.wait(timeout=30)
    in_process = {"tok_s": statistics.median(local_rate), "ttft_ms_p50": percentile(local_ttft, 50)}
    http = {"tok_s": statistics.median(http_rate), "ttft_ms_p50": percentile(http_ttft, 50),
            "ttft_ms_p90": percentile(http_ttft, 90)}
    return {
        "benchmark": "overhead",
        "model": config.model or "bundled minimind-tiny",
        "tokens_per_request": config.tokens,
        "runs": config.runs,
        "ttft_runs": config.ttft_runs,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "in_process": in_process,
        "http": http,
        "http_over_in_process_tok_s": http["tok_s"] / in_process["tok_s"],
    }


def format_overhead(report: dict) -> str:
    local, http = report["in_process"], report["http"]
    return (f"tokens/s      in-process {local['tok_s']:.0f}  HTTP+SSE {http['tok_s']:.0f}  "
            f"ratio {report['http_over_in_process_tok_s']:.2f}\n"
            f"TTFT ms p50   in-process {local['ttft_ms_p50']:.1f}  HTTP+SSE {http['ttft_ms_p50']:.1f} "
            f"(p90 {http['ttft_ms_p90']:.1f})")
