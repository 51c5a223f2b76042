"""The engine layer: the decode loop on a worker thread (``engine``), sampling, incremental detokenizing, stop strings."""

from minimind_course.engine.engine import Engine
from minimind_course.engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams"]
