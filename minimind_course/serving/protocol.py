"""The OpenAI wire format: request models (validated by pydantic) and the error envelope.

Responses are built from the openai SDK's own types (``openai.types``) in ``serving/app.py``, so what we send is
exactly what the official client parses. Requests accept every field real clients send; fields we do not
use are ignored, fields we cannot honour get a clear 400 instead of being silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from jsonschema import Draft202012Validator, SchemaError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from minimind_course.engine.sampling import SamplingParams
from minimind_course.tool_format import canonical_arguments

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


class ParamError(ValueError):
    """A request error found by a model-level check, naming the parameter it is about (``param`` of the 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12 meta-schema check), else a ValueError saying what is wrong."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        where = "/".join(str(part) for part in err.absolute_path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {err.message}") from None
    return schema


Schema = Annotated[dict[str, Any], AfterValidator(_json_schema)]
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]  # OpenAI's rule for function names


class _Request(BaseModel):
    """Unknown fields are accepted and ignored, like OpenAI's own API does for forward compatibility.
    Numbers must be finite: Python's JSON reader accepts NaN and Infinity, which no parameter means."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text
    arguments: Text  # a JSON string, as the model wrote it


class ToolCall(_Request):
    """A call in an assistant message of the history."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: Text | None = None  # tool messages only: the call this result answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """Content as one string: text parts are joined with newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role  # newer SDKs say developer for system
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            for call in message["tool_calls"]:  # as the model writes them, whatever JSON style the client re-sent
                call["function"]["arguments"] = canonical_arguments(call["function"]["arguments"])
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: Schema | None = None  # absent: a function without arguments
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    name: FunctionName
    description: Text | None = None
    schema_: Schema | None = Field(None, alias="schema")  # absent: any JSON object
    strict: bool | None = None


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]  # OpenAI's values


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
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None  # Open WebUI sends it: switches a thinking template on or off

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tools_fit_together(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ParamError("tools", "tools: every function needs a different name")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ParamError("tool_choice", "tool_choice needs tools: send the functions the model may call")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ParamError("tool_choice", f"tool_choice names `{choice.function.name}`, which is not in tools "
                                            f"({', '.join(names)})")
        if self.forced_tools() and self.json_format() is not None:
            raise ParamError("response_format", "response_format json_object/json_schema cannot be combined with "
                                                "tool_choice required or a named function")
        calls: set[str] = set()
        for i, message in enumerate(self.messages):
            calls.update(call.id for call in message.tool_calls or [])
            if message.role == "tool" and message.tool_call_id not in calls:
                raise ParamError(f"messages.{i}.tool_call_id", f"messages.{i}: the tool message answers "
                                 f"`{message.tool_call_id}`, which no earlier assistant message called")
        return self

    def active_tools(self) -> list[dict[str, Any]]:
        """The tools the model is shown: none at all with tool_choice "none" (as vLLM does without the flag)."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def forced_tools(self) -> list[ChatTool]:
        """The functions the answer must call (tool_choice required: any of them; named: that one), else []."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, NamedToolChoice):
            return [tool for tool in self.tools or [] if tool.function.name == self.tool_choice.function.name]
        return []

    def json_format(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must follow (json_object: any object), or None for free text."""
        fmt = self.response_format
        if isinstance(fmt, JsonObjectFormat):
            return {"type": "object"}
        if isinstance(fmt, JsonSchemaFormat):
            return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
        return None

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (newer SDKs, LangChain) wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
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


class TokenizeRequest(_Request):
    """Body of ``POST /tokenize`` (vLLM's shapes): a ``prompt``, or chat ``messages`` rendered by the template."""

    model: str | None = None
    prompt: Text | None = None
    add_special_tokens: bool = True  # prompt only: the tokenizer's own special tokens (MiniMind's adds none)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "send either prompt (text) or messages (a chat), not both or neither")
        return self


class DetokenizeRequest(_Request):
    """Body of ``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: list[int]
