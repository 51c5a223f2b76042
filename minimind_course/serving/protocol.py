"""The OpenAI wire format: request models (validated by pydantic) and the error envelope.

Responses are built from the openai SDK's own types (``openai.types``) in ``serving/app.py``, so what we send is
exactly what the official client parses. Requests accept every field real clients send; fields we do not
use are ignored, fields we cannot honour get a clear 400 instead of being silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from minimind_course.engine.sampling import SamplingParams

MAX_N = 8  # choices per request; each one costs a full generation on the single worker
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
SAMPLING_EPS = 1e-5  # vLLM's rule: a temperature below this is greedy (dividing logits by it would overflow)
INT64 = (-(2**63), 2**63 - 1)  # a seed must fit torch.Generator.manual_seed


class OpenAIError(Exception):
    """An error the server reports in OpenAI's envelope with the given HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
             413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError", 429: "RateLimitError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as vLLM sends it."""
    kind = OpenAIError.TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"); they are not text and no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains an unpaired surrogate at position {err.start}: not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class _Request(BaseModel):
    """Unknown fields are accepted and ignored, like OpenAI's own API does for forward compatibility.
    Numbers must be finite: Python's JSON reader accepts NaN and Infinity, which no parameter means."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """Content as one string: text parts are joined with newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role  # newer SDKs say developer for system
        return {"role": role, "content": self.text()}


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=2.0)  # below 0.01 sampled logits overflow
    ignore_eos: bool = False  # vLLM extra: generate max_tokens tokens even past end-of-sequence
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int, defaults: dict[str, float]) -> SamplingParams:
        """Request values, else the model's generation_config defaults, else OpenAI's defaults."""

        def pick(name: str, fallback: float) -> float:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        temperature = float(pick("temperature", 1.0))
        return SamplingParams(
            n=self.n,
            temperature=temperature if temperature >= SAMPLING_EPS else 0.0,
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_wanted(),
        )

    def logprobs_wanted(self) -> int | None:
        """None, or how many alternatives to report with each token's log-probability."""
        return None


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (newer SDKs, LangChain) wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]


class CompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/completions``: one prompt, as text or as token ids."""

    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's and vLLM's default for this legacy endpoint
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list)):
            raise ValueError("send one prompt per request (batched prompts are not supported)")
        return prompt

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo or self.suffix or self.logprobs:
            raise ValueError("echo, suffix and logprobs are not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by this server")
        return self

    def single_prompt(self) -> str | list[int]:
        """The prompt as one string or one list of token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return self.prompt[0]
        return self.prompt
