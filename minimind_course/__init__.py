"""minimind-course: serve MiniMind behind an OpenAI-compatible API (FastAPI + SSE, then real vLLM).

Importing the package registers the MiniMind architecture with transformers' Auto classes.
"""

from minimind_course import model as _model  # noqa: F401  (registers model_type "minimind")

__version__ = "0.1.0"
