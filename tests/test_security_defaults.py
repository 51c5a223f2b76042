"""Security defaults (issue 8): local-only binding, the API key from flag or environment, constant-time checks."""

from __future__ import annotations

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
