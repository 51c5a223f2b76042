"""Security defaults (issue 8): local-only binding, the API key from flag or environment, constant-time checks."""

from __future__ import annotations

import asyncio
import hmac

import httpx

from minimind_course.serve import parse_args
from minimind_course.serving.app import DEFAULT_MAX_BODY_BYTES


def test_the_cli_listens_on_this_machine_only_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert (args.max_queue, args.max_body_bytes, args.cors_origins) == (64, DEFAULT_MAX_BODY_BYTES, None)
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
    assert parse_args(["--cors-origins", "*"]).cors_origins == ["*"]  # every website: only when asked for


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("MINIMIND_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "from-flag"]).api_key == "from-flag"
    monkeypatch.setenv("MINIMIND_API_KEY", "")
    assert parse_args([]).api_key is None  # an empty variable does not lock everyone out


def test_keys_are_compared_in_constant_time_and_health_is_not_checked(make_server, monkeypatch):
    server = make_server(api_key="sesame")
    compared = []
    real = hmac.compare_digest

    def spy(given, expected):
        compared.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert compared == []
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers={"x-api-key": "sesame"}).status_code == 200
    assert compared == [(b"Bearer nope", b"Bearer sesame"), (b"", b"sesame"),  # Bearer, then Anthropic's x-api-key
                        (b"Bearer sesame", b"Bearer sesame"), (b"", b"Bearer sesame"), (b"sesame", b"sesame")]


EXTENSION = "chrome-extension://bpoadfkcbjbfhfodiogcnhhhpibjhbnh"  # a page-translation plug-in's own origin
PARAGRAPHS = ["The weather is nice today.", "今天天气很好。", "Where is the train station?", "我喜欢学习语言模型。",
              "MiniMind is a small language model.", "请把这句话翻译成英文。"] * 4


async def test_a_translation_plugin_burst_from_an_extension_origin(make_server):
    """Immersive-translation style: a preflight from the extension's origin, then one short request per paragraph at
    once. Every request is answered (200, or a 429 in OpenAI's shape when the queue is full), none takes the server
    down, and each answer is the one the same request gets alone."""
    server = make_server(max_queue=16)
    url = server.base_url + "/v1/chat/completions"
    headers = {"Origin": EXTENSION, "Authorization": "Bearer sk-xxxx"}
    preflight = httpx.options(url, headers={"Origin": EXTENSION, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == EXTENSION

    def body(text: str) -> dict:
        return {"model": "minimind", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": "Translate the user's text into Chinese."},
                             {"role": "user", "content": text}]}

    async with httpx.AsyncClient(timeout=120) as http:
        replies = await asyncio.gather(*(http.post(url, json=body(text), headers=headers) for text in PARAGRAPHS))
        assert {reply.status_code for reply in replies} <= {200, 429}
        assert sum(reply.status_code == 200 for reply in replies) >= 16
        for reply in replies:
            assert reply.headers["access-control-allow-origin"] == EXTENSION
            if reply.status_code == 429:
                assert reply.json()["error"]["type"] == "RateLimitError"
        alone = {text: (await http.post(url, json=body(text))).json()["choices"][0]["message"]["content"]
                 for text in set(PARAGRAPHS)}
    for text, reply in zip(PARAGRAPHS, replies):
        if reply.status_code == 200:
            assert reply.json()["choices"][0]["message"]["content"] == alone[text]
    assert httpx.get(server.base_url + "/health").status_code == 200
