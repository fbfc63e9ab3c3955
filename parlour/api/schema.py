"""OpenAPI request bodies from Pydantic wire models, self-contained wherever they sit."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

DEFS_PREFIX = "#/$defs/"


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
