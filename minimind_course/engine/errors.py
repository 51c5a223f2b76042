"""What the engine refuses: each error maps to one HTTP status in the server."""

from __future__ import annotations


class EngineBusyError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class ContextLengthError(ValueError):
    """Prompt plus requested completion do not fit in the model's context (HTTP 400)."""

    def __init__(self, max_model_len: int, prompt_tokens: int, completion_tokens: int):
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} in "
            "the completion). Please reduce the length of the messages or completion."
        )


class UnknownAdapterError(KeyError):
    """A request named a LoRA adapter the engine has not loaded (HTTP 404, like an unknown model)."""


class PromptError(ValueError):
    """The messages could not be turned into a prompt (bad role order, bad template argument...)."""


class RequestTooLargeError(ValueError):
    """The request can never be scheduled (more choices than seats, or prompts bigger than the KV cache)."""

    def __init__(self, message: str, param: str):
        self.param = param
        super().__init__(message)
