"""The serving layer: the OpenAI wire (``protocol``), the FastAPI app (``app``), responses and SSE, middleware,
reasoning split, and the launcher of real vLLM (``vllm_launcher``)."""
