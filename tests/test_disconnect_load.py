"""Load with disconnects (issue 8): 64 concurrent streaming clients, 32 of them hang up after a few chunks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from minimind_course.bench.disconnect_load import MAX_STOP_LATENCY_S, DisconnectLoadConfig, run_disconnect_load
from minimind_course.engine.engine import Engine
from minimind_course.engine.sampling import SamplingParams


def test_64_streaming_clients_half_of_them_disconnecting(server, engine, capsys):
    config = DisconnectLoadConfig(clients=64, disconnects=32, max_tokens=96)
    report = run_disconnect_load(server, engine, config)
    with capsys.disabled():
        print("\n" + report.summary())
    assert report.problems == []  # staying clients got their solo text; leavers cancelled mid-answer, in time
    assert (report.clients, report.disconnects, len(report.stop_latencies_s)) == (64, 32, 32)
    assert 0 < report.max_stop_latency_s <= MAX_STOP_LATENCY_S
    assert report.threads_after <= report.threads_before and report.tasks_after <= report.tasks_before  # no leak
    assert report.engine_busy_after == {"active": 0, "queued": 0}


def test_leaving_clients_are_spread_over_all_clients():
    assert DisconnectLoadConfig(clients=64, disconnects=32).leaving() == set(range(0, 64, 2))
    assert DisconnectLoadConfig(clients=5, disconnects=0).leaving() == set()
    assert len(DisconnectLoadConfig(clients=7, disconnects=7).leaving()) == 7


def test_command_line_prints_the_figures_and_writes_json(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, "-m", "minimind_course.bench.disconnect_load", "--clients", "6",
                             "--disconnects", "3", "--max-tokens", "24", "--json", str(out)],
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clients 6, disconnects 3" in result.stdout and "stop latency after disconnect" in result.stdout
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["problems"] == [] and len(figures["stop_latencies_s"]) == 3
    assert figures["threads_after"] <= figures["threads_before"]


@pytest.mark.asyncio(loop_scope="session")
async def test_engine_traces_say_how_each_request_ended(engine):
    """The measure the load relies on: finished, cancelled mid-answer (with both times), skipped while queued."""
    own = Engine(engine.model, engine.tokenizer, max_num_seqs=1)  # one seat: "queued" really waits in the queue
    try:
        prompt = own.encode(own.chat_prompt([{"role": "user", "content": "你好"}]))
        await own.submit(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "done").result()
        endless = own.submit(prompt, SamplingParams(temperature=0, max_tokens=900, ignore_eos=True), "left")
        queued = own.submit(prompt, SamplingParams(temperature=0, max_tokens=4), "queued")
        queued.cancel()
        await endless.__aiter__().__anext__()  # it is generating now
        endless.cancel()
        while own.active is not None or own.queued:
            await asyncio.sleep(0.01)
    finally:
        own.close()
    traces = {trace.request_id: trace for trace in own.traces()}
    assert (traces["done"].outcome, traces["done"].completion_tokens, traces["done"].cancelled_at) == ("finished", 4,
                                                                                                      None)
    left = traces["left"]
    assert left.outcome == "cancelled" and 0 < left.completion_tokens < 900
    assert left.cancelled_at <= left.finished_at < left.cancelled_at + MAX_STOP_LATENCY_S
    assert (traces["queued"].outcome, traces["queued"].completion_tokens) == ("skipped", 0)
    # in the order the worker let go: a cancelled request at the head of the queue is dropped between steps,
    # without waiting for the running one to end
    assert [t.request_id for t in own.traces()] == ["done", "queued", "left"]
