"""Schemathesis against the app's own /openapi.json: no 5xx, no status the document hides.

A fixed seed and a bounded number of examples per operation keep it to a minute or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

from parlour.app import create_app
from parlour.settings import Settings

#: Examples per operation (a fixed, derandomized seed): raise it here for a longer hunt.
EXAMPLES = 100
#: The Host the in-process client sends; local mode serves only names it is told about.
FUZZ_HOST = "testserver"


def _app(data: Path) -> FastAPI:
    return create_app(Settings(data_dir=data, model="scripted", allowed_hosts=(FUZZ_HOST,)))


def _labels() -> list[str]:
    """Every operation of the document, as `METHOD /path` (no app is started for this)."""
    document = _app(Path("unused")).openapi()
    return [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "patch", "delete"}
    ]


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app's own OpenAPI document, bound to an app on a fresh SQLite database."""
    app = _app(tmp_path_factory.mktemp("fuzz") / "data")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("label", _labels())
def test_no_server_error_and_only_declared_statuses(fuzz_schema: Any, label: str) -> None:
    operation = fuzz_schema.find_operation_by_label(label)
    assert operation is not None, label

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of([operation.as_strategy(mode) for mode in GenerationMode]))
    def call(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance])

    call()
