"""The request bodies the server accepts (OpenAI's fields, plus `return_token_ids` as vLLM spells it).
Unknown fields are ignored, as OpenAI clients send many; a bad value is a 400 naming its field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="0 = prefill only (the remote backend's prefill)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    return_token_ids: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        for i, s in enumerate(stops):
            if not s:
                raise RequestError("stop", f"stop[{i}] is an empty string")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(description="text, or token ids")
    max_tokens: int | None = Field(16, ge=0, description="OpenAI's default is 16")


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: Literal["max", "high", "none"] = "max"
    max_completion_tokens: int | None = Field(None, ge=1)
    dsml_constraint: bool = Field(True, description="extension: DSML-constrained decoding when tools are declared")


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, the offending field in `param`."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError(None, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("list[", "str", "int")))
        raise RequestError(field or None, f"{field}: {first['msg']}") from None
