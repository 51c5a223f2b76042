"""What the engine hands out: per-step text deltas, finished results, per-request updates, step statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice in one step; ``finish_reason`` is set on its last delta ("stop" or "length").

    ``logprobs`` holds the tokens generated in this step when the request asked for them; their text may
    still be held back (an incomplete character, a possible stop string) and arrive in a later delta.
    ``stop_string`` is the stop string that ended the choice (None for end-of-sequence, length or a grammar)."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_string: str | None = None


@dataclass(frozen=True)
class StepOutput:
    """What one decode step produced, plus running token counts for ``usage``."""

    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool


@dataclass
class GenerationResult:
    """A finished request: full text and finish reason per choice, and token counts."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when requested
    stop_strings: list[str | None] = field(default_factory=list)  # per choice: the stop string that ended it


@dataclass(frozen=True)
class RequestUpdate:
    """What the core has for one request: a step's output, an error, and how it left the core (``outcome``:
    finished, cancelled, skipped = cancelled while queued, failed), once it did."""

    request_id: str
    output: StepOutput | None = None
    error: BaseException | None = None
    outcome: str | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class RequestTrace:
    """How the worker let go of one request. ``outcome``: finished (stop/length), cancelled (mid-generation),
    skipped (cancelled while queued) or failed. Times are ``time.monotonic()`` seconds."""

    request_id: str
    outcome: str
    completion_tokens: int
    cancelled_at: float | None  # when cancel() was first called, for cancelled and skipped requests
    finished_at: float  # when the worker stopped generating for it


@dataclass(frozen=True)
class FinishedRequestStats:
    """One request that ended normally, for metrics: latency from arrival, finish reason, token counts."""

    e2e_latency_s: float
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StepStats:
    """What one engine step did, handed to ``Engine.stats_listeners`` (the Prometheus metrics read these)."""

    prompt_tokens: int = 0  # prompts whose prefill completed in this step
    generation_tokens: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens of sequences that got blocks in this step, looked up in the cache
    prefix_cache_hits: int = 0  # ... of them found there (not computed again)
    request_ids: tuple[str, ...] = ()  # the requests that had sequences in this step's forward passes
