"""The chat page at `/`, the offline API reference at `/docs`, and the page's own small API."""

from __future__ import annotations

import mimetypes
import uuid
from pathlib import Path

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from starlette.responses import FileResponse, Response

from ..errors import NotFound
from ..store import queries
from ..store.tables import Message
from ..turns.plan import load_bot, model_name, system_parts
from ..turns.request import BotRef
from .conversations import (
    MAX_TITLE,
    NOT_FOUND,
    ConversationId,
    ConversationPublic,
    _check_model,
    _owned,
)
from .deps import EngineDep, ModelsDep, PrincipalDep

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
ASSETS = "/ui/"

#: The chat page loads nothing from elsewhere and runs no inline script: model output that
#: slips past the sanitiser still cannot run or fetch anything.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'; object-src 'none'"
)
#: Swagger UI sets style attributes and draws its icons as data: images.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; object-src 'none'"
)
#: The pages themselves are served only at / and /docs, with their policies.
SHIPPED_TYPES = frozenset({".js", ".css", ".svg", ".png", ".ico"})


def asset_files() -> dict[str, Path]:
    """URL path -> file for every static file the page may load."""
    return {
        ASSETS + path.relative_to(STATIC).as_posix(): path
        for path in sorted(STATIC.rglob("*"))
        if path.is_file() and path.suffix in SHIPPED_TYPES
    }


def public_paths() -> frozenset[str]:
    """Paths answered without a token: the page, the reference and their static files."""
    return frozenset({"/", "/docs", *asset_files()})


def _page(name: str, policy: str) -> Response:
    return FileResponse(
        STATIC / name,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def pages_router() -> APIRouter:
    """GET /, GET /docs and the files under /ui/."""
    router = APIRouter(include_in_schema=False)
    files = asset_files()

    @router.get("/")
    async def chat_page() -> Response:
        return _page("index.html", PAGE_POLICY)

    @router.get("/docs")
    async def api_reference() -> Response:
        return _page("docs.html", DOCS_POLICY)

    @router.get(ASSETS + "{name:path}")
    async def asset(name: str) -> Response:
        path = files.get(ASSETS + name)
        if path is None:
            raise NotFound("No such file.")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(
            path,
            media_type=media,
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    return router


class PageConversationCreate(BaseModel):
    """Body of POST /ui/api/conversations: a new chat, optionally with a bot and a prompt."""

    model_config = ConfigDict(extra="ignore")

    title: str = Field(default="New conversation", max_length=MAX_TITLE)
    model_tag: str = Field(min_length=1, max_length=255)
    bot: str | None = Field(default=None, description="A bot's uid or slug (GET /v1/bots).")
    system_prompt: str | None = None


class SystemPrompt(BaseModel):
    """Body of PUT /ui/api/conversations/{conversationId}/system-prompt."""

    model_config = ConfigDict(extra="ignore")

    system_prompt: str = Field(description="Empty to remove it.")


class ConversationState(BaseModel):
    """What the page shows around a conversation's messages."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID
    system_prompt: str
    bot: str | None = Field(description="The bot's name, if the conversation has one.")
    context_length: int = Field(description="Tokens the conversation's model can see.")
    system_tokens: int = Field(description="Tokens of the system prompts.")
    unfinished: dict[str, str] = Field(
        description="Assistant message id -> how it ended, for replies that did not end "
        "normally (`cancelled`, `length`, `error`)."
    )


#: The few things the page needs that the public dialects do not offer.
api = APIRouter(prefix="/ui/api/conversations", tags=["chat page"])


@api.post("", status_code=201, operation_id="pageCreateConversation")
async def create(
    body: PageConversationCreate, engine: EngineDep, models: ModelsDep, principal: PrincipalDep
) -> ConversationPublic:
    """Create a conversation with a bot and a system prompt."""
    _check_model(models, body.model_tag)
    async with engine.db.session() as session, session.begin():
        bot = await load_bot(engine.db, BotRef(body.bot)) if body.bot else None
        row = await queries.create_conversation(
            session,
            owner_id=principal.owner_id,
            title=body.title,
            model_tag=body.model_tag,
            bot_id=bot.uid if bot else None,
        )
        row.system_prompt = body.system_prompt or None
        await session.flush()
        return ConversationPublic.model_validate(row)


@api.put("/{conversationId}/system-prompt", responses=NOT_FOUND)
async def set_system_prompt(
    conversation_id: ConversationId,
    body: SystemPrompt,
    engine: EngineDep,
    models: ModelsDep,
    principal: PrincipalDep,
) -> ConversationState:
    """Set the conversation's own system prompt (a bot's prompt still comes first)."""
    async with engine.editing(conversation_id) as session:
        row = await _owned(session, principal.owner_id, conversation_id)
        row.system_prompt = body.system_prompt or None
    return await get_state(conversation_id, engine, models, principal)


@api.get("/{conversationId}", responses=NOT_FOUND)
async def get_state(
    conversation_id: ConversationId,
    engine: EngineDep,
    models: ModelsDep,
    principal: PrincipalDep,
) -> ConversationState:
    """The system prompt, bot, context window and unfinished replies of a conversation."""
    async with engine.db.read() as session, session.begin():
        row = await _owned(session, principal.owner_id, conversation_id)
        bot = await load_bot(engine.db, row.bot_id)
        ended = await session.execute(
            select(Message.id, Message.finish_reason).where(
                Message.conversation_id == row.id,
                Message.role == "assistant",
                func.coalesce(Message.finish_reason, "stop") != "stop",
            )
        )
        unfinished = {str(mid): str(reason) for mid, reason in ended}
    # Named as a turn would choose it, but not waited for: the window is known while it loads.
    backend = models.get(model_name(models, bot=bot, requested=None, stored=row.model_tag)).backend
    prompts = system_parts(bot, [row.system_prompt or ""], replaces=False)
    return ConversationState(
        id=row.id,
        system_prompt=row.system_prompt or "",
        bot=bot.name if bot else None,
        context_length=backend.context_length,
        system_tokens=(
            backend.count_tokens("\n\n".join(prompts)) if prompts and backend.ready else 0
        ),
        unfinished=unfinished,
    )


def install(app: FastAPI) -> None:
    """Serve the chat page and the offline reference; call before install_auth."""
    app.state.public_paths = public_paths()
    app.include_router(api)
    app.include_router(pages_router())
