"""Wire models of OpenAI's Responses and Conversations APIs: requests in, objects and events out."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..backends.base import ChatMessage
from ..errors import InvalidRequest
from ..store.tables import Message, StoredResponse
from .errors import DialectRouter
from .openai_protocol import error_body

#: Roles an input message may have, and the role the model sees for each.
MODEL_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "error"}
)
MAX_METADATA = 16


class Wire(BaseModel):
    """Tolerant of fields it does not know, like OpenAI's own API."""

    model_config = ConfigDict(extra="allow")


class ContentPart(Wire):
    """One part of an input message's content."""

    type: str
    text: str | None = None


class InputItem(Wire):
    """One input item; only messages (with or without `type`) are supported."""

    type: str | None = None
    role: str | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None


class ConversationRef(Wire):
    """`conversation` as an object."""

    id: str


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None and len(value) > MAX_METADATA:
        raise ValueError(f"at most {MAX_METADATA} key-value pairs are allowed")
    return value


class ResponseCreate(Wire):
    """The body of POST /v1/responses (and of /v1/responses/input_tokens)."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    prompt: Any = None

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))

    @property
    def conversation_id(self) -> str | None:
        """`conversation` as an id, whichever form it came in."""
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    def check_supported(self) -> None:
        """Refuse what would change the answer but is not implemented yet."""
        if self.tools:
            raise InvalidRequest("Tools are not supported yet; send no `tools`.", param="tools")
        text_format = (self.text or {}).get("format") or {}
        if isinstance(text_format, dict) and text_format.get("type", "text") != "text":
            raise InvalidRequest(
                f"text.format {text_format.get('type')!r} is not supported yet; only 'text'.",
                param="text.format",
            )
        if self.prompt is not None:
            raise InvalidRequest("Prompt templates are not supported yet.", param="prompt")
        if self.conversation is not None and self.previous_response_id is not None:
            raise InvalidRequest(
                "Send either `conversation` or `previous_response_id`, not both.",
                param="previous_response_id",
            )
        if self.conversation is not None and not self.store:
            raise InvalidRequest(
                "A response on a conversation is stored with it; send `store: true` or use "
                "`previous_response_id` with `store: false`.",
                param="store",
            )
        if self.background and not self.store:
            raise InvalidRequest("`background` needs `store` to be true.", param="background")


class ConversationCreate(Wire):
    """The body of POST /v1/conversations."""

    items: list[InputItem] | None = Field(default=None, max_length=20)
    metadata: dict[str, str] | None = None

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))


class ConversationUpdate(Wire):
    """The body of POST /v1/conversations/{id}."""

    metadata: dict[str, str]

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))


class ItemsCreate(Wire):
    """The body of POST /v1/conversations/{id}/items."""

    items: list[InputItem] = Field(min_length=1, max_length=20)


def new_id(prefix: str) -> str:
    """A fresh id such as `resp_…` or `msg_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def normalise_items(
    data: str | list[InputItem] | None, param: str = "input"
) -> list[dict[str, Any]]:
    """Input as message items with ids and a list of text parts; other types are a 400."""
    if data is None:
        return []
    if isinstance(data, str):
        data = [InputItem(role="user", content=data)]
    items: list[dict[str, Any]] = []
    for i, item in enumerate(data):
        where = f"{param}[{i}]"
        if item.type not in (None, "message"):
            raise InvalidRequest(
                f"Input items of type {item.type!r} are not supported yet; send messages.",
                param=f"{where}.type",
                code="unsupported_value",
            )
        if item.role not in MODEL_ROLES:
            raise InvalidRequest(
                f"Invalid role {item.role!r}: use user, system, developer or assistant.",
                param=f"{where}.role",
            )
        kind = "output_text" if item.role == "assistant" else "input_text"
        parts = [{"type": kind, "text": text} for text in _texts(item, where)]
        items.append(
            {
                "id": new_id("msg"),
                "type": "message",
                "role": item.role,
                "content": [_part(p) for p in parts],
                "status": "completed",
            }
        )
    return items


def _texts(item: InputItem, where: str) -> list[str]:
    if item.content is None:
        return []
    if isinstance(item.content, str):
        return [item.content]
    texts: list[str] = []
    for j, part in enumerate(item.content):
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise InvalidRequest(
                f"Content parts of type {part.type!r} are not supported yet; send text.",
                param=f"{where}.content[{j}].type",
                code="unsupported_value",
            )
        texts.append(part.text)
    return texts


def _part(part: dict[str, Any]) -> dict[str, Any]:
    return {**part, "annotations": [], "logprobs": []} if part["type"] == "output_text" else part


def item_text(item: dict[str, Any]) -> str:
    """The text of a normalised message item."""
    return "\n".join(str(p.get("text", "")) for p in item.get("content", []))


def item_message(item: dict[str, Any]) -> ChatMessage:
    """A normalised message item as the model sees it."""
    return ChatMessage(MODEL_ROLES[item["role"]], item_text(item))


def message_item(message: Message) -> dict[str, Any]:
    """A stored message as a Conversations-API item."""
    kind = "output_text" if message.role == "assistant" else "input_text"
    incomplete = message.finish_reason in ("length", "cancelled", "error")
    return {
        "id": f"msg_{message.id.hex}",
        "type": "message",
        "role": message.role,
        "content": [_part({"type": kind, "text": message.content})],
        "status": "incomplete" if incomplete else "completed",
    }


def message_id(item_id: str) -> uuid.UUID | None:
    """The message uuid behind a `msg_…` item id, None if it is not one."""
    try:
        return uuid.UUID(hex=item_id.removeprefix("msg_"))
    except ValueError:
        return None


def conversation_object(
    cid: uuid.UUID, created_at: float, metadata: dict[str, str]
) -> dict[str, Any]:
    """A Conversations-API conversation object."""
    return {
        "id": f"conv_{cid.hex}",
        "object": "conversation",
        "created_at": int(created_at),
        "metadata": metadata,
    }


def item_list(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list shape for items."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def output_item(row: StoredResponse, *, done: bool) -> dict[str, Any]:
    """The response's one output message."""
    status = "in_progress"
    if done:
        status = "completed" if row.status == "completed" else "incomplete"
    content = [_part({"type": "output_text", "text": row.output_text})] if done else []
    return {
        "id": row.output_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def response_object(row: StoredResponse) -> dict[str, Any]:
    """A `response` object as OpenAI writes it."""
    echo = row.request
    finished = row.status in ("completed", "incomplete", "cancelled", "failed")
    output = [output_item(row, done=True)] if finished and row.output_text else []
    if row.status == "in_progress" and row.output_text:
        output = [
            {
                **output_item(row, done=False),
                "content": [_part({"type": "output_text", "text": row.output_text})],
            }
        ]
    conversation = echo.get("conversation")
    return {
        "id": row.id,
        "object": "response",
        "created_at": int(row.created_at.timestamp()),
        "completed_at": int(row.completed_at.timestamp()) if row.completed_at else None,
        "status": row.status,
        "background": echo.get("background", False),
        "error": row.error,
        "incomplete_details": (
            {"reason": row.incomplete_reason} if row.incomplete_reason else None
        ),
        "instructions": echo.get("instructions"),
        "max_output_tokens": echo.get("max_output_tokens"),
        "metadata": echo.get("metadata") or {},
        "model": row.model,
        "output": output,
        "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": row.parent_id,
        "conversation": {"id": conversation} if conversation else None,
        "prompt_cache_key": echo.get("prompt_cache_key"),
        "reasoning": echo.get("reasoning"),
        "safety_identifier": echo.get("safety_identifier"),
        "store": echo.get("store", True),
        "temperature": echo.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": echo.get("top_p"),
        "truncation": echo.get("truncation"),
        "user": echo.get("user"),
        "usage": usage(row) if finished else None,
    }


def usage(row: StoredResponse) -> dict[str, Any]:
    """The usage block, cached tokens included."""
    return {
        "input_tokens": row.input_tokens,
        "input_tokens_details": {"cached_tokens": row.cached_tokens},
        "output_tokens": row.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": row.input_tokens + row.output_tokens,
    }


def echo_fields(body: ResponseCreate, *, truncation: str) -> dict[str, Any]:
    """The request fields a response object repeats back."""
    return {
        "background": body.background,
        "conversation": body.conversation_id,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": body.reasoning,
        "safety_identifier": body.safety_identifier,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "truncation": truncation,
        "user": body.user,
    }


#: What the Responses and Conversations routes may answer besides 200, in OpenAI's shape.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid or unsupported request (OpenAI error object)."},
    404: {"description": "No such response, conversation or item of this owner."},
    409: {"description": "The response is not in a state that allows this."},
    503: {"description": "The model is not loaded yet."},
}


def dialect_router() -> DialectRouter:
    """A router of Responses or Conversations routes: OpenAI's errors and rate-limit
    headers, documented under one tag."""
    return DialectRouter(
        limit_headers=True, tags=["responses"], render_error=error_body, responses=ERRORS
    )
