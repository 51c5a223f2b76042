"""`bench overhead`: both sides measured, sane JSON, one-line failures. No speed thresholds (those are the
benchmark's job, not the tests')."""

import json

from minimind_course.bench import cli as bench


def test_overhead_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert bench.main(["overhead", "--tokens", "12", "--runs", "2", "--ttft-runs", "3", "--threads", "1",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["benchmark"] == "overhead" and report["tokens_per_request"] == 12
    for side in ("in_process", "http"):
        assert report[side]["tok_s"] > 0 and report[side]["ttft_ms_p50"] > 0
    assert report["http"]["ttft_ms_p90"] >= report["http"]["ttft_ms_p50"]
    assert report["http_over_in_process_tok_s"] == report["http"]["tok_s"] / report["in_process"]["tok_s"]
    assert "ratio" in capsys.readouterr().out


def test_overhead_with_a_bad_model_is_one_line(tmp_path, capsys):
    assert bench.main(["overhead", "--model", str(tmp_path / "missing"), "--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1
