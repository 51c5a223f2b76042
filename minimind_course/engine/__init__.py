"""The engine layer: continuous batching on a worker thread (``engine``, ``scheduler``, ``kv_cache``, ``runner``,
``sequence``), sampling, incremental detokenizing, stop strings."""

from minimind_course.engine.engine import Engine
from minimind_course.engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams"]
