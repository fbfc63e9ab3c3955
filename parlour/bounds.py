"""Bounds on what one request may ask of the core: message length, and where large text is
tokenised (a worker thread, so one long message never stalls every other request)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

from .errors import MessageTooLong

P = ParamSpec("P")
T = TypeVar("T")

#: Text longer than this (in characters) is tokenised on a worker thread.
OFF_LOOP_CHARS = 4096


def check_messages(texts: Iterable[str], limit: int | None) -> None:
    """Raise MessageTooLong if any text is longer than `limit` characters."""
    if limit is None:
        return
    for text in texts:
        if len(text) > limit:
            raise MessageTooLong(
                f"A message is {len(text)} characters; the limit is {limit}. Send a shorter "
                "message, or raise PARLOUR_MAX_MESSAGE_CHARS.",
                param="messages",
            )


async def tokenising(size: int, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`func(*args, **kwargs)`, on a worker thread when it tokenises `size` characters or more."""
    if size >= OFF_LOOP_CHARS:
        return await asyncio.to_thread(func, *args, **kwargs)
    return func(*args, **kwargs)
