"""Knowledge bases: reading files, chunking, `parlour kb …`, and ranked search on both databases."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import pytest
from click.testing import CliRunner

from parlour.cli.main import main
from parlour.errors import InvalidRequest
from parlour.knowledge import index as knowledge
from parlour.knowledge.documents import CHUNK_TOKENS, approx_tokens, chunk_pages, open_document
from parlour.store.db import Database
from tests.support.kb_documents import ANSWER, DOCUMENTS, QUESTION, write_documents
from tests.support.pdf import make_pdf


def run(*args: str) -> tuple[int, str, str]:
    """Run a parlour command in-process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(
        main, list(args), env={k: None for k in os.environ if k.startswith("PARLOUR_")}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ranked_sources(output: str) -> list[str]:
    """The sources of `kb search` output, best first."""
    return re.findall(r"^\d+\. score \S+  (.+?)  \(chunk \d+\)$", output, flags=re.M)


def test_chunks_overlap_and_cover_the_text() -> None:
    sentences = [" ".join(f"w{i * 10 + j}" for j in range(10)) + "." for i in range(100)]
    text = " ".join(sentences)
    chunks = list(chunk_pages(iter([(None, text)])))
    assert len(chunks) > 3
    words = [c.content.replace(".", "").split() for c in chunks]
    for chunk in chunks:
        assert chunk.token_count <= CHUNK_TOKENS + 2, chunk.token_count
        assert chunk.token_count == approx_tokens(chunk.content)
    assert all(c.token_count >= CHUNK_TOKENS * 0.8 for c in chunks[:-1])
    for before, after in pairwise(words):
        overlap = set(before) & set(after)
        assert overlap, "neighbouring chunks share no text"
        assert after[0] in before  # the next chunk starts inside the previous one
    covered = {w for ws in words for w in ws}
    assert covered == {f"w{i}" for i in range(1000)}


def test_chunks_keep_pages_and_split_huge_sentences() -> None:
    giant = " ".join(f"x{i}" for i in range(600))  # one "sentence" longer than a chunk
    chunks = list(chunk_pages(iter([(1, "Short first page."), (2, giant)])))
    assert chunks[0].page == 1
    assert all(c.token_count <= CHUNK_TOKENS + 2 for c in chunks)
    assert {c.page for c in chunks[1:]} == {2}
    assert "x599" in chunks[-1].content


def test_documents_are_recognised_or_refused() -> None:
    pdf = open_document("guide.pdf", make_pdf([["Page one."], ["Page two."]]))
    assert (pdf.kind, pdf.page_count) == ("pdf", 2)
    assert [p.strip() for p in pdf.pages()] == ["Page one.", "Page two."]
    text = open_document("dir/notes.md", "# Héllo\n".encode())
    assert (text.name, text.kind, list(text.pages())) == ("notes.md", "text", ["# Héllo\n"])
    with pytest.raises(InvalidRequest, match="only text"):
        open_document("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(InvalidRequest, match="as a PDF"):
        open_document("broken.pdf", b"%PDF-1.4 this is not really a pdf")


def test_kb_add_search_and_readd(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = write_documents(tmp_path / "docs")
    code, out, err = run("kb", "add", "handbook", *map(str, paths), "--data-dir", data)
    assert code == 0, err
    assert "Reading 4 file(s)" in err  # the progress bar's label
    for name in DOCUMENTS:
        assert re.search(rf"^{re.escape(name)}: added, \d+ chunks$", out, flags=re.M), out

    code, out, _ = run("kb", "search", "handbook", QUESTION, "--data-dir", data)
    assert code == 0
    assert ranked_sources(out)[0] == "texas-taxes.md"
    first = out.split("\n2. ")[0]
    assert ANSWER in first
    code, out, _ = run("kb", "search", "handbook", "how long to bake sourdough", "--data-dir", data)
    assert ranked_sources(out)[0] == "sourdough.txt"

    # The same files again: nothing is indexed twice.
    code, out, _ = run("kb", "add", "handbook", *map(str, paths), "--data-dir", data)
    assert out.count("unchanged") == len(DOCUMENTS)
    copy = tmp_path / "copy-of-taxes.md"
    copy.write_bytes(paths[0].read_bytes())
    code, out, _ = run("kb", "add", "handbook", str(copy), "--data-dir", data)
    assert "copy-of-taxes.md: skipped, same content as texas-taxes.md" in out
    code, out, _ = run("kb", "list", "--data-dir", data)
    assert re.search(r"^handbook\s+4\s+\d+", out, flags=re.M), out

    # A changed file replaces its chunks: the old text is no longer found.
    paths[1].write_text("Rye crackers need caraway seeds and a very hot oven.\n")
    code, out, _ = run("kb", "add", "handbook", str(paths[1]), "--data-dir", data)
    assert "sourdough.txt: replaced, 1 chunks" in out
    code, out, _ = run("kb", "search", "handbook", "caraway crackers", "--data-dir", data)
    assert ranked_sources(out) == ["sourdough.txt"]
    code, out, err = run(
        "kb", "search", "handbook", "levain boule refrigerator", "--data-dir", data
    )
    assert ranked_sources(out) == [] and "No matching chunks" in err


def test_pdf_pages_are_sources(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(
        make_pdf(
            [
                ["Chapter one explains the warranty terms of the kettle."],
                ["Descale the kettle monthly with citric acid dissolved in water."],
            ]
        )
    )
    code, out, err = run("kb", "add", "manuals", str(pdf), "--data-dir", data)
    assert code == 0, err
    code, out, _ = run("kb", "search", "manuals", "how do I descale it", "--data-dir", data)
    assert ranked_sources(out)[0] == "manual.pdf p. 2"


def test_removing_documents_and_bases(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    paths = write_documents(tmp_path / "docs")
    run("kb", "add", "handbook", *map(str, paths), "--data-dir", data)
    code, _, err = run(
        "bot", "add", "--slug", "taxson", "--name", "Taxson", "--system-prompt", "Taxes.",
        "--kb", "handbook", "--data-dir", data,
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run(
        "kb", "remove", "handbook", "--document", "texas-taxes.md", "--data-dir", data
    )
    assert code == 0 and "Removed 1 document" in out
    code, out, _ = run("kb", "search", "handbook", QUESTION, "--data-dir", data)
    assert "texas-taxes.md" not in ranked_sources(out)
    code, out, _ = run("kb", "list", "handbook", "--data-dir", data)
    assert "texas-taxes.md" not in out and "sourdough.txt" in out

    code, out, _ = run("kb", "remove", "handbook", "--data-dir", data)
    assert code == 0
    code, out, _ = run("bot", "show", "taxson", "--data-dir", data)
    assert "kb: -" in out  # the bot keeps working without it
    code, _, err = run("kb", "search", "handbook", "anything", "--data-dir", data)
    assert code == 1 and "parlour kb add handbook" in err


def test_unreadable_files_are_refused_before_indexing(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    good = write_documents(tmp_path / "docs")[0]
    bad = tmp_path / "image.bin"
    bad.write_bytes(b"\x00\x01\x02binary")
    code, _, err = run("kb", "add", "handbook", str(good), str(bad), "--data-dir", data)
    assert code == 1 and "image.bin" in err
    code, out, _ = run("kb", "list", "--data-dir", data)
    assert "handbook" not in out
    code, _, err = run("kb", "add", "bad name!", str(good), "--data-dir", data)
    assert code == 2 and "Invalid knowledge base name" in err


# The same search on PostgreSQL (tsvector + GIN), against a fresh database.

DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
async def postgres() -> AsyncIterator[Database]:
    """A migrated, fresh PostgreSQL database; skipped when no server is reachable."""
    import tests.conftest as conftest

    admin = conftest.POSTGRES_ADMIN_URL or DEFAULT_POSTGRES
    original = conftest.POSTGRES_ADMIN_URL
    conftest.POSTGRES_ADMIN_URL = admin
    try:
        try:
            await conftest._admin("SELECT 1")
        except OSError as exc:  # pragma: no cover - only without a PostgreSQL server
            pytest.skip(f"PostgreSQL is not reachable: {exc}")
        with conftest.fresh_database() as url:
            assert url is not None
            db = Database(url)
            await db.migrate()
            try:
                yield db
            finally:
                await db.close()
    finally:
        conftest.POSTGRES_ADMIN_URL = original


async def test_search_on_postgresql(postgres: Database) -> None:
    async with postgres.session() as session, session.begin():
        kb = await knowledge.create_kb(session, "handbook")
        for name, text in DOCUMENTS.items():
            result = await knowledge.add_document(session, kb, open_document(name, text.encode()))
            assert result.status == "added"
        again = await knowledge.add_document(
            session, kb, open_document("texas-taxes.md", DOCUMENTS["texas-taxes.md"].encode())
        )
        assert again.status == "unchanged"
    async with postgres.session() as session, session.begin():
        hits = await knowledge.search(session, kb.id, QUESTION)
        assert hits[0].document == "texas-taxes.md" and ANSWER in hits[0].content
        assert all(a.score >= b.score for a, b in pairwise(hits))
        assert knowledge.relevant(hits)[0] == hits[0]
        await knowledge.remove_document(session, kb, "texas-taxes.md")
    async with postgres.session() as session, session.begin():
        hits = await knowledge.search(session, kb.id, QUESTION)
        assert "texas-taxes.md" not in {h.document for h in hits}


async def test_migration_0003_downgrades_and_upgrades(
    tmp_path: Path, database_url: str | None
) -> None:
    from alembic import command
    from sqlalchemy import inspect
    from sqlalchemy.engine import Connection

    from parlour.store.db import alembic_config

    db = Database(database_url or f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    cfg = alembic_config(db.url)

    def downgrade(connection: Connection) -> None:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0002")

    new_tables = {"bots", "knowledge_bases", "kb_documents", "kb_chunks", "usage"}
    try:
        await db.migrate()
        async with db.engine.begin() as conn:
            await conn.run_sync(downgrade)
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert not tables & (new_tables | {"kb_chunks_fts"})
        await db.migrate()
        async with db.session() as session, session.begin():
            kb = await knowledge.create_kb(session, "again")
            source = open_document("taxes.md", DOCUMENTS["texas-taxes.md"].encode())
            await knowledge.add_document(session, kb, source)
            hits = await knowledge.search(session, kb.id, QUESTION)
        assert hits and hits[0].document == "taxes.md"
    finally:
        await db.close()
