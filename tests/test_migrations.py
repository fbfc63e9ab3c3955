"""Migrations: a database made by the first release upgrades to the newest schema intact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import TextClause, Uuid, bindparam, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from parlour.store.db import Database, alembic_config
from parlour.store.tables import UTCDateTime

FIRST_RELEASE = "0001"
TYPES: dict[str, TypeEngine[Any]] = {
    "id": Uuid(),
    "owner": Uuid(),
    "conv": Uuid(),
    "now": UTCDateTime(),
}


def sql(statement: str) -> TextClause:
    """Plain SQL with ids and times bound the way parlour's column types store them."""
    clause = text(statement)
    names = [name for name in TYPES if f":{name}" in statement]
    return clause.bindparams(*(bindparam(name, type_=TYPES[name]) for name in names))


async def _upgrade_to(db: Database, revision: str) -> None:
    cfg = alembic_config(db.url)

    def upgrade(connection: Connection) -> None:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(upgrade)


async def test_first_release_database_upgrades_without_losing_data(
    tmp_path: Path, database_url: str | None
) -> None:
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    owner, conversation = uuid.uuid4(), uuid.uuid4()
    message_ids = [uuid.uuid4() for _ in range(4)]
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    try:
        await _upgrade_to(db, FIRST_RELEASE)
        async with db.engine.begin() as conn:
            # Written with plain SQL, the way the first release's code left rows.
            await conn.execute(
                sql("INSERT INTO owners (id, name, created_at) VALUES (:id, 'local', :now)"),
                {"id": owner, "now": now},
            )
            await conn.execute(
                sql(
                    "INSERT INTO conversations (id, owner_id, title, model_tag, session_key, "
                    "system_prompt, created_at, updated_at) VALUES (:id, :owner, 'Old chat', "
                    "'smollm2', 'wx:dm:old', 'Be brief.', :now, :now)"
                ),
                {"id": conversation, "owner": owner, "now": now},
            )
            for position, message_id in enumerate(message_ids):
                await conn.execute(
                    sql(
                        "INSERT INTO messages (id, conversation_id, position, role, content, "
                        "token_count, model_tag, inference_time_ms, finish_reason, created_at) "
                        "VALUES (:id, :conv, :pos, :role, :content, 3, 'smollm2', :ms, :finish, "
                        ":now)"
                    ),
                    {
                        "id": message_id,
                        "conv": conversation,
                        "pos": position,
                        "role": "user" if position % 2 == 0 else "assistant",
                        "content": f"old message {position}",
                        "ms": None if position % 2 == 0 else 120,
                        "finish": None if position % 2 == 0 else "stop",
                        "now": now,
                    },
                )

        await db.migrate()

        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        async with db.engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            assert version == head
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert {"owners", "conversations", "messages", "api_keys"} <= tables
            rows = (
                await conn.execute(
                    sql(
                        "SELECT id, position, role, content, token_count, finish_reason "
                        "FROM messages WHERE conversation_id = :conv ORDER BY position"
                    ),
                    {"conv": conversation},
                )
            ).all()
            assert [(r.position, r.role, r.content) for r in rows] == [
                (i, "user" if i % 2 == 0 else "assistant", f"old message {i}") for i in range(4)
            ]
            ids = [r.id if isinstance(r.id, uuid.UUID) else uuid.UUID(r.id) for r in rows]
            assert ids == message_ids
            kept = (
                await conn.execute(
                    text("SELECT title, session_key, system_prompt FROM conversations")
                )
            ).one()
            assert tuple(kept) == ("Old chat", "wx:dm:old", "Be brief.")

        # Migrating again is a no-op.
        await db.migrate()
    finally:
        await db.close()


async def test_upgraded_database_serves_the_old_session(
    tmp_path: Path, database_url: str | None
) -> None:
    from parlour.app import create_app
    from parlour.settings import Settings

    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'data' / 'parlour.db'}"
    db = Database(url)
    await _upgrade_to(db, FIRST_RELEASE)
    owner, conversation = uuid.uuid4(), uuid.uuid4()
    now = datetime(2026, 1, 2, tzinfo=UTC)
    async with db.engine.begin() as conn:
        await conn.execute(
            sql("INSERT INTO owners (id, name, created_at) VALUES (:id, 'local', :now)"),
            {"id": owner, "now": now},
        )
        await conn.execute(
            sql(
                "INSERT INTO conversations (id, owner_id, title, model_tag, session_key, "
                "created_at, updated_at) VALUES (:id, :owner, 't', 'scripted', 'k', :now, :now)"
            ),
            {"id": conversation, "owner": owner, "now": now},
        )
        for position, (role, content) in enumerate([("user", "a"), ("assistant", "b")]):
            await conn.execute(
                sql(
                    "INSERT INTO messages (id, conversation_id, position, role, content, "
                    "token_count, created_at) VALUES (:id, :conv, :pos, :role, :content, 1, :now)"
                ),
                {
                    "id": uuid.uuid4(),
                    "conv": conversation,
                    "pos": position,
                    "role": role,
                    "content": content,
                    "now": now,
                },
            )
    await db.close()

    import httpx

    app = create_app(Settings(data_dir=tmp_path / "data", model="scripted", database_url=url))
    async with app.router.lifespan_context(app):
        await app.state.models.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            reply = await client.post(
                "/v1/chat/completions",
                headers={"x-session-key": "k"},
                json={"messages": [{"role": "user", "content": "c"}]},
            )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "Echo 2: c"
    sent = app.state.models.default.backend.calls[-1].messages
    assert [m.content for m in sent] == ["a", "b", "c"]
