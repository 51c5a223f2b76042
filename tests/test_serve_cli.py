"""`python -m minimind_course.serve`: it serves, and mistakes end with one stderr line and status 1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import safetensors.torch
import torch

from minimind_course.model.loading import BUNDLED_MODEL_DIR
from minimind_course.launch import free_port, wait_for_health
from minimind_course.serve import parse_args

SERVE = [sys.executable, "-m", "minimind_course.serve"]
MODEL = ["--model", os.environ["MINIMIND_TEST_MODEL"]] if os.environ.get("MINIMIND_TEST_MODEL") else []


def run_cli(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:  # put a stand-in module (or sitecustomize) first on the import path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, encoding="utf-8", timeout=120, env=env)


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


def model_folder_with_weights(folder: Path, weights: bytes) -> Path:
    """The bundled model's config and tokenizer next to the given bytes as model.safetensors."""
    folder.mkdir()
    for source in BUNDLED_MODEL_DIR.iterdir():
        if source.is_file() and source.suffix in (".json", ".jinja"):
            (folder / source.name).write_bytes(source.read_bytes())
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_corrupt_weights_are_one_line_and_exit_1(tmp_path):
    weights = (BUNDLED_MODEL_DIR / "model.safetensors").read_bytes()
    garbage = model_folder_with_weights(tmp_path / "garbage", b"\x93not safetensors at all\x00" * 400)
    assert_one_line_error(run_cli("--model", str(garbage), "--port", "0"), str(garbage))
    truncated = model_folder_with_weights(tmp_path / "truncated", weights[: len(weights) // 3])
    assert_one_line_error(run_cli("--model", str(truncated), "--port", "0"), str(truncated))
    checkpoint = tmp_path / "full_sft_256.pth"
    torch.save(safetensors.torch.load(weights), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # a download cut short
    assert_one_line_error(run_cli("--model", str(checkpoint), "--port", "0"), str(checkpoint))


def test_backend_vllm_without_vllm_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["vllm"] = None  # as if not installed\n',
                                               encoding="utf-8")
    result = run_cli("--backend", "vllm", "--port", "0", pythonpath=tmp_path)
    assert_one_line_error(result, "vLLM is not installed")
    assert "pip install" in result.stderr


def test_backend_vllm_that_cannot_be_imported_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(
        'raise ImportError("libcudart.so.12: cannot open shared object file")\n', encoding="utf-8")
    result = run_cli("--backend", "vllm", "--port", "0", pythonpath=tmp_path)
    assert_one_line_error(result, "vLLM is installed but cannot be imported: ImportError: libcudart.so.12")


def test_options_are_parsed_for_both_backends():
    args = parse_args(["--backend", "vllm", "--cors-origins", "http://a, http://b", "--max-model-len", "512"])
    assert args.backend == "vllm" and args.cors_origins == ["http://a", "http://b"] and args.max_model_len == 512
    assert {"model", "host", "port", "served_model_name", "api_key", "dtype"} <= set(vars(args))


def test_tool_grammar_defaults_to_lazy_on_our_backend_and_is_refused_for_vllm(capsys):
    assert parse_args([]).tool_grammar == "lazy" and parse_args(["--tool-grammar", "off"]).tool_grammar == "off"
    assert parse_args(["--backend", "vllm"]).tool_grammar == "off"  # vLLM leaves tool_choice auto free
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--backend", "vllm", "--tool-grammar", "lazy"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "--tool-grammar lazy is this package's server only" in lines[-1]


def ignore_sigint() -> None:
    """What a shell does to a background job (`serve ... &`): the child starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stop_signal,preexec", [(signal.SIGINT, None), (signal.SIGTERM, None),
                                                 (signal.SIGINT, ignore_sigint)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-background-job"])
def test_serves_an_openai_endpoint_and_stops_cleanly(stop_signal, preexec):
    port = free_port()
    env = {**os.environ, "MINIMIND_API_KEY": "class-key"}
    process = subprocess.Popen([*SERVE, *MODEL, "--port", str(port), "--served-model-name", "tiny",
                                "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8", preexec_fn=preexec)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", alive=lambda: process.poll() is None, timeout=120)
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
    assert "WARNING:  minimind_course.serving  401 param=None Invalid or missing API key" in stderr  # 4xx logged


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_max_model_len_is_one_line(value):
    assert_one_line_error(run_cli(*MODEL, "--max-model-len", value, "--port", "0"), "max_model_len")


def test_batching_flags_reach_the_engine_and_bad_values_are_refused(capsys):
    args = parse_args(["--max-num-seqs", "8", "--kv-cache-memory", "64", "--max-num-batched-tokens", "128"])
    assert (args.max_num_seqs, args.kv_cache_memory, args.max_num_batched_tokens) == (8, 64, 128)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-num-seqs", "0"])
    assert exit_info.value.code == 2 and "--max-num-seqs must be at least 1" in capsys.readouterr().err


def test_a_kv_cache_smaller_than_one_sequence_is_one_line():
    result = run_cli(*MODEL, "--kv-cache-memory", "1", "--port", "0")  # 1 MiB: 256 tokens of the bundled model
    assert_one_line_error(result, "KV cache of 1 MiB holds")


def test_flags_vllm_shares_are_passed_to_it_before_its_own():
    from minimind_course.serving.vllm_launcher import vllm_flags

    assert vllm_flags(parse_args(["--backend", "vllm", "--tool-grammar", "off"])) == ["--max-num-seqs", "32"]
    args = parse_args(["--backend", "vllm", "--no-enable-prefix-caching", "--max-num-seqs", "4", "--",
                       "--gpu-memory-utilization", "0.8"])
    assert vllm_flags(args) == ["--max-num-seqs", "4", "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.8"]
