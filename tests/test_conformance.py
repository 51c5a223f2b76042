"""The backend-agnostic OpenAI conformance checks, run against our own server (the ``endpoint`` fixture)."""

from openai_conformance import *  # noqa: F401,F403  (the checks are collected here)
