"""Knowledge bases: storing documents as chunks and ranked full-text search over them.

Search runs in the database: FTS5 with BM25 on SQLite, a tsvector column with ts_rank on
PostgreSQL (both created by migration 0003). All search SQL lives in this module.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Uuid, bindparam, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import Conflict, InvalidRequest, NotFound
from ..store.tables import Bot, KbChunk, KbDocument, KnowledgeBase, utcnow
from .documents import SourceDocument, chunk_pages

#: The knowledge base L0 retrieval searches when no bot names one.
DEFAULT_KB = "default"
#: Chunks L0 retrieval adds to the system prompt, at most.
RETRIEVAL_LIMIT = 3
#: A chunk is relevant when it matches the query and scores at least this share of the
#: best chunk's score. Relative, because BM25 and ts_rank scores are on different scales.
RELATIVE_THRESHOLD = 0.3
#: Query terms used at most; a long message would otherwise match everything a little.
MAX_QUERY_TERMS = 32

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WORD = re.compile(r"\w+")

# Words too common to say what a question is about (PostgreSQL's `english` configuration
# drops its own list too; this one keeps both databases close).
_STOPWORDS = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves tell please explain describe"""
STOPWORDS = frozenset(_STOPWORDS.split())

SQLITE_SEARCH = text(
    """
    SELECT c.id AS id, c.content AS content, c.page AS page, c.position AS position,
           d.name AS document, -bm25(kb_chunks_fts) AS score
    FROM kb_chunks_fts
    JOIN kb_chunks AS c ON c.id = kb_chunks_fts.rowid
    JOIN kb_documents AS d ON d.id = c.document_id
    WHERE kb_chunks_fts MATCH :query AND c.kb_id = :kb_id
    ORDER BY score DESC, c.id
    LIMIT :limit
    """
).bindparams(bindparam("kb_id", type_=Uuid()))

POSTGRES_SEARCH = text(
    """
    SELECT c.id AS id, c.content AS content, c.page AS page, c.position AS position,
           d.name AS document, ts_rank(c.search_vector, q.query, 1) AS score
    FROM kb_chunks AS c
    JOIN kb_documents AS d ON d.id = c.document_id,
         to_tsquery('english', :query) AS q(query)
    WHERE c.kb_id = :kb_id AND c.search_vector @@ q.query
    ORDER BY score DESC, c.id
    LIMIT :limit
    """
).bindparams(bindparam("kb_id", type_=Uuid()))


@dataclass(frozen=True)
class Hit:
    """A chunk that matched a query, with its score (higher is better) and where it came from."""

    chunk_id: int
    content: str
    document: str
    page: int | None
    position: int
    score: float

    @property
    def source(self) -> str:
        """The document's name, with the page for PDFs."""
        return f"{self.document} p. {self.page}" if self.page is not None else self.document


@dataclass(frozen=True)
class AddResult:
    """What adding one document did."""

    name: str
    status: Literal["added", "replaced", "unchanged", "duplicate"]
    chunks: int
    #: For a duplicate: the document already holding the same bytes.
    same_as: str | None = None


@dataclass(frozen=True)
class KbSummary:
    """A knowledge base with its document and chunk counts."""

    kb: KnowledgeBase
    documents: int
    chunks: int


def check_name(name: str) -> str:
    """Refuse names that would not survive a URL path or a shell."""
    if not _NAME.match(name):
        raise InvalidRequest(
            f"Invalid knowledge base name {name!r}: use 1 to 128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit.",
            param="name",
        )
    return name


async def find_kb(session: AsyncSession, name: str) -> KnowledgeBase | None:
    """The knowledge base with this name, if any."""
    return await session.scalar(select(KnowledgeBase).where(KnowledgeBase.name == name))


async def get_kb(session: AsyncSession, name: str) -> KnowledgeBase:
    """The knowledge base with this name, or NotFound saying how to create it."""
    kb = await find_kb(session, name)
    if kb is None:
        raise NotFound(
            f"No knowledge base named {name!r}; create it with `parlour kb add {name} FILE…` "
            "or POST /admin/kbs."
        )
    return kb


async def create_kb(session: AsyncSession, name: str, description: str = "") -> KnowledgeBase:
    """A new, empty knowledge base."""
    check_name(name)
    if await find_kb(session, name) is not None:
        raise Conflict(f"A knowledge base named {name!r} already exists.", param="name")
    now = utcnow()
    kb = KnowledgeBase(name=name, description=description, created_at=now, updated_at=now)
    session.add(kb)
    await session.flush()
    return kb


async def ensure_kb(session: AsyncSession, name: str) -> KnowledgeBase:
    """The knowledge base with this name, created empty on first use."""
    return await find_kb(session, name) or await create_kb(session, name)


async def update_kb(
    session: AsyncSession,
    kb: KnowledgeBase,
    *,
    name: str | None = None,
    description: str | None = None,
) -> KnowledgeBase:
    """Rename a knowledge base or change its description."""
    if name is not None and name != kb.name:
        check_name(name)
        if await find_kb(session, name) is not None:
            raise Conflict(f"A knowledge base named {name!r} already exists.", param="name")
        kb.name = name
    if description is not None:
        kb.description = description
    kb.updated_at = utcnow()
    await session.flush()
    return kb


async def list_kbs(session: AsyncSession) -> list[KbSummary]:
    """Every knowledge base, by name, with how many documents and chunks it holds."""
    documents = (
        select(KbDocument.kb_id, func.count().label("n"), func.sum(KbDocument.chunk_count))
        .group_by(KbDocument.kb_id)
        .subquery()
    )
    rows = await session.execute(
        select(KnowledgeBase, documents.c.n, documents.c[2])
        .outerjoin(documents, documents.c.kb_id == KnowledgeBase.id)
        .order_by(KnowledgeBase.name)
    )
    return [KbSummary(kb, int(n or 0), int(c or 0)) for kb, n, c in rows]


async def summary(session: AsyncSession, kb: KnowledgeBase) -> KbSummary:
    """One knowledge base's counts."""
    row = (
        await session.execute(
            select(func.count(), func.sum(KbDocument.chunk_count)).where(KbDocument.kb_id == kb.id)
        )
    ).one()
    return KbSummary(kb, int(row[0] or 0), int(row[1] or 0))


async def remove_kb(session: AsyncSession, kb: KnowledgeBase) -> None:
    """Delete a knowledge base and its documents; bots that used it keep working without it."""
    # Chunks go first and explicitly, so the full-text index triggers see every row.
    await session.execute(delete(KbChunk).where(KbChunk.kb_id == kb.id))
    await session.execute(delete(KbDocument).where(KbDocument.kb_id == kb.id))
    await session.execute(update(Bot).where(Bot.kb_id == kb.id).values(kb_id=None))
    await session.delete(kb)
    await session.flush()


async def list_documents(session: AsyncSession, kb: KnowledgeBase) -> Sequence[KbDocument]:
    """A knowledge base's documents, by name."""
    query = select(KbDocument).where(KbDocument.kb_id == kb.id).order_by(KbDocument.name)
    return (await session.scalars(query)).all()


async def remove_document(session: AsyncSession, kb: KnowledgeBase, ref: str) -> KbDocument:
    """Delete one document (by name or id) and its chunks."""
    query = select(KbDocument).where(KbDocument.kb_id == kb.id)
    try:
        document = await session.scalar(query.where(KbDocument.id == uuid.UUID(ref)))
    except ValueError:
        document = None
    document = document or await session.scalar(query.where(KbDocument.name == ref))
    if document is None:
        raise NotFound(f"Knowledge base {kb.name!r} has no document {ref!r}.")
    await session.execute(delete(KbChunk).where(KbChunk.document_id == document.id))
    await session.delete(document)
    kb.updated_at = utcnow()
    await session.flush()
    return document


async def add_document(
    session: AsyncSession,
    kb: KnowledgeBase,
    source: SourceDocument,
    *,
    on_page: Callable[[], None] | None = None,
) -> AddResult:
    """Index a document. The same bytes again are skipped; a changed file under the same
    name replaces its old chunks."""
    digest = source.sha256
    existing = await session.scalar(
        select(KbDocument).where(KbDocument.kb_id == kb.id, KbDocument.name == source.name)
    )
    if existing is not None and existing.sha256 == digest:
        _skip_pages(source, on_page)
        return AddResult(source.name, "unchanged", existing.chunk_count)
    twin = await session.scalar(
        select(KbDocument).where(KbDocument.kb_id == kb.id, KbDocument.sha256 == digest).limit(1)
    )
    if twin is not None:
        _skip_pages(source, on_page)
        return AddResult(source.name, "duplicate", twin.chunk_count, same_as=twin.name)

    now = utcnow()
    status: Literal["added", "replaced"]
    if existing is not None:
        await session.execute(delete(KbChunk).where(KbChunk.document_id == existing.id))
        document, status = existing, "replaced"
        document.sha256, document.size, document.updated_at = digest, len(source.data), now
    else:
        document = KbDocument(
            kb_id=kb.id,
            name=source.name,
            sha256=digest,
            size=len(source.data),
            created_at=now,
            updated_at=now,
        )
        status = "added"
        session.add(document)
    await session.flush()
    document.chunk_count = await _index_chunks(session, document, source, on_page)
    kb.updated_at = now
    await session.flush()
    return AddResult(source.name, status, document.chunk_count)


async def _index_chunks(
    session: AsyncSession,
    document: KbDocument,
    source: SourceDocument,
    on_page: Callable[[], None] | None,
) -> int:
    """Split a document's pages into chunks and store them; the number of chunks."""

    def pages() -> Iterator[tuple[int | None, str]]:
        for number, page_text in enumerate(source.pages(), start=1):
            yield (number if source.kind == "pdf" else None), page_text
            if on_page is not None:
                on_page()

    count = 0
    batch: list[KbChunk] = []
    for draft in chunk_pages(pages()):
        batch.append(
            KbChunk(
                kb_id=document.kb_id,
                document_id=document.id,
                position=count,
                page=draft.page,
                content=draft.content,
                token_count=draft.token_count,
            )
        )
        count += 1
        if len(batch) >= 200:
            session.add_all(batch)
            await session.flush()
            batch = []
    session.add_all(batch)
    return count


def _skip_pages(source: SourceDocument, on_page: Callable[[], None] | None) -> None:
    if on_page is not None:
        for _ in range(source.page_count):
            on_page()


def query_terms(query: str) -> list[str]:
    """The words of a question that say what it is about, lowercased, without repeats."""
    terms: list[str] = []
    for word in _WORD.findall(query.lower()):
        word = word.strip("_")
        if (len(word) < 2 and not word.isdigit()) or word in STOPWORDS or word in terms:
            continue
        terms.append(word)
        if len(terms) == MAX_QUERY_TERMS:
            break
    return terms


async def search(
    session: AsyncSession, kb_id: uuid.UUID, query: str, *, limit: int = 5
) -> list[Hit]:
    """The chunks of a knowledge base that best match `query`, best first.

    Any query word may match (OR); ranking rewards chunks that match more, and rarer, words.
    """
    terms = query_terms(query)
    if not terms or limit < 1:
        return []
    if session.get_bind().dialect.name == "sqlite":
        statement, expression = SQLITE_SEARCH, " OR ".join(f'"{t}"' for t in terms)
    else:
        statement, expression = POSTGRES_SEARCH, " | ".join(terms)
    rows = await session.execute(statement, {"query": expression, "kb_id": kb_id, "limit": limit})
    return [
        Hit(
            chunk_id=row.id,
            content=row.content,
            document=row.document,
            page=row.page,
            position=row.position,
            score=round(float(row.score), 6),
        )
        for row in rows
    ]


def relevant(hits: Sequence[Hit], *, limit: int = RETRIEVAL_LIMIT) -> list[Hit]:
    """The best hits that clear the relevance threshold."""
    if not hits or hits[0].score <= 0:
        return []
    floor = hits[0].score * RELATIVE_THRESHOLD
    return [hit for hit in hits if hit.score >= floor][:limit]


def reference_block(hits: Sequence[Hit]) -> str:
    """Retrieved chunks as they are appended to the system prompt."""
    lines = ["Reference knowledge:"]
    for i, hit in enumerate(hits, start=1):
        lines.append(f"[{i}] ({hit.source}) {hit.content}")
    return "\n\n".join(lines)


async def retrieve(session: AsyncSession, query: str, *, kb_id: uuid.UUID | None) -> list[Hit]:
    """L0 retrieval: the relevant chunks of a knowledge base (else the default one) for a
    user message; empty when there is no such knowledge base or nothing relevant."""
    if not query.strip():
        return []
    if kb_id is None:
        default = await find_kb(session, DEFAULT_KB)
        if default is None:
            return []
        kb_id = default.id
    return relevant(await search(session, kb_id, query, limit=RETRIEVAL_LIMIT))
