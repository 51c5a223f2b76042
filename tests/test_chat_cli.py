"""The terminal chat as a user runs it: a subprocess, piped or on a pseudo-terminal, against the running server."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimind_course.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
EN_NAME, ZH_NAME = "Dmitri", "王思远"  # held-out names (never in training); eval_tiny measures the recall rate


def chat(*args: str, lines: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with ``lines`` piped to stdin; UTF-8 both ways."""
    return subprocess.run(
        [sys.executable, "-m", "minimind_course.chat", *args],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        encoding="utf-8",
        cwd=ROOT,
        timeout=300,
    )


def conversation(base_url: str, history: int, intro: str, question: str, tmp_path: Path) -> list[str]:
    """Pipe intro + question (+ /save), check the printed answers match the saved ones, return the answers."""
    saved = tmp_path / f"history{history}.json"
    run = chat("--base-url", base_url, "--history", str(history), "--temperature", "0", "--max-tokens", "48",
               lines=[intro, question, f"/save {saved}"])
    assert run.returncode == 0, run.stderr
    messages = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["content"] for m in messages[::2]] == [intro, question]
    answers = [m["content"] for m in messages[1::2]]
    assert run.stdout == "".join(answer + "\n" for answer in answers)  # each answer on its own line(s), in order
    return answers


@pytest.mark.parametrize(
    ("intro", "question", "name"),
    [(f"My name is {EN_NAME}.", "What is my name?", EN_NAME), (f"我叫{ZH_NAME}。", "我叫什么名字？", ZH_NAME)],
)
def test_piped_history_one_pair_remembers_and_zero_forgets(base_url, tmp_path, intro, question, name):
    _, recalled = conversation(base_url, 1, intro, question, tmp_path)
    assert name in recalled
    _, forgot = conversation(base_url, 0, intro, question, tmp_path)
    assert name not in forgot
    assert "know" in forgot or "不知道" in forgot


def test_reset_and_history_commands(base_url):
    run = chat("--base-url", base_url, "--history", "1", "--temperature", "0", "--max-tokens", "48",
               lines=[f"My name is {EN_NAME}.", "/history", "/reset", "/history", "What is my name?"])
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert f"* 1. user: My name is {EN_NAME}." in out
    assert "(no history yet)" in out
    assert EN_NAME not in out[-1]
    assert "history cleared" in run.stderr


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_server_down_is_one_line_and_non_zero():
    url = f"http://127.0.0.1:{free_port()}/v1"
    run = chat("--base-url", url, lines=["hello"])
    assert_one_line_error(run, "cannot reach", url)
    assert run.stdout == ""


def test_unknown_model_is_one_line_and_non_zero(base_url):
    run = chat("--base-url", base_url, "--model", "gpt-4", lines=["hello"])
    assert_one_line_error(run, "'gpt-4' is not served", "minimind")


def test_over_budget_question_stops_a_piped_run(base_url, tmp_path):
    never = tmp_path / "never.json"
    run = chat("--base-url", base_url, "--max-history-tokens", "40", "--temperature", "0", "--max-tokens", "8",
               lines=["hi", "x" * 200, "never sent", f"/save {never}"])
    assert_one_line_error(run, "budget of 40")
    assert run.stdout.strip()  # the first answer was printed
    assert not never.exists()  # nothing after the error ran


def test_bad_usage_exits_with_argparse_status():
    run = chat("--history", "-1", lines=[])
    assert run.returncode == 2 and "must be >= 0" in run.stderr


def read_until(fd: int, marker: str, timeout: float = 120.0) -> str:
    """Read from the pseudo-terminal until ``marker`` appears."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {seen.decode(errors='replace')!r}")
        seen += os.read(fd, 4096)
    return seen.decode("utf-8", errors="replace")


def test_interactive_on_a_terminal(base_url):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "minimind_course.chat", "--base-url", base_url, "--history", "1",
         "--temperature", "0", "--max-tokens", "48"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, close_fds=True,
    )
    os.close(terminal)
    try:
        read_until(controller, "you> ")
        os.write(controller, f"我叫{ZH_NAME}。\n".encode())
        read_until(controller, "you> ")
        os.write(controller, "我叫什么名字？\n".encode())
        answer = read_until(controller, "you> ")
        assert "minimind> " in answer and ZH_NAME in answer.split("minimind> ")[-1]
        os.write(controller, b"/quit\n")
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(controller)
