"""The benchmark CLI against our served bundled model: sane JSON, errors counted, one-line failures.

No timing thresholds here: speed is measured by the benchmark itself, never asserted by tests.
"""

import asyncio
import json

import pytest

from minimind_course.bench import cli as bench
from minimind_course.bench import loadgen
from minimind_course.bench.loadgen import LevelResult, SweepConfig, percentile
from minimind_course.bench.timing import TimedStream


def test_short_sweep_writes_sane_json(base_url, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = bench.main(["--base-url", base_url, "--concurrency", "1,2", "--requests-per-level", "3", "--rounds", "2",
                       "--max-tokens", "6", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["settings"]["concurrency"] == [1, 2]
    assert "api_key" not in report["settings"]
    assert report["settings"]["rounds"] == 2
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level, sent in zip(report["levels"], (3, 4)):  # max(3, 2 x 1), then max(3, 2 x 2): two waves of two
        assert level["requests"] == len(level["records"]) == sent
        assert level["errors"] == 0 and level["error_messages"] == []
        assert level["output_tokens"] == sent * 6  # ignore_eos: every answer is exactly max_tokens long
        assert level["tokens_per_chunk"] == 6 * sent / sum(record["chunks"] for record in level["records"]) >= 1
        assert level["output_tokens_per_s"] > 0 and level["duration_s"] > 0
        for name in ("ttft_s", "itl_s", "request_tokens_per_s"):
            stats = level[name]
            assert 0 < stats["p50"] <= stats["p95"] <= stats["max"], (name, stats)
        for record in level["records"]:
            assert record["ok"] and record["prompt_tokens"] > 0 and record["output_tokens"] == 6
            assert 0 < record["ttft"] <= record["latency"]
    table = capsys.readouterr().out
    assert "tok/s total" in table and str(out) in table
    # the server's own /metrics next to the client's view: it generated at least this sweep's tokens
    assert "server /metrics:" in table and report["server_metrics"]["vllm:generation_tokens_total"] >= (3 + 4) * 6


def test_sweep_is_the_default_subcommand(base_url, tmp_path):
    out = tmp_path / "sweep.json"
    code = bench.main(["sweep", "--base-url", base_url, "--concurrency", "1", "--requests-per-level", "1",
                       "--rounds", "1", "--max-tokens", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text(encoding="utf-8"))["levels"][0]["output_tokens"] == 2


def test_refused_requests_are_counted_as_errors(make_server, tmp_path, capsys):
    small = make_server(max_queue=1)  # one request generating, one waiting: the rest get HTTP 429
    out = tmp_path / "sweep.json"
    code = bench.main(["--base-url", small.base_url + "/v1", "--concurrency", "6", "--requests-per-level", "6",
                       "--rounds", "1", "--max-tokens", "24", "--no-progress", "--out", str(out)])
    level = json.loads(out.read_text(encoding="utf-8"))["levels"][0]
    assert code == 1
    assert 1 <= level["errors"] <= 5  # at least the first request is served
    assert level["output_tokens"] == (6 - level["errors"]) * 24
    assert all("429" in message or "RateLimit" in message for message in level["error_messages"])
    assert "request(s) failed" in capsys.readouterr().err


def test_unreachable_endpoint_is_one_line(capsys):
    code = bench.main(["--base-url", "http://127.0.0.1:9/v1", "--concurrency", "1", "--no-progress",
                       "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: the warm-up request to http://127.0.0.1:9/v1 failed")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("levels", ["0,1", "1,x", ""])
def test_bad_concurrency_is_refused(levels, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--concurrency", levels])
    assert exit_info.value.code == 2
    assert "concurrency" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--rounds", "--requests-per-level"])
def test_rounds_and_requests_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["rounds", "requests_per_level", "max_tokens"])
def test_sweep_config_refuses_zero(field):
    with pytest.raises(ValueError, match=field):
        SweepConfig("http://127.0.0.1:9/v1", **{field: 0})


def test_each_level_sends_rounds_waves_with_concurrency_in_flight(monkeypatch):
    """A level with C users sends max(requests_per_level, rounds x C) requests, never more than C at once, and
    cycles the prompts in order; no server needed: the request itself is replaced."""
    in_flight, peak, sent = 0, {}, []

    async def fake_request(client, config, prompt):
        nonlocal in_flight
        in_flight += 1
        peak[level] = max(peak.get(level, 0), in_flight)
        sent.append(prompt)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return TimedStream(True, ttft=0.001, latency=0.002, output_tokens=4, chunks=2)

    monkeypatch.setattr(loadgen, "timed_request", fake_request)
    config = SweepConfig("http://127.0.0.1:9/v1", concurrency=(1, 3, 8), requests_per_level=5, rounds=4,
                         prompts=("a", "b", "c"))
    assert [config.requests_at(c) for c in config.concurrency] == [5, 12, 32]
    for level in config.concurrency:
        sent.clear()
        result = asyncio.run(loadgen.run_level(None, config, level))
        assert len(result.records) == config.requests_at(level) and result.errors == 0
        assert peak[level] == level  # the workers keep exactly C in flight
        assert sent[:4] == ["a", "b", "c", "a"] and len(sent) == config.requests_at(level)
        assert result.tokens_per_chunk == 2.0 and result.output_tokens == 4 * len(sent)


def test_tokens_per_chunk_counts_only_answered_requests():
    records = [TimedStream(True, ttft=0.1, latency=0.5, output_tokens=8, chunks=2),
               TimedStream(True, ttft=0.1, latency=0.5, output_tokens=8, chunks=8),
               TimedStream(False, error="boom")]
    assert LevelResult(2, 1.0, records).tokens_per_chunk == 16 / 10
    assert LevelResult(1, 1.0, [TimedStream(False, error="boom")]).tokens_per_chunk is None


def test_percentile_interpolates_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0


def test_inter_token_latency_is_per_token_not_per_chunk():
    """11 tokens in one second after the first: 10 gaps of 0.1 s, however many chunks carried them."""
    timed = TimedStream(True, ttft=0.1, latency=1.1, output_tokens=11, chunks=2)
    assert timed.itl == pytest.approx(0.1)
    assert TimedStream(True, ttft=0.1, latency=0.1, output_tokens=1).itl is None
    assert TimedStream(False, error="boom").itl is None


def test_bench_prefix_report_reads_as_ratios():
    from minimind_course.bench.prefix import format_prefix

    side = {"cold_ttft_s": 0.2, "warm_ttft_s": 0.04, "warm_over_cold": 0.2, "prompt_tokens": 812.0,
            "zero_hit_tokens_per_s": 990.0, "zero_hit_tokens_per_cpu_s": 1100.0}
    report = {"config": {"rounds": 5}, "off": side | {"warm_ttft_s": 0.21, "warm_over_cold": 1.05},
              "on": side | {"chat": {"turns": 10, "reused": 0.9, "hits": 900, "queries": 1000}},
              "zero_hit_throughput_on_over_off": 1.0, "zero_hit_cpu_throughput_on_over_off": 0.99, "loadavg_before": (1.0, 1.0, 1.0),
              "loadavg_after": (2.0, 1.5, 1.0)}
    text = format_prefix(report)
    assert "warm/cold 1.05" in text and "warm/cold 0.20" in text and "90% of its prompt tokens" in text
    assert "on/off: 1.000 (wall), 0.990 (CPU time)" in text and "1.00, 1.00, 1.00 / 2.00, 1.50, 1.00" in text
