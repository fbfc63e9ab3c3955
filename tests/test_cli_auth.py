"""The `key` and `token` commands, and `serve` refusing to listen beyond loopback without auth."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt
from click.testing import CliRunner

from parlour.cli.main import main
from tests.conftest import ServerProcess, server_env
from tests.support.auth import AUDIENCE, ISSUER, SECRET, bearer

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PARLOUR_")}


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a parlour command in-process: (exit code, stdout, stderr)."""
    runner = CliRunner()
    result = runner.invoke(
        main,
        list(args),
        env={**{k: None for k in os.environ if k.startswith("PARLOUR_")}, **(env or {})},
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_key_create_list_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    code, out, err = run("key", "list", "--data-dir", data)
    assert code == 0 and out == "" and "parlour key create" in err

    code, alice, err = run("key", "create", "--owner", "alice", "--data-dir", data)
    assert code == 0, err
    alice = alice.strip()
    assert alice.startswith("plr_") and "\n" not in alice
    assert "not shown again" in err
    code, admin, _ = run("key", "create", "--owner", "ops", "--admin", "--data-dir", data)
    assert code == 0

    code, listing, _ = run("key", "list", "--data-dir", data)
    lines = listing.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "PREFIX", "OWNER", "ADMIN"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[2], r[3], r[-1]) for r in rows] == [
        ("alice", "no", "active"),
        ("ops", "yes", "active"),
    ]
    assert rows[0][1] == alice.split("_")[1]
    # The listing never shows a secret.
    assert alice not in listing and admin.strip() not in listing

    code, out, _ = run("key", "revoke", rows[0][0], "--data-dir", data)
    assert code == 0 and "Revoked" in out and "alice" in out
    code, listing, _ = run("key", "list", "--data-dir", data)
    assert "revoked" in listing.splitlines()[1] and listing.splitlines()[2].endswith("active")
    # By prefix, too.
    code, out, _ = run("key", "revoke", rows[1][1], "--data-dir", data)
    assert code == 0 and "ops" in out

    code, _, err = run("key", "revoke", "no-such-key", "--data-dir", data)
    assert code == 1 and "parlour key list" in err
    code, _, err = run("key", "create", "--owner", " ", "--data-dir", data)
    assert code == 2


def test_key_commands_read_the_environment(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    code, _, _ = run("key", "create", "--owner", "alice", env={"PARLOUR_DATABASE_URL": url})
    assert code == 0
    assert (tmp_path / "elsewhere.db").exists()
    code, listing, _ = run("key", "list", "--database-url", url)
    assert "alice" in listing


def test_token_command(tmp_path: Path) -> None:
    code, _, err = run("token", "--sub", "alice")
    assert code == 1 and "PARLOUR_JWT_SECRET" in err

    code, out, _ = run(
        "token", "--sub", "alice", "--ttl", "120", env={"PARLOUR_JWT_SECRET": SECRET}
    )
    assert code == 0
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
    assert "iss" not in claims and "aud" not in claims

    env = {
        "PARLOUR_JWT_SECRET": SECRET,
        "PARLOUR_JWT_ISSUER": ISSUER,
        "PARLOUR_JWT_AUDIENCE": AUDIENCE,
    }
    code, out, _ = run("token", "--sub", "bob", env=env)
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["sub"] == "bob" and claims["exp"] - claims["iat"] == 3600

    code, _, _ = run("token", "--sub", "alice", "--ttl", "0", env={"PARLOUR_JWT_SECRET": SECRET})
    assert code == 2


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `parlour serve` as a real process that is expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "parlour", "serve", "--model", "scripted", *args],
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_refuses_public_address_without_auth(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        result = serve("--host", host, "--data-dir", str(tmp_path / "data"))
        assert result.returncode == 1, result.stderr
        assert f"Refusing to listen on {host} without authentication" in result.stderr
        assert "--insecure" in result.stderr and "parlour key create" in result.stderr
    result = serve("--data-dir", str(tmp_path / "data"), env={"PARLOUR_HOST": "0.0.0.0"})
    assert result.returncode == 1 and "Refusing" in result.stderr


def test_serve_refuses_unusable_public_key(tmp_path: Path) -> None:
    result = serve(
        "--data-dir",
        str(tmp_path / "data"),
        env={"PARLOUR_JWT_PUBLIC_KEY": str(tmp_path / "missing.pem")},
    )
    assert result.returncode == 1 and "PARLOUR_JWT_PUBLIC_KEY" in result.stderr


def test_public_address_with_insecure_or_auth(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    insecure = server_factory("--host", "0.0.0.0", "--insecure", "--model", "scripted")
    assert httpx.get(f"{insecure.url}/conversations", timeout=10).status_code == 200

    secured = server_factory(
        "--host", "0.0.0.0", "--model", "scripted", env={"PARLOUR_JWT_SECRET": SECRET}
    )
    refused = httpx.get(f"{secured.url}/conversations", timeout=10)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    code, token, _ = run("token", "--sub", "alice", env={"PARLOUR_JWT_SECRET": SECRET})
    assert code == 0
    allowed = httpx.get(f"{secured.url}/conversations", headers=bearer(token.strip()), timeout=10)
    assert allowed.status_code == 200


def test_key_from_cli_opens_a_public_server(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, database_url: str | None
) -> None:
    data = tmp_path / "keyed"
    # The CLI works on the database the server will use (PostgreSQL in that mode).
    env = server_env(database_url)
    code, key, _ = run("key", "create", "--owner", "alice", "--data-dir", str(data), env=env)
    assert code == 0
    # An existing key counts as configured auth, so a public address is allowed.
    server = server_factory("--host", "0.0.0.0", "--model", "scripted", "--data-dir", str(data))
    assert httpx.get(f"{server.url}/conversations", timeout=10).status_code == 401
    made = httpx.post(
        f"{server.url}/conversations",
        headers=bearer(key.strip()),
        json={"title": "from a key", "model_tag": "scripted"},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    _, listing, _ = run("key", "list", "--data-dir", str(data), env=env)
    # ID PREFIX OWNER ADMIN CREATED(date time) LAST-USED(date time) STATUS
    assert listing.splitlines()[1].split()[6] != "-"
