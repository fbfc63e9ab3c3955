"""`parlour model pull|list|remove` against a local server that plays the Hugging Face Hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from parlour.backends.registry import build_registry
from parlour.models import embedded_gguf
from tests.conftest import ServerProcess
from tests.support.fake_hub import FakeHub, fake_hub

REF = "test-org/Tiny-Chat-GGUF/tiny-chat.Q4_1.gguf"
NAME = "tiny-chat.Q4_1"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """The fake hub serving the embedded GGUF file under REF."""
    with fake_hub({REF: embedded_gguf()}) as served:
        yield served


def parlour(data: Path, hub: FakeHub, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m parlour ARGS --data-dir DATA` against the fake hub."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PARLOUR_", "HF_"))}
    environment.update(HF_ENDPOINT=hub.url, HF_HOME=str(data.parent / "hf-home"), **env)
    return subprocess.run(
        [sys.executable, "-m", "parlour", *args, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def sha256(path: Path) -> str:
    """A file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_list_remove(tmp_path: Path, hub: FakeHub) -> None:
    data = tmp_path / "data"
    listed = parlour(data, hub, "model", "list")
    assert listed.returncode == 0 and listed.stdout == "" and "model pull" in listed.stderr

    pulled = parlour(data, hub, "model", "pull", REF)
    assert pulled.returncode == 0, pulled.stderr
    assert f"parlour serve --model {NAME}" in pulled.stderr
    path = data / "models" / "test-org--Tiny-Chat-GGUF" / "tiny-chat.Q4_1.gguf"
    assert sha256(path) == sha256(embedded_gguf())
    assert ("GET", f"/{REF.replace('/tiny', '/resolve/main/tiny')}", None) in hub.requests

    listed = parlour(data, hub, "model", "list")
    header, row = listed.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "REPOSITORY", "SIZE", "QUANT", "CONTEXT"]
    assert row.split()[:6] == [NAME, "test-org/Tiny-Chat-GGUF", "98.4", "MB", "Q4_1", "8192"]

    # Offline, a model already pulled is found without the network.
    again = parlour(data, hub, "model", "pull", REF, HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr

    removed = parlour(data, hub, "model", "remove", NAME)
    assert removed.returncode == 0 and REF in removed.stderr
    assert not path.exists()
    assert parlour(data, hub, "model", "list").stdout == ""
    missing = parlour(data, hub, "model", "remove", NAME)
    assert missing.returncode == 1 and "parlour model list" in missing.stderr


def test_a_dropped_download_is_completed(tmp_path: Path, hub: FakeHub) -> None:
    data = tmp_path / "data"
    hub.cut_after = 10_000_000
    pulled = parlour(data, hub, "model", "pull", REF)
    assert pulled.returncode == 0, pulled.stderr
    assert "Trying to resume download" in pulled.stderr
    assert [m for m, path, _ in hub.requests if m == "GET" and "/resolve/" in path] == ["GET"] * 2
    path = data / "models" / "test-org--Tiny-Chat-GGUF" / "tiny-chat.Q4_1.gguf"
    assert sha256(path) == sha256(embedded_gguf())


def test_pull_refuses_bad_references_and_files(tmp_path: Path, hub: FakeHub) -> None:
    data = tmp_path / "data"
    wrong = parlour(data, hub, "model", "pull", "just-a-name")
    assert wrong.returncode == 1 and "OWNER/REPO/FILE.gguf" in wrong.stderr
    absent = parlour(data, hub, "model", "pull", "test-org/Tiny-Chat-GGUF/absent.gguf")
    assert absent.returncode == 1 and "Could not download" in absent.stderr
    offline = parlour(data, hub, "model", "pull", REF, HF_HUB_OFFLINE="1")
    assert offline.returncode == 1 and "HF_HUB_OFFLINE" in offline.stderr
    hub.corrupt = True
    corrupt = parlour(data, hub, "model", "pull", REF)
    assert corrupt.returncode == 1 and "SHA-256" in corrupt.stderr
    assert list((data / "models").rglob("*.gguf")) == []


def test_config_file_names_a_pulled_model(tmp_path: Path, hub: FakeHub) -> None:
    data = tmp_path / "data"
    assert parlour(data, hub, "model", "pull", REF).returncode == 0
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nname = "tiny"\npulled = "{NAME}"\nmax_tokens = 64\n')
    registry = build_registry(model=None, config=config, strict=False, models_dir=data / "models")
    spec = registry.default.spec
    assert (spec.name, spec.backend, spec.max_tokens, spec.options) == ("tiny", "llama", 64, {})
    assert spec.path == data / "models" / "test-org--Tiny-Chat-GGUF" / "tiny-chat.Q4_1.gguf"
    config.write_text('[[models]]\nname = "tiny"\npulled = "never-pulled"\n')
    with pytest.raises(ValueError, match="parlour model pull"):
        build_registry(model=None, config=config, strict=False, models_dir=data / "models")


@pytest.mark.model
def test_serve_a_pulled_model(
    tmp_path: Path, hub: FakeHub, server_factory: Callable[..., ServerProcess]
) -> None:
    data = tmp_path / "data"
    assert parlour(data, hub, "model", "pull", REF).returncode == 0
    server = server_factory("--model", NAME, "--data-dir", str(data))
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"x-session-key": "pulled"},
        json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == NAME
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0
