"""OpenAPI request bodies from Pydantic wire models, self-contained wherever they sit."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel

DEFS_PREFIX = "#/$defs/"

M = TypeVar("M", bound=BaseModel)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` written in place, so it can sit anywhere in
    the OpenAPI document (a `#/$defs/…` reference would point at the document's root)."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(DEFS_PREFIX):
                name = ref.removeprefix(DEFS_PREFIX)
                if name in seen:
                    # Inlining a recursive model would never end; such a model needs a
                    # components/schemas entry instead.
                    raise ValueError(f"{model.__name__} is recursive through {name}")
                return resolve(defs[name], (*seen, name))
            return {key: resolve(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema, ())
    return resolved


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a required JSON body of `model` for a route that reads
    its body itself (to render validation errors in its dialect's shape)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(model)}},
        }
    }


class BodyDependency(Generic[M]):
    """A dependency that reads a JSON body of `model` itself (to render its errors in the
    dialect's shape); a DialectRouter documents that body on each route that takes one."""

    def __init__(self, model: type[M]) -> None:
        self.model = model


#: Statuses the app's guards may answer on any guarded operation, before its route runs.
GUARD_RESPONSES: dict[str, dict[str, Any]] = {
    "400": {"description": "The URL holds NUL (%00), which no name or text may contain."},
    "403": {
        "description": "Not allowed: an admin route without an admin key, or (with no "
        "authentication configured) a Host name that is not served or a cross-site Origin; "
        "in this dialect's error shape."
    },
}

#: Statuses every operation that takes a body may answer.
BODY_RESPONSES: dict[str, dict[str, Any]] = {
    "400": {"description": "The body cannot be read: not UTF-8, or not JSON."},
    "413": {"description": "The body is larger than PARLOUR_MAX_BODY_BYTES."},
    "415": {
        "description": "With no authentication configured, a body that is not JSON "
        "(a browser's cross-site form or text/plain post)."
    },
}


def declare_guard_statuses(operation: dict[str, Any]) -> None:
    """Add the statuses the guards and the body limit answer to one operation's responses."""
    responses = operation.setdefault("responses", {})
    for status, response in GUARD_RESPONSES.items():
        responses.setdefault(status, response)
    if "requestBody" in operation:
        for status, response in BODY_RESPONSES.items():
            responses.setdefault(status, response)
