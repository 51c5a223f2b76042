"""Benchmarks of the serving stack. ``python -m minimind_course.bench overhead``: what HTTP + SSE costs.

overhead: the same model decodes ``--tokens`` tokens (greedy, ignore_eos) in-process through the ``Engine``,
then streamed over HTTP from ``python -m minimind_course.serve`` in a subprocess (a real client/server split,
no shared GIL). Reported: decode tokens/s both ways and their ratio, and time to first token (TTFT) p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = [{"role": "user", "content": "请介绍一下你自己。"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def decode_rate(tokens: int, first: float, last: float) -> float:
    """Tokens per second after the first one (so TTFT is not counted twice)."""
    return (tokens - 1) / (last - first) if last > first else float("nan")


# ---- in-process --------------------------------------------------------------------------------------------
async def _engine_run(engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """One request straight on the engine: (seconds to the first token, decode tokens/s)."""
    from minimind_course.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = last = None
    async for step in engine.submit(prompt_ids, params):
        now = time.perf_counter()
        first = first or now
        last = now
    return first - start, decode_rate(step.completion_tokens, first, last)


# ---- over HTTP ---------------------------------------------------------------------------------------------
def _stream_once(client: httpx.Client, max_tokens: int) -> tuple[float, float]:
    """One streamed chat request: (seconds to the first content delta, decode tokens/s)."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - start, decode_rate(tokens, first, last)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str | None, threads: int | None) -> tuple[subprocess.Popen, httpx.Client]:
    port = _free_port()
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
                raise RuntimeError("the benchmark server did not start") from None
            time.sleep(0.2)


def overhead(args: argparse.Namespace) -> dict[str, object]:
    """Alternate in-process and HTTP requests, so that load from other programs hits both sides alike."""
    import torch

    from minimind_course.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    server, client = _start_server(args.model, args.threads)
    engine = Engine.from_pretrained(args.model)
    loop = asyncio.new_event_loop()
    try:
        prompt_ids = engine.encode(engine.chat_prompt(PROMPT))
        loop.run_until_complete(_engine_run(engine, prompt_ids, 8))  # warm-up both sides
        _stream_once(client, 8)
        local_rate, http_rate, local_ttft, http_ttft = [], [], [], []
        for _ in range(args.runs):
            local_rate.append(loop.run_until_complete(_engine_run(engine, prompt_ids, args.tokens))[1])
            http_rate.append(_stream_once(client, args.tokens)[1])
        for _ in range(args.ttft_runs):
            local_ttft.append(1000 * loop.run_until_complete(_engine_run(engine, prompt_ids, 2))[0])
            http_ttft.append(1000 * _stream_once(client, 2)[0])
    finally:
        loop.close()
        engine.close()
        client.close()
        server.terminate()
        server.wait(timeout=30)
    local = {"tok_s": statistics.median(local_rate), "ttft_ms_p50": statistics.median(local_ttft)}
    remote = {"tok_s": statistics.median(http_rate), "ttft_ms_p50": statistics.median(http_ttft),
              "ttft_ms_p90": percentile(http_ttft, 0.9)}
    return {
        "benchmark": "overhead",
        "model": args.model or "bundled minimind-tiny",
        "tokens_per_request": args.tokens,
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "in_process": local,
        "http": remote,
        "http_over_in_process_tok_s": remote["tok_s"] / local["tok_s"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimind_course.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead", help="streamed tokens/s over HTTP vs in-process, and TTFT")
    over.add_argument("--model", default=None, help="model folder or .pth (default: the bundled model)")
    over.add_argument("--tokens", type=int, default=256, help="tokens per request (ignore_eos keeps it exact)")
    over.add_argument("--runs", type=int, default=5, help="requests per measurement (median reported)")
    over.add_argument("--ttft-runs", type=int, default=20, help="short requests for the TTFT percentiles")
    over.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    over.add_argument("--out", type=Path, default=Path("runs/bench-overhead.json"), help="where to write JSON")
    over.set_defaults(func=overhead)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Exception as err:  # one readable line, not a traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
