"""`python -m minimind_course.serve`: it serves, and mistakes end with one stderr line and status 1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from minimind_course.serve import parse_args

SERVE = [sys.executable, "-m", "minimind_course.serve"]
MODEL = ["--model", os.environ["MINIMIND_TEST_MODEL"]] if os.environ.get("MINIMIND_TEST_MODEL") else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, encoding="utf-8", timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("--port", str(busy.getsockname()[1]))
    assert_one_line_error(result, "cannot listen on 127.0.0.1")


def test_bad_model_path_is_one_line_and_exit_1(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path / "missing"), "--port", "0"), "missing")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("--model", str(tmp_path / "junk.pth"), "--port", "0"), "junk.pth")


def test_options_are_parsed_for_both_backends():
    args = parse_args(["--backend", "vllm", "--cors-origins", "http://a, http://b", "--max-model-len", "512"])
    assert args.backend == "vllm" and args.cors_origins == ["http://a", "http://b"] and args.max_model_len == 512
    assert {"model", "host", "port", "served_model_name", "api_key", "dtype"} <= set(vars(args))


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serves_an_openai_endpoint_and_stops_cleanly(stop_signal):
    port = free_port()
    env = {**os.environ, "MINIMIND_API_KEY": "class-key"}
    process = subprocess.Popen([*SERVE, *MODEL, "--port", str(port), "--served-model-name", "tiny",
                                "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="class-key", max_retries=0) as client:
            answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                                    max_tokens=5, temperature=0)
        assert answer.model == "tiny" and answer.usage.completion_tokens <= 5
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # key taken from the env
    finally:
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode in (130, -signal.SIGTERM)  # the shell conventions for Ctrl+C and SIGTERM
    assert f"http://127.0.0.1:{port}/v1" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_max_model_len_is_one_line(value):
    assert_one_line_error(run_cli(*MODEL, "--max-model-len", value, "--port", "0"), "max_model_len")
