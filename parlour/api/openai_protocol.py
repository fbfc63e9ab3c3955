"""Wire models of the OpenAI chat completions dialect: requests in, completions and chunks out."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request

from ..errors import InvalidRequest, ParlourError
from ..settings import Settings
from .body import read_json
from .schema import BodyDependency
from .wire import Int, Int64, Number, Text


class Wire(BaseModel):
    """Strict about types, tolerant of fields it does not know."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(Wire):
    """One element of an array `content`."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Text
    text: Text | None = None


class RequestMessage(Wire):
    """A message as a client sends it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class StreamOptions(Wire):
    """`stream_options`."""

    include_usage: bool = False


class ChatCompletionRequest(Wire):
    """The body of POST /v1/chat/completions."""

    model: Text | None = None
    messages: list[RequestMessage] = Field(min_length=1)
    stream: bool = False
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    stop: Text | list[Text] | None = None
    seed: Int64 | None = None
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    stream_options: StreamOptions | None = None
    n: Int | None = Field(default=None, ge=1, le=1)
    user: Text | None = None
    #: The session, for clients that cannot send the x-session-key header.
    session_id: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """`stop` as a tuple, whichever form it came in."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


def _param(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"str", "list[ContentPart]", "list[str]"} or "[" in item:
            continue  # pydantic names the union member it tried; clients never wrote that
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _within(param: str, parent: str) -> bool:
    return param == parent or param.startswith((parent + ".", parent + "["))


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded body, turning the first problem into a 400 naming its parameter."""
    return parse_body(ChatCompletionRequest, data)


W = TypeVar("W", bound=BaseModel)


def parse_body(model: type[W], data: Any) -> W:
    """Validate a decoded body as `model`; the first problem is a 400 naming its parameter."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        top = _param(tuple(errors[0]["loc"]))
        # A union reports one error per member; the deepest is about the member the client
        # actually sent (a list of parts, say), so "should be a valid string" never hides it.
        first = max(
            (e for e in errors if _within(_param(tuple(e["loc"])), top)),
            key=lambda e: len(e["loc"]),
        )
        param = _param(tuple(first["loc"]))
        kind = first["type"]
        if kind == "missing":
            message = f"Missing required parameter: '{param}'."
            code = "missing_required_parameter"
        else:
            got = first.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            message = f"Invalid value for '{param}': {first['msg']} (got {shown})."
            code = "invalid_type" if kind.endswith("_type") else "invalid_value"
        raise InvalidRequest(message, param=param, code=code) from None


def error_body(error: ParlourError) -> dict[str, Any]:
    """OpenAI's error object."""
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": (
            [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
            if with_choice
            else []
        ),
    }
    if usage is not None:
        body["usage"] = usage
    return body


class JsonBody(BodyDependency[W]):
    """Reads the request's JSON body (within the body limit) and validates it as the model,
    refusing it in OpenAI's error shape."""

    async def __call__(self, request: Request) -> W:
        settings: Settings = request.app.state.settings
        return parse_body(self.model, await read_json(request, settings.max_body_bytes))


def json_body(model: type[W]) -> Any:
    """A dependency that reads and validates a JSON body of `model` (see JsonBody)."""
    return Depends(JsonBody(model))
