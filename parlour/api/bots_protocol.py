"""The Bot API's request body, validated the way its clients know: pydantic v1's rules and
messages (`field required`, `value_error.missing`, …), every problem reported at once.

Written out by hand because the server runs pydantic v2, whose messages and coercions
differ; clients of this API match on the v1 texts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..backends.base import ChatMessage, Role
from ..errors import BodyInvalid, BodyUnreadable
from ..store.tables import Bot
from .wire import MAX_INT, TEXT_ERROR, is_text

Loc = tuple[str | int, ...]
ErrorDict = dict[str, Any]

ROLES = ("system", "user", "assistant")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True)
class BotChatRequest:
    """A validated POST /chat body."""

    stream: bool
    bot_uid: str | None = None
    bot_slug: str | None = None
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    user_id: str | None = None
    language: str | None = None
    max_words: int | None = None


class _Invalid(Exception):
    def __init__(self, msg: str, type_: str, ctx: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.msg, self.type, self.ctx = msg, type_, ctx


def error(loc: Loc, msg: str, type_: str, ctx: dict[str, Any] | None = None) -> ErrorDict:
    """One entry of the `detail` list."""
    entry: ErrorDict = {"loc": list(loc), "msg": msg, "type": type_}
    if ctx is not None:
        entry["ctx"] = ctx
    return entry


def missing(loc: Loc) -> ErrorDict:
    """A required field that is absent."""
    return error(loc, "field required", "value_error.missing")


def to_bool(value: Any) -> bool:
    """pydantic v1's bool: true/false, 0/1 and their usual spellings."""
    if value is True or value is False:
        return value
    if isinstance(value, str):
        value = value.lower()
    try:
        if value in _FALSE or (not isinstance(value, str) and value == 0):
            return False
        if value in _TRUE or (not isinstance(value, str) and value == 1):
            return True
    except TypeError:
        pass
    raise _Invalid("value could not be parsed to a boolean", "type_error.bool")


def to_str(value: Any) -> str:
    """pydantic v1's str: strings, and numbers written out."""
    if isinstance(value, str):
        if not is_text(value):
            raise _Invalid(f"value {TEXT_ERROR}", "value_error.str.unicode")
        return value
    if isinstance(value, int | float):
        return str(value)
    raise _Invalid("str type expected", "type_error.str")


def to_int(value: Any) -> int:
    """pydantic v1's int: whole numbers, numeric strings, and floats truncated."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _Invalid("value is not a valid integer", "type_error.integer") from None


def to_positive_int(value: Any) -> int:
    """An int of at least 1 (`conint(ge=1)`)."""
    number = to_int(value)
    if number < 1:
        raise _Invalid(
            "ensure this value is greater than or equal to 1",
            "value_error.number.not_ge",
            {"limit_value": 1},
        )
    if number > MAX_INT:
        raise _Invalid(
            f"ensure this value is less than or equal to {MAX_INT}",
            "value_error.number.not_le",
            {"limit_value": MAX_INT},
        )
    return number


def to_role(value: Any) -> Role:
    """`Literal["system", "user", "assistant"]`."""
    if isinstance(value, str) and value in ROLES:
        return cast(Role, value)
    permitted = ", ".join(repr(r) for r in ROLES)
    raise _Invalid(
        f"unexpected value; permitted: {permitted}",
        "value_error.const",
        {"given": value, "permitted": list(ROLES)},
    )


def _as_dict(value: Any) -> dict[str, Any]:
    """A model's input: a dict, or anything `dict()` accepts, like pydantic v1."""
    if isinstance(value, dict):
        return value
    try:
        converted = dict(value)
    except (TypeError, ValueError):
        raise _Invalid("value is not a valid dict", "type_error.dict") from None
    if not all(isinstance(k, str) for k in converted):
        raise _Invalid("value is not a valid dict", "type_error.dict")
    return converted


class _Fields:
    """Collects validated values and errors for one object."""

    def __init__(self, data: dict[str, Any], loc: Loc, errors: list[ErrorDict]) -> None:
        self.data, self.loc, self.errors = data, loc, errors
        self.values: dict[str, Any] = {}

    def field(self, name: str, convert: Callable[[Any], Any], *, required: bool = False) -> None:
        loc = (*self.loc, name)
        if name not in self.data:
            if required:
                self.errors.append(missing(loc))
            else:
                self.values[name] = None
            return
        value = self.data[name]
        if value is None:
            if required:
                self.errors.append(
                    error(loc, "none is not an allowed value", "type_error.none.not_allowed")
                )
            else:
                self.values[name] = None
            return
        try:
            self.values[name] = convert(value)
        except _Invalid as exc:
            self.errors.append(error(loc, exc.msg, exc.type, exc.ctx))
        except _Nested:
            pass


class _Nested(Exception):
    """A nested value failed; its errors are already recorded."""


def _message(value: Any, loc: Loc, errors: list[ErrorDict]) -> ChatMessage:
    data = _as_dict(value)
    fields = _Fields(data, loc, errors)
    fields.field("role", to_role, required=True)
    fields.field("content", to_str, required=True)
    if len(fields.values) < 2:
        raise _Nested
    return ChatMessage(fields.values["role"], fields.values["content"])


def _messages(value: Any, loc: Loc, errors: list[ErrorDict]) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list):
        raise _Invalid("value is not a valid list", "type_error.list")
    items: list[ChatMessage] = []
    failed = False
    for index, item in enumerate(value):
        item_loc = (*loc, index)
        if item is None:
            errors.append(
                error(item_loc, "none is not an allowed value", "type_error.none.not_allowed")
            )
            failed = True
            continue
        try:
            items.append(_message(item, item_loc, errors))
        except _Invalid as exc:
            errors.append(error(item_loc, exc.msg, exc.type, exc.ctx))
            failed = True
        except _Nested:
            failed = True
    if failed:
        raise _Nested
    return tuple(items)


def validate(data: Any) -> BotChatRequest:
    """Validate a decoded body: field errors in field order, then both root checks."""
    errors: list[ErrorDict] = []
    if data is None:
        raise BodyInvalid([missing(("body",))])
    try:
        body = _as_dict(data)
    except _Invalid as exc:
        raise BodyInvalid([error(("body",), exc.msg, exc.type)]) from None
    fields = _Fields(body, ("body",), errors)
    fields.field("bot_uid", to_str)
    fields.field("bot_slug", to_str)
    fields.field("prompt", to_str)
    fields.field("messages", lambda v: _messages(v, ("body", "messages"), errors))
    fields.field("stream", to_bool, required=True)
    fields.field("user_id", to_str)
    fields.field("language", to_str)
    fields.field("max_words", to_positive_int)
    values = fields.values
    # Root checks see only the fields that validated, as pydantic v1's root validators do.
    if values.get("bot_uid") is None and values.get("bot_slug") is None:
        errors.append(
            error(("body", "__root__"), 'Either "bot_uid" or "bot_slug" is required', "value_error")
        )
    if values.get("prompt") is None and values.get("messages") is None:
        errors.append(
            error(("body", "__root__"), 'Either "prompt" or "messages" is required', "value_error")
        )
    if errors:
        raise BodyInvalid(errors)
    return BotChatRequest(
        stream=values["stream"],
        bot_uid=values["bot_uid"],
        bot_slug=values["bot_slug"],
        prompt=values["prompt"],
        messages=values["messages"],
        user_id=values["user_id"],
        language=values["language"],
        max_words=values["max_words"],
    )


def parse(raw: bytes) -> BotChatRequest:
    """Decode and validate a raw body the way FastAPI with pydantic v1 did."""
    if not raw:
        raise BodyInvalid([missing(("body",))])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BodyUnreadable("There was an error parsing the body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyInvalid(
            [
                error(
                    ("body", exc.pos),
                    str(exc),
                    "value_error.jsondecode",
                    {"msg": exc.msg, "pos": exc.pos, "lineno": exc.lineno, "colno": exc.colno},
                )
            ]
        ) from None
    except RecursionError:
        raise BodyUnreadable("There was an error parsing the body") from None
    return validate(data)


def public(bot: Bot, model: str) -> dict[str, Any]:
    """What `GET /v1/bots` shows of a bot; `model` is the model that serves it."""
    return {
        "uid": str(bot.uid),
        "slug": bot.slug,
        "name": bot.name,
        "description": bot.description,
        "model": model,
        "welcome_message": bot.welcome_message,
        # The aBLT SDK's BotSchema requires the field; parlour's bots have no avatars.
        "avatar_url": None,
    }
