"""minimind-course: serve MiniMind behind an OpenAI-compatible API (FastAPI + SSE, then real vLLM).

The package is split by layer: ``model`` (architecture, loading, export), ``engine`` (decode loop, sampling),
``serving`` (the OpenAI wire: protocol, app, SSE, vLLM launcher), ``client`` (history, ChatSession, terminal chat),
``bench`` (load generation and benchmarks) and ``training`` (how MiniMind-Tiny is built). Importing the package
imports none of them, so the client side never pulls in torch; ``import minimind_course.model`` registers the
MiniMind architecture with transformers' Auto classes.
"""

import logging

__version__ = "0.1.0"

# A library stays quiet until its user configures logging (`serve` does: every 4xx is logged there).
logging.getLogger(__name__).addHandler(logging.NullHandler())
