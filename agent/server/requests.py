"""The request bodies the server accepts: OpenAI's fields (plus vLLM's `return_token_ids` and `cache_salt`),
validated strictly. A value of the wrong JSON type is refused, never coerced (`"max_tokens": true`,
`"stream": "yes"`, `"temperature": "1"` are 400s); unknown fields are ignored, as OpenAI clients send
many. A bad value is a `RequestError` (400) naming its field.

`reasoning_effort` maps OpenAI's levels onto the three modes DSV4 has (`thinking_mode`):
none, minimal -> chat (no thinking); low, medium, high -> Think High; xhigh, max -> Think Max;
absent -> the server default, Think Max.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.server.errors import RequestError

INT64 = (-(2**63), 2**63 - 1)  # the seed range vLLM accepts (a torch generator seed fits)
TOP_LOGPROBS_MAX = 20  # OpenAI's limit

# reasoning_effort -> (encoding thinking mode, the encoding's reasoning effort)
EFFORT_MODES: dict[str | None, tuple[str, str | None]] = {
    "none": ("chat", None), "minimal": ("chat", None),
    "low": ("thinking", "high"), "medium": ("thinking", "high"), "high": ("thinking", "high"),
    "xhigh": ("thinking", "max"), "max": ("thinking", "max"),
    None: ("thinking", "max"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- shared sampling fields ------------------------------------------------------------------------------
class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="0 = prefill only (the remote backend's prefill)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    cache_salt: str | None = Field(None, min_length=1, max_length=1024,
                                   description="prefixes cached under one salt are reused only by requests with it")

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: Any) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        for i, s in enumerate(stops):
            if not s:
                raise RequestError("stop", f"stop[{i}] is an empty string")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---- response_format -------------------------------------------------------------------------------------
class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


# ---- /v1/completions ---------------------------------------------------------------------------------------
TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(Sampling):
    prompt: str | TokenIds | list[str] | list[TokenIds] = Field(
        description="text, token ids, or a list of either (one choice each)")
    max_tokens: int | None = Field(16, ge=0, description="OpenAI's default is 16")
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX, description="top alternatives per token")
    response_format: ResponseFormat | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise RequestError("prompt", "prompt: empty")
        return list(prompt)


# ---- /v1/chat/completions ----------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str


def _text_parts(value: Any) -> Any:
    """Content parts must all be text (this model reads text only); say which one is not."""
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}: only text parts ({{'type': 'text', "
                                 f"'text': ...}}) are supported, this model reads text only")
    return value


class FunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    _parts = field_validator("content", mode="before")(classmethod(lambda cls, v: _text_parts(v)))

    def as_encoding_dict(self) -> dict[str, Any]:
        """The message as `encoding.encode_messages` takes it: text parts joined by newlines (as vLLM
        does), except a tool result's, which the encoder joins itself (official format)."""
        message = self.model_dump(exclude_none=True, exclude={"name"})
        if isinstance(self.content, list):
            texts = [part.text for part in self.content]
            message["content"] = ([{"type": "text", "text": t} for t in texts] if self.role == "tool"
                                  else "\n".join(texts))
        return message


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema_object(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        """The DSML grammar reads `properties` and `required`: they must have JSON-schema shape."""
        if schema is None:
            return None
        if schema.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of type 'object', got type {schema.get('type')!r}")
        props = schema.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
            raise ValueError("properties must be an object mapping each parameter name to its JSON schema (an object)")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("required must be a list of parameter names")
        return schema


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    dsml_constraint: bool = Field(True, description="extension: DSML-constrained decoding when tools are declared")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def thinking_mode(self) -> tuple[str, str | None]:
        """(encoding thinking mode, encoding reasoning effort); see the module docstring."""
        return EFFORT_MODES[self.reasoning_effort]

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]


def parse_request(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; the first problem becomes a RequestError naming its field."""
    if not raw.strip():
        raise RequestError(None, "the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            first = errors[0]
            detail = first["msg"].removeprefix("Invalid JSON: ")
            if "hex escape" in detail or "surrogate" in detail:
                detail += " (a lone UTF-16 surrogate: \\ud800-\\udfff without its pair is not text)"
            raise RequestError(None, f"the request body is not valid JSON: {detail}") from None
        # A union lists one error per branch: the deepest one is where the value went wrong.
        first = max(errors, key=lambda err: len(err["loc"]))
        if first["type"] == "model_type" and not first["loc"]:
            raise RequestError(None, "the request body must be a JSON object") from None
        field = _field_path(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise RequestError(field or None, f"{field}: {message}" if field else message) from None


def _field_path(loc: tuple) -> str:
    """`('messages', 0, 'content', 'list[TextPart]', 1, 'text')` -> `messages.0.content.1.text`: pydantic
    also names union branches and discriminator tags in `loc`, and those are not fields."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        after_tag = i > 0 and loc[i - 1] == "response_format"  # the discriminator's tag
        if isinstance(part, int) or (part in _field_names() and not after_tag):
            parts.append(str(part))
    return ".".join(parts)


def _field_names() -> set[str]:
    models = (StreamOptions, Sampling, JsonSchemaSpec, JsonSchemaFormat, CompletionRequest, TextPart, FunctionCall,
              ToolCall, Message, FunctionDef, Tool, NamedFunction, NamedToolChoice, ChatRequest)
    return {field.alias or name for model in models for name, field in model.model_fields.items()}
