"""Value types every dialect's wire models share: valid Unicode text, bounded whole numbers,
finite numbers that are not booleans."""

from __future__ import annotations

import json
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import AfterValidator, AllowInfNan, Strict

#: The largest whole number any request may carry: it fits every integer column
#: (PostgreSQL's INTEGER is 32-bit) and every offset the stores take.
MAX_INT = 2**31 - 1

TEXT_ERROR = "must be valid Unicode text (no unpaired surrogates such as \\ud800, no NUL)"


def is_text(value: str) -> bool:
    """True when every store can hold `value`: UTF-8 (json accepts lone surrogate escapes)
    without NUL (PostgreSQL's text refuses it)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str) -> str:
    """`value` itself, or ValueError when it is not valid Unicode text."""
    if not is_text(value):
        raise ValueError(TEXT_ERROR)
    return value


def has_invalid_text(data: Any) -> bool:
    """True when any string in decoded JSON (keys included) is not valid Unicode text."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if not is_text(value):
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def encodable(value: Any) -> bool:
    """True when `value` can go into a JSON reply: finite numbers, valid Unicode text."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):
        return False
    return True


#: A string that is valid Unicode.
Text = Annotated[str, AfterValidator(check_text)]
#: A whole number within ±MAX_INT; booleans and numeric strings are refused.
Int = Annotated[int, Strict(), Ge(-MAX_INT - 1), Le(MAX_INT)]
#: A whole number that fits 64 bits, for values passed on but never stored (seeds).
Int64 = Annotated[int, Strict(), Ge(-(2**63)), Le(2**63 - 1)]
#: A finite number (whole numbers accepted); booleans, NaN and infinities are refused.
Number = Annotated[float, Strict(), AllowInfNan(False)]
