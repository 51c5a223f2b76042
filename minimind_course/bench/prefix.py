"""``bench prefix``: automatic prefix caching, in-process, cache on vs off.

Cold vs warm time to first token on a multi-turn chat of about ``prompt_tokens`` tokens (warm: the same chat sent
again with the answer and one more short user turn, as every chat client does), the share of prompt tokens a
10-turn chat finds cached, and throughput at a 0 % hit rate (every prompt different from its first token).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass

TOPICS = ["长城", "大熊猫", "春节", "茶", "丝绸之路", "京剧", "长江", "饺子", "书法", "故宫", "中秋节", "黄山"]


@dataclass(frozen=True)
class PrefixConfig:
    """The measurement's settings."""

    model: str | None = None  # None: the bundled MiniMind-Tiny
    prompt_tokens: int = 800
    rounds: int = 5  # conversations per setting (the medians are reported)
    turns: int = 10
    max_tokens: int = 16
    threads: int | None = None


def conversation(engine, round_index: int, prompt_tokens: int) -> list[dict[str, str]]:
    """A chat ending with a user turn whose rendered prompt has at least ``prompt_tokens`` tokens; each round's
    system prompt differs, so no round finds another's blocks."""
    rng = random.Random(round_index)
    messages = [{"role": "system", "content": f"第 {round_index} 次对话：你是一个乐于助人的助手。"}]
    while len(engine.encode(engine.chat_prompt(messages))) < prompt_tokens:
        topic = rng.choice(TOPICS)
        messages += [{"role": "user", "content": f"请详细介绍一下{topic}，包括它的历史和意义。"},
                     {"role": "assistant", "content": f"{topic}是中国文化的重要组成部分。" * rng.randint(3, 6)}]
    return [*messages, {"role": "user", "content": "谢谢！请再简单总结一下。"}]


async def first_token_s(engine, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """Seconds from submit to the first output, and the whole greedy answer."""
    from minimind_course.engine.sampling import SamplingParams

    began = time.perf_counter()
    first, text = None, ""
    async for step in engine.submit(prompt, SamplingParams(temperature=0, max_tokens=max_tokens)):
        first = first if first is not None else time.perf_counter() - began
        text += "".join(delta.text for delta in step.choices)
    return first, text


async def cold_and_warm(engine, config: PrefixConfig) -> dict[str, float]:
    """Median cold and warm TTFT over ``rounds`` fresh conversations."""
    cold, warm, sizes = [], [], []
    for round_index in range(config.rounds):
        messages = conversation(engine, round_index, config.prompt_tokens)
        prompt = engine.encode(engine.chat_prompt(messages))
        seconds, answer = await first_token_s(engine, prompt, config.max_tokens)
        cold.append(seconds)
        follow_up = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "为什么？"}]
        longer = engine.encode(engine.chat_prompt(follow_up))
        warm.append((await first_token_s(engine, longer, config.max_tokens))[0])
        sizes.append((len(prompt), len(longer)))
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {"cold_ttft_s": cold_s, "warm_ttft_s": warm_s, "warm_over_cold": warm_s / cold_s,
            "prompt_tokens": statistics.median(p for p, _ in sizes), "warm_prompt_tokens": statistics.median(
                w for _, w in sizes)}


async def chat_reuse(engine, config: PrefixConfig) -> dict[str, float]:
    """A ``turns``-turn chat: the share of its prompt tokens found in the cache (vLLM's hits / queries)."""
    counts = {"queries": 0, "hits": 0}

    def count(stats) -> None:
        counts["queries"] += stats.prefix_cache_queries
        counts["hits"] += stats.prefix_cache_hits

    engine.stats_listeners.append(count)
    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}]
    for turn in range(config.turns):
        messages.append({"role": "user", "content": f"请介绍一下{TOPICS[turn % len(TOPICS)]}。"})
        _, answer = await first_token_s(engine, engine.encode(engine.chat_prompt(messages)), 48)
        messages.append({"role": "assistant", "content": answer})
    engine.stats_listeners.remove(count)
    return {"turns": config.turns, "reused": counts["hits"] / counts["queries"], **counts}


def zero_hit_throughput(core, streams: int = 16, prompt_len: int = 200, new_tokens: int = 64) -> dict[str, float]:
    """Tokens per wall second and per CPU second of ``streams`` greedy requests run together through the
    thread-free ``EngineCore``, their prompts drawn afresh so that no block is ever shared (a 0 % hit rate).
    CPU seconds of this process are the steadier measure on a busy machine."""
    from minimind_course.engine.sampling import SamplingParams
    from minimind_course.engine.sequence import EngineRequest

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rng, vocab = random.Random(), len(core.output.tokenizer)
    for i in range(streams):
        core.add(EngineRequest(f"zero-hit-{i}", [3 + rng.randrange(vocab - 3) for _ in range(prompt_len)], params))
    wall, cpu = time.perf_counter(), time.process_time()
    while core.has_work:
        core.step()
    tokens = streams * new_tokens
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def measure_prefix(config: PrefixConfig) -> dict[str, object]:
    """Everything above for the cache off and on, with the same model; the throughput runs drive each engine's
    core directly once its worker thread has stopped."""
    import torch

    from minimind_course.engine.engine import Engine
    from minimind_course.model.loading import load_model

    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config.model)
    report: dict[str, object] = {"config": asdict(config), "loadavg_before": os.getloadavg()}
    engines = {name: Engine(model, tokenizer, enable_prefix_caching=name == "on") for name in ("off", "on")}
    try:
        for name, engine in engines.items():
            asyncio.run(first_token_s(engine, engine.encode("你好"), 4))  # warm-up
            report[name] = asyncio.run(cold_and_warm(engine, config))
        report["on"]["chat"] = asyncio.run(chat_reuse(engines["on"], config))
    finally:
        for engine in engines.values():
            engine.close()  # the worker threads stop; their cores go on, driven from here
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with torch.inference_mode():
        for _ in range(4):  # alternating, so a busy moment of the machine does not fall on one side only
            for name, engine in engines.items():
                runs[name].append(zero_hit_throughput(engine.core))
    for name in engines:
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            report[name][f"zero_hit_{key}"] = max(run[key] for run in runs[name])
    report["zero_hit_throughput_on_over_off"] = report["on"]["zero_hit_tokens_per_s"] / report["off"][
        "zero_hit_tokens_per_s"]
    report["zero_hit_cpu_throughput_on_over_off"] = report["on"]["zero_hit_tokens_per_cpu_s"] / report["off"][
        "zero_hit_tokens_per_cpu_s"]
    report["loadavg_after"] = os.getloadavg()
    return report


def format_prefix(report: dict[str, object]) -> str:
    """The report as a few lines of text, ratios side by side."""
    lines = [f"~{report['on']['prompt_tokens']:.0f}-token multi-turn chat, warm = sent again with one more turn "
             f"({report['config']['rounds']} rounds, medians)"]
    for name in ("off", "on"):
        r = report[name]
        lines.append(f"cache {name:3s}: cold TTFT {r['cold_ttft_s'] * 1e3:7.1f} ms, warm {r['warm_ttft_s'] * 1e3:7.1f}"
                     f" ms, warm/cold {r['warm_over_cold']:.2f}; 0 % hits: {r['zero_hit_tokens_per_s']:.0f} tokens/s, "
                     f"{r['zero_hit_tokens_per_cpu_s']:.0f} per CPU second")
    chat = report["on"]["chat"]
    lines.append(f"{chat['turns']}-turn chat: {chat['reused']:.0%} of its prompt tokens found cached "
                 f"({chat['hits']}/{chat['queries']})")
    lines.append(f"throughput at a 0 % hit rate, on/off: {report['zero_hit_throughput_on_over_off']:.3f} (wall), "
                 f"{report['zero_hit_cpu_throughput_on_over_off']:.3f} (CPU time)")
    lines.append("load average before/after: " + " / ".join(
        ", ".join(f"{x:.2f}" for x in report[key]) for key in ("loadavg_before", "loadavg_after")))
    return "\n".join(lines)
