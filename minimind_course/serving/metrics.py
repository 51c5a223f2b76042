"""``GET /metrics``: the engine in Prometheus' text format, under vLLM's metric names and meanings.

A dashboard built for vLLM reads our server too: the same names (``vllm:num_requests_running``,
``vllm:time_to_first_token_seconds``...), the same ``model_name`` and ``engine`` labels. Gauges are read from
the engine when scraped; counters and histograms are fed by the engine's per-step ``StepStats``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from minimind_course.engine.engine import Engine, StepStats

# vLLM's buckets; inter-token latency gets finer ones below 10 ms, where a small model on a CPU lives
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineMetrics:
    """Prometheus metrics of one engine in a registry of their own (several apps may share an engine)."""

    def __init__(self, engine: Engine, model_name: str):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}
        names = list(self.labels)

        def gauge(name: str, documentation: str, read) -> None:
            Gauge(name, documentation, names, registry=self.registry).labels(**self.labels).set_function(read)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, names, registry=self.registry).labels(**self.labels)

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(name, documentation, names, buckets=buckets, registry=self.registry).labels(**self.labels)

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lambda: engine.num_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda: engine.queued)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              lambda: engine.block_manager.usage)
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*names, "finished_reason"], registry=self.registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             LATENCY_BUCKETS)
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                        TOKEN_BUCKETS)
        self.request_generation = histogram("vllm:request_generation_tokens",
                                            "Number of generation tokens processed.", TOKEN_BUCKETS)
        engine.stats_listeners.append(self.record)

    def record(self, stats: StepStats) -> None:
        """Called by the engine's worker after every step."""
        self.preemptions.inc(stats.preemptions)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        for value in stats.time_to_first_token_s:
            self.ttft.observe(value)
        for value in stats.inter_token_latency_s:
            self.itl.observe(value)
        for done in stats.finished:
            self.e2e.observe(done.e2e_latency_s)
            self.request_prompt.observe(done.prompt_tokens)
            self.request_generation.observe(done.completion_tokens)
            self.success.labels(**self.labels, finished_reason=done.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
