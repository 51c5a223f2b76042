"""Load with disconnects: many concurrent streaming clients, some of whom close the tab mid-answer.

    python -m minimind_course.bench.disconnect_load [--model PATH] [--clients 64] [--disconnects 32] [--max-tokens 96]

Every client streams a greedy chat completion of its own prompt. The clients that stay must receive exactly the
text they get when run alone (computed first, one at a time). For every client that leaves, the stop latency is
measured from the moment it closes its connection to the moment the engine's worker stopped generating for it
(``Engine.traces()``, matched by the response id). The server runs in this process, because those figures need
the engine: threads of the process and asyncio tasks on the server's event loop are counted before and after,
and must come back to the baseline (no leak). The exit status is 0 when every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import openai

from minimind_course.launch import BackgroundServer
from minimind_course.engine.engine import Engine, RequestTrace
from minimind_course.bench.loadgen import DEFAULT_PROMPTS
from minimind_course.bench.timing import TimedStream, timed_stream
from minimind_course.serving.app import create_app

MAX_STOP_LATENCY_S = 1.0  # issue 8: generation for a disconnected client stops within one second


@dataclass(frozen=True)
class DisconnectLoadConfig:
    """How many clients, how many of them leave, after how many chunks, and how long every answer is."""

    clients: int = 64
    disconnects: int = 32
    max_tokens: int = 96
    chunks_before_disconnect: int = 4  # leaving client i closes after 1 + (i // 2) % this many text chunks
    ignore_eos: bool = True  # every answer runs to max_tokens, so each leaving client really leaves mid-answer
    prompts: Sequence[str] = DEFAULT_PROMPTS
    model: str = "minimind"
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.disconnects <= self.clients or self.clients < 1:
            raise ValueError("need 1 <= clients and 0 <= disconnects <= clients")
        if self.max_tokens < 2 or self.chunks_before_disconnect < 1:
            raise ValueError("max_tokens must be at least 2 and chunks_before_disconnect at least 1")

    def prompt(self, client: int) -> str:
        """Every client asks its own question (a numbered student), so every answer is checked on its own."""
        return f"第{client + 1}位同学问：{self.prompts[client % len(self.prompts)]}"

    def leaving(self) -> set[int]:
        """The clients that disconnect, spread evenly over all of them (every other one for 32 of 64)."""
        return {k * self.clients // self.disconnects for k in range(self.disconnects)} if self.disconnects else set()


@dataclass
class DisconnectLoadReport:
    """The run's figures and the problems found (an empty ``problems`` list means every check held)."""

    clients: int
    disconnects: int
    max_tokens: int
    duration_s: float
    stop_latencies_s: list[float]
    threads_before: int
    threads_after: int
    tasks_before: int
    tasks_after: int
    engine_busy_after: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def max_stop_latency_s(self) -> float | None:
        return max(self.stop_latencies_s) if self.stop_latencies_s else None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        latency = self.max_stop_latency_s
        shown = f"{latency * 1000:.1f} ms" if latency is not None else "n/a"
        lines = [
            f"clients {self.clients}, disconnects {self.disconnects}, max_tokens {self.max_tokens}, "
            f"{self.duration_s:.1f} s",
            f"stop latency after disconnect: max {shown} (limit {MAX_STOP_LATENCY_S * 1000:.0f} ms)",
            f"threads before/after: {self.threads_before}/{self.threads_after}; server tasks before/after: "
            f"{self.tasks_before}/{self.tasks_after}; engine after: {self.engine_busy_after}",
            "OK: every staying client got its solo text" if self.ok else "PROBLEMS:\n  " + "\n  ".join(self.problems),
        ]
        return "\n".join(lines)


# ---- one client ----------------------------------------------------------------------------------------------
async def one_client(base_url: str, config: DisconnectLoadConfig, client: int, leave_after: int | None) -> TimedStream:
    """Stream one greedy answer on a connection pool of its own (a laptop of its own); with ``leave_after``,
    hang up after that many text chunks."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0,
                                  timeout=config.timeout) as api:
        return await timed_stream(api, config.model, [{"role": "user", "content": config.prompt(client)}],
                                  config.max_tokens, ignore_eos=config.ignore_eos, leave_after=leave_after)


# ---- the server side: threads, tasks, engine -------------------------------------------------------------------
def server_task_count(server: BackgroundServer) -> int:
    """asyncio tasks alive on the server's event loop (uvicorn's own included), counted on that loop."""
    loop = server.server.servers[0].get_loop()

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=10)


def wait_until_drained(server: BackgroundServer, engine: Engine, tasks_before: int, timeout: float = 10.0) -> None:
    """Give the server a moment to finish closing connections: engine idle and tasks back to the baseline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.active is None and engine.queued == 0 and server_task_count(server) <= tasks_before:
            return
        time.sleep(0.05)


# ---- the run -----------------------------------------------------------------------------------------------------
def run_disconnect_load(server: BackgroundServer, engine: Engine, config: DisconnectLoadConfig) -> DisconnectLoadReport:
    """Solo answers first, then all clients at once; returns the figures and every broken check."""
    url = server.base_url + "/v1"
    leaving = config.leaving()
    staying = [i for i in range(config.clients) if i not in leaving]

    async def solo() -> dict[int, TimedStream]:
        return {i: await one_client(url, config, i, None) for i in staying}

    async def together() -> list[TimedStream]:
        return await asyncio.gather(*(
            one_client(url, config, i, 1 + (i // 2) % config.chunks_before_disconnect if i in leaving else None)
            for i in range(config.clients)))

    idle_tasks = server_task_count(server)
    alone = asyncio.run(solo())
    wait_until_drained(server, engine, idle_tasks)
    threads_before, tasks_before = threading.active_count(), server_task_count(server)
    began = time.monotonic()
    results = asyncio.run(together())
    duration = time.monotonic() - began
    wait_until_drained(server, engine, tasks_before)
    report = DisconnectLoadReport(
        clients=config.clients, disconnects=len(leaving), max_tokens=config.max_tokens, duration_s=duration,
        stop_latencies_s=[], threads_before=threads_before, threads_after=threading.active_count(),
        tasks_before=tasks_before, tasks_after=server_task_count(server),
        engine_busy_after={"active": int(engine.active is not None), "queued": engine.queued})
    traces = {trace.request_id: trace for trace in engine.traces()}
    for client, result in enumerate(results):
        if not result.ok or (client in alone and not alone[client].ok):
            report.problems.append(f"client {client}: {result.error or alone[client].error}")
        elif client in leaving:
            _check_leaver(client, result, traces.get(result.request_id), config, report)
        elif result.text != alone[client].text or result.finish_reason != alone[client].finish_reason:
            report.problems.append(f"client {client}: text differs from its solo answer "
                                   f"({result.text!r} vs {alone[client].text!r})")
    if report.threads_after > threads_before:  # a leak is more after than before
        report.problems.append(f"threads: {threads_before} before, {report.threads_after} after")
    if report.tasks_after > tasks_before:
        report.problems.append(f"server tasks: {tasks_before} before, {report.tasks_after} after")
    if any(report.engine_busy_after.values()):
        report.problems.append(f"the engine is still busy: {report.engine_busy_after}")
    return report


def _check_leaver(client: int, result: TimedStream, trace: RequestTrace | None, config: DisconnectLoadConfig,
                  report: DisconnectLoadReport) -> None:
    """A client that hung up: its request was cancelled mid-answer, and stopped within the limit."""
    if result.left_at is None:
        report.problems.append(f"client {client}: its answer ended after {result.chunks} chunks, before it left")
        return
    if trace is None:
        report.problems.append(f"client {client}: no engine trace for {result.request_id}")
        return
    latency = trace.finished_at - result.left_at
    report.stop_latencies_s.append(latency)
    if trace.outcome != "cancelled" or trace.completion_tokens >= config.max_tokens:
        report.problems.append(f"client {client}: left after {result.chunks} chunks but the engine says "
                               f"{trace.outcome} after {trace.completion_tokens} tokens")
    if latency > MAX_STOP_LATENCY_S:
        report.problems.append(f"client {client}: generation stopped {latency:.3f} s after the disconnect")


# ---- command line ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimind_course.bench.disconnect_load", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .pth checkpoint (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--disconnects", type=int, default=32, help="how many of them close mid-answer")
    parser.add_argument("--max-tokens", type=int, default=96, help="answer length (ignore_eos: always reached)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the engine")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        config = DisconnectLoadConfig(clients=args.clients, disconnects=args.disconnects, max_tokens=args.max_tokens)
    except ValueError as err:
        parser.error(str(err))
    import torch

    torch.set_num_threads(args.threads)
    try:
        engine = Engine.from_pretrained(args.model, max_queue=max(64, config.clients))
    except Exception as err:
        raise SystemExit(f"error: cannot load the model: {str(err).splitlines()[0] if str(err) else err!r}") from None
    try:
        with BackgroundServer(create_app(engine)) as server:
            report = run_disconnect_load(server, engine, config)
    finally:
        engine.close()
    print(report.summary())
    if args.json_path:
        figures = {**asdict(report), "max_stop_latency_s": report.max_stop_latency_s}
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(figures, out, ensure_ascii=False, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
