"""The admin API: bots and knowledge bases under /admin, usage totals at /v1/usage.

Admin principals only: API keys created with `--admin`, or the local owner when no
authentication is configured.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from .. import bots, usage
from ..errors import InvalidRequest
from ..knowledge import index as knowledge
from ..knowledge.documents import SourceDocument, open_document
from ..store.tables import KbDocument, iso_utc
from .body import too_large
from .deps import AdminDep, EngineDep, ReadSession, WriteSession
from .wire import Int, Number, Text

#: What admin routes answer besides their result, all as `{"detail": message}`.
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A value the store refuses (a slug or name of the wrong form)."},
    403: {"description": "Not an admin principal."},
    404: {"description": "No such bot, knowledge base or document."},
    409: {"description": "The slug or name is taken."},
}

router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_ERRORS)
usage_router = APIRouter(tags=["admin"], responses=ADMIN_ERRORS)

#: Largest document upload accepted, in bytes.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


class BotCreate(BaseModel):
    """A new bot."""

    model_config = ConfigDict(extra="forbid")

    uid: uuid.UUID | None = Field(default=None, description="Default: a new random uid.")
    slug: Text
    name: Text
    system_prompt: Text
    description: Text = ""
    model: Text | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    max_tokens: Int | None = Field(default=None, ge=1)
    enable_l0_retrieval: bool | None = Field(
        default=None, description="Default: on when a knowledge base is given."
    )
    kb: Text | None = Field(default=None, description="A knowledge base's name.")
    welcome_message: Text = ""


class BotUpdate(BaseModel):
    """Fields to change; `null` clears model, temperature, max_tokens and kb."""

    model_config = ConfigDict(extra="forbid")

    slug: Text | None = None
    name: Text | None = None
    system_prompt: Text | None = None
    description: Text | None = None
    model: Text | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    max_tokens: Int | None = Field(default=None, ge=1)
    enable_l0_retrieval: bool | None = None
    kb: Text | None = None
    welcome_message: Text | None = None


class KbCreate(BaseModel):
    """A new, empty knowledge base."""

    model_config = ConfigDict(extra="forbid")

    name: Text
    description: Text = ""


class KbUpdate(BaseModel):
    """A new name or description."""

    model_config = ConfigDict(extra="forbid")

    name: Text | None = None
    description: Text | None = None


def kb_dict(summary: knowledge.KbSummary) -> dict[str, Any]:
    """A knowledge base as the admin API shows it."""
    kb = summary.kb
    return {
        "id": str(kb.id),
        "name": kb.name,
        "description": kb.description,
        "document_count": summary.documents,
        "chunk_count": summary.chunks,
        "created_at": iso_utc(kb.created_at),
        "updated_at": iso_utc(kb.updated_at),
    }


def document_dict(document: KbDocument) -> dict[str, Any]:
    """A document as the admin API shows it."""
    return {
        "id": str(document.id),
        "name": document.name,
        "sha256": document.sha256,
        "size": document.size,
        "chunks": document.chunk_count,
        "created_at": iso_utc(document.created_at),
        "updated_at": iso_utc(document.updated_at),
    }


# Bots


@router.get("/bots", summary="Every bot with all its fields.")
async def list_bots(session: ReadSession, admin: AdminDep) -> list[dict[str, Any]]:
    """Every bot, by slug."""
    return [v.as_dict() for v in await bots.list_bots(session)]


@router.post("/bots", status_code=201, summary="Create a bot.")
async def create_bot(body: BotCreate, session: WriteSession, admin: AdminDep) -> dict[str, Any]:
    """Create a bot; answers it with its uid."""
    created = await bots.create_bot(session, body.model_dump(exclude_unset=True))
    return created.as_dict()


@router.get("/bots/{ref}", summary="One bot, by uid or slug.")
async def get_bot(ref: str, session: ReadSession, admin: AdminDep) -> dict[str, Any]:
    """One bot."""
    return (await bots.view(session, await bots.get_bot(session, ref))).as_dict()


@router.patch("/bots/{ref}", summary="Change some of a bot's fields.")
async def update_bot(
    ref: str, body: BotUpdate, session: WriteSession, admin: AdminDep
) -> dict[str, Any]:
    """Change the fields the body names."""
    bot = await bots.get_bot(session, ref)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("enable_l0_retrieval", False) is None:
        raise InvalidRequest("enable_l0_retrieval must be true or false.")
    return (await bots.update_bot(session, bot, changes)).as_dict()


@router.delete("/bots/{ref}", status_code=204, summary="Delete a bot (its usage stays).")
async def delete_bot(ref: str, session: WriteSession, admin: AdminDep) -> Response:
    """Delete a bot."""
    await bots.remove_bot(session, await bots.get_bot(session, ref))
    return Response(status_code=204)


# Knowledge bases


@router.get("/kbs", summary="Every knowledge base with document and chunk counts.")
async def list_kbs(session: ReadSession, admin: AdminDep) -> list[dict[str, Any]]:
    """Every knowledge base, by name."""
    return [kb_dict(s) for s in await knowledge.list_kbs(session)]


@router.post("/kbs", status_code=201, summary="Create an empty knowledge base.")
async def create_kb(body: KbCreate, session: WriteSession, admin: AdminDep) -> dict[str, Any]:
    """Create a knowledge base; add documents with POST /admin/kbs/{name}/documents."""
    kb = await knowledge.create_kb(session, body.name, body.description)
    return kb_dict(knowledge.KbSummary(kb, 0, 0))


@router.get("/kbs/{name}", summary="One knowledge base with its documents.")
async def get_kb(name: str, session: ReadSession, admin: AdminDep) -> dict[str, Any]:
    """A knowledge base and its documents."""
    kb = await knowledge.get_kb(session, name)
    body = kb_dict(await knowledge.summary(session, kb))
    body["documents"] = [document_dict(d) for d in await knowledge.list_documents(session, kb)]
    return body


@router.patch("/kbs/{name}", summary="Rename a knowledge base or change its description.")
async def update_kb(
    name: str, body: KbUpdate, session: WriteSession, admin: AdminDep
) -> dict[str, Any]:
    """Change the name or description."""
    kb = await knowledge.get_kb(session, name)
    await knowledge.update_kb(session, kb, name=body.name, description=body.description)
    return kb_dict(await knowledge.summary(session, kb))


@router.delete("/kbs/{name}", status_code=204, summary="Delete a knowledge base.")
async def delete_kb(name: str, session: WriteSession, admin: AdminDep) -> Response:
    """Delete a knowledge base and its documents; bots using it keep working without it."""
    await knowledge.remove_kb(session, await knowledge.get_kb(session, name))
    return Response(status_code=204)


@router.get("/kbs/{name}/documents", summary="A knowledge base's documents.")
async def list_documents(name: str, session: ReadSession, admin: AdminDep) -> list[dict[str, Any]]:
    """The documents, by name."""
    kb = await knowledge.get_kb(session, name)
    return [document_dict(d) for d in await knowledge.list_documents(session, kb)]


async def _uploads(request: Request) -> list[SourceDocument]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise too_large(MAX_UPLOAD_BYTES)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            "Upload documents as multipart/form-data, e.g. `curl -F file=@notes.md …`."
        )
    sources: list[SourceDocument] = []
    async with request.form(max_files=100) as form:
        for _field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            data = await value.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise too_large(MAX_UPLOAD_BYTES)
            name = value.filename or "document"
            # PDF parsing is CPU work; keep the event loop free for other requests.
            source = await asyncio.to_thread(open_document, name, data)
            await asyncio.to_thread(source.load)
            sources.append(source)
    if not sources:
        raise InvalidRequest("No file in the upload: send one or more `file` parts.")
    return sources


@router.post(
    "/kbs/{name}/documents",
    summary="Upload documents (multipart, any field name): text, Markdown or PDF.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                }
            },
        }
    },
)
async def upload_documents(
    name: str, request: Request, engine: EngineDep, admin: AdminDep
) -> dict[str, Any]:
    """Index uploaded files; the same file again is skipped, a changed one replaced."""
    async with engine.db.read() as session, session.begin():
        await knowledge.get_kb(session, name)
    sources = await _uploads(request)
    results: list[dict[str, Any]] = []
    async with engine.db.session() as session, session.begin():
        kb = await knowledge.get_kb(session, name)
        for source in sources:
            result = await knowledge.add_document(session, kb, source)
            results.append(
                {
                    "name": result.name,
                    "status": result.status,
                    "chunks": result.chunks,
                    "same_as": result.same_as,
                }
            )
    return {"results": results}


@router.delete(
    "/kbs/{name}/documents/{document}",
    status_code=204,
    summary="Delete a document (by name or id) and its chunks.",
)
async def delete_document(
    name: str, document: str, session: WriteSession, admin: AdminDep
) -> Response:
    """Delete one document."""
    kb = await knowledge.get_kb(session, name)
    await knowledge.remove_document(session, kb, document)
    return Response(status_code=204)


@router.get("/kbs/{name}/search", summary="Ranked chunks matching a query.")
async def search_kb(
    name: str,
    session: ReadSession,
    admin: AdminDep,
    q: Annotated[str, Query(min_length=1, description="The question or keywords.")],
    limit: Annotated[int, Query(ge=1, le=50)] = 5,
) -> dict[str, Any]:
    """The best chunks, best first, with scores (higher is better) and sources."""
    kb = await knowledge.get_kb(session, name)
    hits = await knowledge.search(session, kb.id, q, limit=limit)
    return {
        "query": q,
        "data": [
            {
                "score": hit.score,
                "source": hit.source,
                "document": hit.document,
                "page": hit.page,
                "position": hit.position,
                "content": hit.content,
            }
            for hit in hits
        ],
    }


# Usage


@usage_router.get("/v1/usage", summary="Token totals per user, bot and day (UTC).")
async def get_usage(
    session: ReadSession,
    admin: AdminDep,
    since: Annotated[date | None, Query(description="First day, YYYY-MM-DD.")] = None,
    until: Annotated[date | None, Query(description="Last day (inclusive).")] = None,
    user_id: Annotated[str | None, Query(description="Only this end user.")] = None,
    bot: Annotated[str | None, Query(description="Only this bot (uid or slug).")] = None,
) -> dict[str, Any]:
    """Totals of every recorded generation, newest day first, with a grand total."""
    bot_id: uuid.UUID | None = None
    if bot is not None:
        bot_id = (await bots.get_bot(session, bot)).uid
    rows = await usage.totals(session, since=since, until=until, user_id=user_id, bot_id=bot_id)
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    return {
        "object": "list",
        "data": [r.as_dict() for r in rows],
        "totals": {
            "requests": sum(r.requests for r in rows),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


class StatisticsRequest(BaseModel):
    """The aBLT SDK's usage-statistics query; user_id -1 means every user."""

    user_id: int = -1
    start_date: date
    end_date: date


_STAT_FIELDS = ("original", "enchancement", "response", "total")


def _statistics(prompt: int, completion: int) -> dict[str, int]:
    # The aBLT names: original = prompt, response = completion; parlour adds no
    # enhancement tokens and counts no words.
    tokens = {"original": prompt, "enchancement": 0, "response": completion}
    tokens["total"] = prompt + completion
    return {
        **{f"{k}_tokens": tokens[k] for k in _STAT_FIELDS},
        **{f"{k}_words": 0 for k in _STAT_FIELDS},
    }


@usage_router.post(
    "/v1/user/usage-statistics", summary="Token totals per day in the aBLT SDK's shape."
)
async def usage_statistics(
    body: StatisticsRequest, session: ReadSession, admin: AdminDep
) -> dict[str, Any]:
    """Bot API usage totals of one end user (or all, with -1) per day, and overall."""
    rows = await usage.totals(
        session,
        since=body.start_date,
        until=body.end_date,
        user_id=None if body.user_id == -1 else str(body.user_id),
    )
    days: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        days[row.day][0] += row.prompt_tokens
        days[row.day][1] += row.completion_tokens
    return {
        "total": _statistics(
            sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows)
        ),
        "items": [{**_statistics(p, c), "date": day} for day, (p, c) in sorted(days.items())],
    }
