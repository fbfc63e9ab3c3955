"""Reading request bodies with a size limit, for the dialects that parse JSON themselves."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from ..errors import InvalidRequest, PayloadTooLarge
from .wire import has_invalid_text


def too_large(limit: int) -> PayloadTooLarge:
    """The error for a body over the limit, saying how to raise it."""
    return PayloadTooLarge(
        f"Request body is larger than {limit} bytes; send less or raise PARLOUR_MAX_BODY_BYTES."
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing anything over `limit` bytes before reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as UTF-8 JSON, with a clear error for anything else."""
    raw = await read_body(request, limit)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}.",
            code="invalid_json",
        ) from exc
    except RecursionError:
        raise InvalidRequest(
            "The request body nests arrays or objects too deeply; flatten it.",
            code="invalid_json",
        ) from None
    if has_invalid_text(data):
        # json accepts escapes like "\ud800" that no UTF-8 store or response can hold.
        raise InvalidRequest(
            "The request body contains an unpaired surrogate escape (\\ud800-\\udfff); "
            "send valid Unicode text.",
            code="invalid_json",
        )
    return data
