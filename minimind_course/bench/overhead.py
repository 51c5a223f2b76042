"""What HTTP + SSE cost: the same model streamed over HTTP vs. driven in-process (``bench overhead``).

The server runs as ``python -m minimind_course.serve`` in a subprocess (a real client/server split, no shared
GIL); the in-process side is an ``Engine`` in this process. Requests alternate between the two sides, so load
from other programs hits both alike. Reported: tokens/s (completion tokens / whole request time) both ways and
their ratio, and time to the first text (TTFT) percentiles.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass

import openai

from minimind_course.bench.loadgen import percentile
from minimind_course.bench.timing import timed_stream
from minimind_course.launch import ServeProcess

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
    from minimind_course.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = None
    async for step in engine.submit(prompt_ids, params):
        if first is None and any(choice.text for choice in step.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, rate(step.completion_tokens, end - start)


def http_request(client: openai.AsyncOpenAI, loop: asyncio.AbstractEventLoop, max_tokens: int) -> tuple[float, float]:
    """One streamed greedy chat request (``bench.timing``): (seconds to the first text, tokens/s, whole request)."""
    timed = loop.run_until_complete(timed_stream(client, "minimind", PROMPT, max_tokens, ignore_eos=True))
    if not timed.ok:
        raise RuntimeError(f"the HTTP request failed: {timed.error}")
    return timed.ttft, rate(timed.output_tokens, timed.latency)


def measure_overhead(config: OverheadConfig) -> dict[str, object]:
    """Run both sides, interleaved, and return the report (also what ``--out`` writes)."""
    import torch

    from minimind_course.engine.engine import Engine

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = Engine.from_pretrained(config.model)  # first: a bad model path fails here with a clear message
    args = (["--model", config.model] if config.model else []) + (["--threads", str(config.threads)] if config.threads else [])
    server = ServeProcess(args, startup_timeout=180).start()
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=300)
    loop = asyncio.new_event_loop()
    local_rate, http_rate, local_ttft, http_ttft = [], [], [], []
    try:
        prompt_ids = engine.encode(engine.chat_prompt(PROMPT))
        loop.run_until_complete(engine_request(engine, prompt_ids, 8))  # warm-up, both sides
        http_request(client, loop, 8)
        for _ in range(config.runs):
            local_rate.append(loop.run_until_complete(engine_request(engine, prompt_ids, config.tokens))[1])
            http_rate.append(http_request(client, loop, config.tokens)[1])
        for _ in range(config.ttft_runs):
            local_ttft.append(1000 * loop.run_until_complete(engine_request(engine, prompt_ids, 2))[0])
            http_ttft.append(1000 * http_request(client, loop, 2)[0])
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        engine.close()
        server.stop()
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
