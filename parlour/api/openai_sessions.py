"""Where an OpenAI chat request finds its session, and what it means when it names none.

Carriers, in order: the `x-session-key` header, a body field `session_id`, and (with
PARLOUR_SESSION_FROM_USER=true) the OpenAI `user` field. A request with none is refused
(PARLOUR_SESSIONLESS=reject, the default) or answered statelessly: its messages are the
whole context and nothing but usage is stored (PARLOUR_SESSIONLESS=stateless).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from ..backends.base import ChatMessage
from ..errors import InvalidRequest
from ..settings import Settings
from ..turns.request import Messages, Sampling, TurnRequest
from .body import read_json
from .openai_protocol import ChatCompletionRequest, parse_request

MISSING_SESSION = (
    "Missing required header: x-session-key. Send the session in the x-session-key header "
    "or a `session_id` body field, or start the server with PARLOUR_SESSIONLESS=stateless "
    "to answer requests without a session from their messages alone."
)


def missing_session_key() -> InvalidRequest:
    """The 400 for a request that names no session, saying how to name one."""
    return InvalidRequest(MISSING_SESSION, param="x-session-key", code="missing_session_key")


def checked_session_key(value: str, *, param: str, from_header: bool) -> str:
    """A session key as given (1 to 256 printable characters), or a 400 naming `param`."""
    if from_header:
        # The server decodes header bytes as latin-1, but clients such as curl send UTF-8.
        with contextlib.suppress(UnicodeError):
            value = value.encode("latin-1").decode("utf-8")
    if len(value) > 256 or not value.isprintable():
        raise InvalidRequest(
            f"Invalid {param}: use 1 to 256 printable characters.",
            param=param,
            code="invalid_session_key",
        )
    return value


def session_carrier(header: str | None, data: Any, settings: Settings) -> str | None:
    """The session key the request carries (header, then `session_id`, then `user` when
    PARLOUR_SESSION_FROM_USER is on), or None when it names no session."""
    if header:
        return checked_session_key(header, param="x-session-key", from_header=True)
    fields = data if isinstance(data, dict) else {}
    carriers = ["session_id", "user"] if settings.session_from_user else ["session_id"]
    for name in carriers:
        value = fields.get(name)
        if isinstance(value, str) and value:
            return checked_session_key(value, param=name, from_header=False)
    return None


async def read_session_request(
    request: Request, header: str | None, settings: Settings
) -> tuple[str | None, ChatCompletionRequest]:
    """The session key (None: answer statelessly) and the validated body; a missing session
    is reported before a bad body, as the source document's clients expect."""
    try:
        data, problem = await read_json(request, settings.max_body_bytes), None
    except InvalidRequest as exc:
        data, problem = None, exc
    session_key = session_carrier(header, data, settings)
    if session_key is None and settings.sessionless != "stateless":
        raise missing_session_key()
    if problem is not None:
        raise problem
    return session_key, parse_request(data)


def earlier_messages(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """The user and assistant messages before the new turn (up to the last assistant
    message): a new session stores them as its history."""
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return tuple(m for m in messages[: last_assistant + 1] if m.role != "system")


def stateless_request(
    owner_id: uuid.UUID,
    body: ChatCompletionRequest,
    messages: Sequence[ChatMessage],
    sampling: Sampling,
) -> TurnRequest:
    """The engine request for a session-less chat: every message is context, nothing but
    usage is stored."""
    *earlier, new = [m for m in messages if m.role != "system"]
    return TurnRequest(
        owner_id=owner_id,
        target=Messages(tuple(earlier)),
        new=new,
        sampling=sampling,
        model=body.model,
        system=tuple(m.content for m in messages if m.role == "system"),
        shrink_reply=True,
        user_id=body.user,
        dialect="openai",
    )
