"""Plug and play: what third-party OpenAI clients need to talk to MiniMind (notebook 08, docs/clients.md).

Python clients (openai, LangChain, LlamaIndex) need only a base URL, any key and the model name, so notebook 08
calls them directly. Here live the pieces that are not one line: the exact ``curl`` command (run for real, its
SSE parsed), the ChatML prompt a ``/v1/completions`` client must build itself, and the settings a learner types
into GUI apps (NextChat, Chatbox, VS Code extensions).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

Messages = Sequence[dict[str, str]]


def chatml_prompt(messages: Messages, tokenizer=None) -> str:
    """Render messages with the model's own chat template, ending with the assistant prompt.

    ``/v1/completions`` takes raw text: a completion client (LlamaIndex ``is_chat_model=False``) must apply the
    template itself, or the chat model sees no turn structure and answers badly. ``tokenizer`` None: the bundled
    model's.
    """
    if tokenizer is None:
        from transformers import AutoTokenizer

        from minimind_course.model.loading import BUNDLED_MODEL_DIR

        tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL_DIR))
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


# ---- curl ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurlAnswer:
    """What one curl call returned: the assistant text, finish reason, usage dict and the raw response body."""

    text: str
    finish_reason: str | None
    usage: dict[str, int] | None
    raw: str


def curl_chat_command(
    base_url: str, model: str, messages: Messages, *, api_key: str = "not-needed", max_tokens: int = 64,
    temperature: float = 0.0, stream: bool = False,
) -> list[str]:
    """The argv of a ``curl`` call to ``/chat/completions`` (print it with ``shlex.join`` to copy-paste)."""
    body = {"model": model, "messages": list(messages), "temperature": temperature, "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    command = ["curl", "-sS", "--fail-with-body", f"{base_url.rstrip('/')}/chat/completions",
               "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {api_key}",
               "-d", json.dumps(body, ensure_ascii=False)]
    return command[:2] + ["-N"] + command[2:] if stream else command  # -N: print each event as it arrives


def curl_chat(base_url: str, model: str, messages: Messages, **options) -> CurlAnswer:
    """Run the real ``curl`` (raises FileNotFoundError if it is not installed) and read its answer.

    With ``stream=True`` the Server-Sent Events are parsed: deltas joined, usage from the last chunk; the stream
    must end with ``data: [DONE]``.
    """
    if shutil.which("curl") is None:
        raise FileNotFoundError("curl is not installed")
    command = curl_chat_command(base_url, model, messages, **options)
    done = subprocess.run(command, capture_output=True, timeout=300, check=False)
    raw = done.stdout.decode("utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"curl exited with {done.returncode}: {raw or done.stderr.decode('utf-8', 'replace')}")
    if not options.get("stream"):
        body = json.loads(raw)
        choice = body["choices"][0]
        return CurlAnswer(choice["message"]["content"] or "", choice["finish_reason"], body.get("usage"), raw)
    return _parse_sse(raw)


def _parse_sse(raw: str) -> CurlAnswer:
    """Join the content deltas of an SSE chat stream (blank-line separated ``data:`` events)."""
    events = [block.removeprefix("data: ") for block in raw.split("\n\n") if block.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise ValueError("the stream did not end with data: [DONE]")
    text, finish_reason, usage = [], None, None
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            raise RuntimeError(f"the server reported an error mid-stream: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:  # the usage chunk has an empty list
            text.append(choice["delta"].get("content") or "")
            finish_reason = choice.get("finish_reason") or finish_reason
    return CurlAnswer("".join(text), finish_reason, usage, raw)


# ---- GUI apps ----------------------------------------------------------------------------------------------
def app_settings(base_url: str = "http://localhost:8998/v1", model: str = "minimind",
                 api_key: str = "any-key") -> dict[str, dict[str, str]]:
    """What to type into popular OpenAI-compatible apps, field by field (the field names each app shows)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    return {
        "NextChat": {
            "Settings → Custom Endpoint": "on",
            "Model Provider": "OpenAI",
            "OpenAI Endpoint": root,  # NextChat appends /v1/chat/completions itself
            "OpenAI API Key": api_key,
            "Custom Models": f"-all,+{model}",
            "Model": model,
        },
        "Chatbox": {
            "Settings → Model Provider": "Add custom provider",
            "API Mode": "OpenAI API Compatible",
            "API Host": root,
            "API Path": "/v1/chat/completions",
            "API Key": api_key,
            "Model": model,
        },
        "Continue (VS Code, config.yaml)": {
            "provider": "openai",
            "model": model,
            "apiBase": base_url,
            "apiKey": api_key,
        },
        "Cline (VS Code)": {
            "API Provider": "OpenAI Compatible",
            "Base URL": base_url,
            "API Key": api_key,
            "Model ID": model,
        },
    }


def format_app_settings(settings: dict[str, dict[str, str]]) -> str:
    """The settings as aligned text, one block per app."""
    blocks = []
    for app, fields in settings.items():
        width = max(len(name) for name in fields)
        blocks.append("\n".join([app] + [f"  {name:<{width}}  {value}" for name, value in fields.items()]))
    return "\n\n".join(blocks)


def shell_command(argv: Sequence[str]) -> str:
    """An argv as one line a learner can paste into a POSIX shell."""
    return shlex.join(argv)
