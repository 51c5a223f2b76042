"""The engine layer: continuous batching (``engine`` the threaded front, ``core`` the step, ``scheduler``,
``block_manager``, ``kv_cache``, ``runner``), sampling, incremental detokenizing, stop strings.

``Engine`` and ``SamplingParams`` are loaded on first use, so ``engine.config`` (the defaults) imports no torch."""

from __future__ import annotations

import importlib

__all__ = ["Engine", "SamplingParams"]
_HOMES = {"Engine": "minimind_course.engine.engine", "SamplingParams": "minimind_course.engine.sampling"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
