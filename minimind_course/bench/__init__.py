"""Load generation and benchmarks (``python -m minimind_course.bench``); the HTTP side imports no torch."""
