"""Load generator for any OpenAI-compatible endpoint: a concurrency sweep of streamed, greedy chat requests.

One warm-up request first (lazy initialisation stays out of the numbers). Then for each concurrency level C,
``max(requests_per_level, rounds * C)`` requests are sent by C workers, so C are always in flight and every level
runs several waves of C: a single wave has no steady state (its requests start together and finish staggered, or
queue behind each other), while with ``rounds`` waves most requests see C others in flight, which is what Little's
law and the per-level averages assume. Each request is streamed with ``stream_options.include_usage`` so the
server's own token count is used. Measured per request (``bench.timing``): TTFT (time to the first text),
end-to-end latency, output tokens, text chunks, and inter-token latency per token (ITL = time after the first token
/ tokens after the first, vLLM's "TPOT"; per token because a server may send several tokens in one chunk). Per
level: output tokens/s of the whole server, percentiles, tokens per text chunk, errors. Same method as vLLM's
``benchmark_serving``, small enough to read.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import openai

from minimind_course.bench.timing import TimedStream, timed_stream

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
# Fixed prompts, English and Chinese, cycled through in order so every run sends the same requests.
DEFAULT_PROMPTS = (
    "What is an OpenAI-compatible API?",
    "请介绍一下你自己。",
    "Why does streaming make a chat feel faster?",
    "什么是大语言模型？",
    "Explain what a token is in one sentence.",
    "为什么服务器要支持并发请求？",
    "Tell me a short story about a small robot.",
    "北京是哪个国家的首都？",
)


@dataclass(frozen=True)
class Stats:
    """Summary of one measured quantity over the requests of a level."""

    mean: float
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(sum(values) / len(values), percentile(values, 50), percentile(values, 95), max(values))


@dataclass
class LevelResult:
    """All requests of one concurrency level and what they add up to."""

    concurrency: int
    duration: float  # wall time from the first request sent to the last answer received
    records: list[TimedStream]
    ttft: Stats | None = field(init=False)
    itl: Stats | None = field(init=False)
    request_tokens_per_s: Stats | None = field(init=False)  # one request's decode speed: 1 / ITL

    def __post_init__(self) -> None:
        done = [r for r in self.records if r.ok]
        self.ttft = Stats.of([r.ttft for r in done])
        itls = [r.itl for r in done if r.itl]
        self.itl = Stats.of(itls)
        self.request_tokens_per_s = Stats.of([1.0 / x for x in itls])

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.records if r.ok)

    @property
    def tokens_per_chunk(self) -> float | None:
        """Mean output tokens per text chunk over the level (1.0: one token per SSE event; more: bursts)."""
        chunks = sum(r.chunks for r in self.records if r.ok)
        return self.output_tokens / chunks if chunks else None

    @property
    def throughput(self) -> float:
        """Output tokens per second of the whole server at this concurrency."""
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, object]:
        """JSON-ready numbers of this level (per-request records included)."""
        first_errors = sorted({r.error for r in self.records if r.error})[:5]
        return {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "errors": self.errors,
            "error_messages": first_errors,
            "duration_s": self.duration,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.throughput,
            "tokens_per_chunk": self.tokens_per_chunk,
            "requests_per_s": (len(self.records) - self.errors) / self.duration if self.duration > 0 else 0.0,
            "ttft_s": _stats_dict(self.ttft),
            "itl_s": _stats_dict(self.itl),
            "request_tokens_per_s": _stats_dict(self.request_tokens_per_s),
            "records": [asdict(r) for r in self.records],
        }


@dataclass
class SweepConfig:
    """What to send: the endpoint, the model name, the prompts and the length of every answer."""

    base_url: str
    model: str = "minimind"
    api_key: str = "not-needed"
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY
    requests_per_level: int = 32  # at least; a level sends max(requests_per_level, rounds * concurrency)
    rounds: int = 4  # waves of `concurrency` requests per level at least, so each level reaches a steady state
    max_tokens: int = 64
    ignore_eos: bool = True  # every answer exactly max_tokens long, so levels and backends compare fairly
    prompts: Sequence[str] = DEFAULT_PROMPTS
    timeout: float = 600.0
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be positive integers")
        if self.requests_per_level < 1 or self.rounds < 1 or self.max_tokens < 1:
            raise ValueError("requests_per_level, rounds and max_tokens must be at least 1")
        if not self.prompts:
            raise ValueError("at least one prompt is needed")

    def requests_at(self, concurrency: int) -> int:
        """How many requests the level with ``concurrency`` users sends: ``rounds`` waves at least."""
        return max(self.requests_per_level, self.rounds * concurrency)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats_dict(stats: Stats | None) -> dict[str, float] | None:
    return asdict(stats) if stats else None


async def timed_request(client: openai.AsyncOpenAI, config: SweepConfig, prompt: str) -> TimedStream:
    """One request of the sweep: a greedy streamed answer to ``prompt``, timed by ``bench.timing``."""
    return await timed_stream(client, config.model, [{"role": "user", "content": prompt}], config.max_tokens,
                              ignore_eos=config.ignore_eos)


async def run_level(
    client: openai.AsyncOpenAI, config: SweepConfig, concurrency: int, on_done: Callable[[], None] | None = None
) -> LevelResult:
    """Send ``config.requests_at(concurrency)`` requests with ``concurrency`` of them in flight at any time."""
    prompts = [config.prompts[i % len(config.prompts)] for i in range(config.requests_at(concurrency))]
    records: list[TimedStream | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))

    async def worker() -> None:
        for i in next_index:  # a shared iterator: each request is taken by exactly one worker
            records[i] = await timed_request(client, config, prompts[i])
            if on_done:
                on_done()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return LevelResult(concurrency, time.perf_counter() - began, records)


async def sweep(config: SweepConfig, progress: bool = True) -> list[LevelResult]:
    """Run every concurrency level in order (after one warm-up request) and return their results."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(config.requests_at, config.concurrency)), unit="req", desc="sweep")
    async with openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=0,
                                  timeout=config.timeout) as client:
        if config.warmup:  # the first request pays for lazy initialisation (kernels, caches); keep it out
            record = await timed_request(client, config, config.prompts[0])
            if not record.ok:
                raise RuntimeError(f"the warm-up request to {config.base_url} failed: {record.error}")
        results = []
        for level in config.concurrency:
            if bar is not None:
                bar.set_postfix_str(f"concurrency {level}")
            results.append(await run_level(client, config, level, bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    return results


def sweep_report(config: SweepConfig, results: Sequence[LevelResult]) -> dict[str, object]:
    """The JSON document ``bench sweep --out`` writes: settings plus one summary per level."""
    settings = {key: value for key, value in asdict(config).items() if key != "api_key"}
    settings["concurrency"] = list(config.concurrency)
    settings["prompts"] = list(config.prompts)
    return {"settings": settings, "levels": [level.summary() for level in results]}


SERVER_METRICS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds",
                  "vllm:e2e_request_latency_seconds", "vllm:num_preemptions_total")


def server_metrics(base_url: str) -> dict[str, float] | None:
    """The server's own view from its Prometheus ``/metrics`` (ours and vLLM's share the names): token totals, TTFT
    and latency sums/counts, summed over labels. None when the server has no such endpoint."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30)
        families = list(text_string_to_metric_families(response.text)) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not families:
        return None
    view: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name in SERVER_METRICS or sample.name.removesuffix("_sum").removesuffix("_count") in SERVER_METRICS:
                view[sample.name] = view.get(sample.name, 0.0) + sample.value
    return view


def format_server_view(view: dict[str, float]) -> str:
    """One line: what the server says it did (generated tokens, mean TTFT over the requests it counted)."""
    count = view.get("vllm:time_to_first_token_seconds_count", 0.0)
    mean = view.get("vllm:time_to_first_token_seconds_sum", 0.0) / count * 1e3 if count else float("nan")
    return (f"server /metrics: {view.get('vllm:generation_tokens_total', 0.0):.0f} tokens generated, mean TTFT "
            f"{mean:.1f} ms over {count:.0f} requests (since it started, warm-up included)")


def format_table(results: Sequence[LevelResult]) -> str:
    """A fixed-width text table of the sweep, one line per concurrency level (tok/chunk: output tokens per text
    chunk; above 1 the server sent tokens in bursts, which is why ITL is per token)."""
    header = (f"{'conc':>4} {'reqs':>4} {'err':>3} {'tok/s total':>11} {'tok/s/req p50':>13} "
              f"{'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>9} {'ITL p95':>9} {'tok/chunk':>9}")
    lines = [header]
    for r in results:
        def ms(stats: Stats | None, key: str) -> str:
            return f"{getattr(stats, key) * 1000:7.1f}ms" if stats else "      n/a"

        per_request = f"{r.request_tokens_per_s.p50:13.1f}" if r.request_tokens_per_s else f"{'n/a':>13}"
        per_chunk = f"{r.tokens_per_chunk:9.2f}" if r.tokens_per_chunk else f"{'n/a':>9}"
        lines.append(f"{r.concurrency:>4} {len(r.records):>4} {r.errors:>3} {r.throughput:>11.1f} {per_request} "
                     f"{ms(r.ttft, 'p50')} {ms(r.ttft, 'p95')} {ms(r.itl, 'p50')} {ms(r.itl, 'p95')} {per_chunk}")
    return "\n".join(lines)
