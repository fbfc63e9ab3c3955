"""OpenAI's Responses API: responses as turns, chained by previous_response_id or kept in a
conversation, streamed from an event log that any process sharing the database can resume."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..backends.base import ChatMessage
from ..errors import InvalidRequest, NotFound, ParlourError, PreviousResponseNotFound
from ..settings import Settings
from ..store import queries
from ..store import responses as store
from ..store.tables import StoredResponse, utcnow
from ..turns.context import system_messages
from ..turns.engine import Engine
from ..turns.request import Messages, Sampling, Stored, TurnRequest
from . import sse
from .conversations_openai import (
    append_items,
    conversation_uuid,
    list_page,
    owned_conversation,
    query_int,
)
from .deps import EngineDep, PrincipalDep, SettingsDep
from .guard import generation
from .openai_protocol import json_body
from .responses_protocol import (
    TERMINAL_EVENTS,
    ResponseCreate,
    dialect_router,
    echo_fields,
    item_message,
    item_text,
    new_id,
    normalise_items,
    response_object,
)
from .responses_run import Draft, ResponseRunner, produce

router = dialect_router()


def _closing(error: ParlourError) -> list[str]:
    """How a Responses stream ends when the server shuts down: an `error` event."""
    body = {"type": "error", "code": error.code, "message": error.message, "param": None}
    return [sse.named("error", body)]


CLOSING = _closing

#: Seconds a cancel request waits for the running response to stop before answering.
CANCEL_WAIT_SECONDS = 30.0


async def get_runner(request: Request) -> ResponseRunner:
    """The app's response runner."""
    runner: ResponseRunner = request.app.state.responses
    return runner


RunnerDep = Annotated[ResponseRunner, Depends(get_runner)]


async def supported_body(
    body: Annotated[ResponseCreate, json_body(ResponseCreate)],
) -> ResponseCreate:
    """The request's body, refused if it asks for what is not implemented yet."""
    body.check_supported()
    return body


ResponseBody = Annotated[ResponseCreate, Depends(supported_body)]


def chain_context(
    links: list[StoredResponse], items: list[dict[str, Any]], instructions: str | None
) -> tuple[tuple[str, ...], tuple[ChatMessage, ...]]:
    """System prompt parts and messages of a chain: every link's input and output, then the
    new input; only this response's `instructions` apply."""
    system = [instructions] if instructions else []
    messages: list[ChatMessage] = []
    for link in links:
        messages.extend(item_message(i) for i in link.input)
        if link.output_text:
            messages.append(ChatMessage("assistant", link.output_text))
    messages.extend(item_message(i) for i in items)
    system.extend(m.content for m in messages if m.role == "system")
    return tuple(system), tuple(m for m in messages if m.role != "system")


async def _previous(
    engine: Engine, owner_id: uuid.UUID, response_id: str | None
) -> tuple[StoredResponse | None, list[StoredResponse]]:
    """The response a new one continues and its whole chain, oldest first."""
    if response_id is None:
        return None, []
    async with engine.db.read() as session, session.begin():
        parent = await store.get_response(session, owner_id, response_id)
        if parent is None:
            raise PreviousResponseNotFound(
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
            )
        return parent, await store.chain(session, parent)


async def build_draft(
    engine: Engine, owner_id: uuid.UUID, body: ResponseCreate, settings: Settings
) -> Draft:
    """Settle what a new response continues, its context and its stored row."""
    items = normalise_items(body.input)
    truncation = body.truncation or settings.responses_truncation
    rid = new_id("resp")
    echo = echo_fields(body, truncation=truncation)
    parent, links = await _previous(engine, owner_id, body.previous_response_id)
    row = StoredResponse(
        id=rid,
        owner_id=owner_id,
        parent_id=parent.id if parent else None,
        root_id=parent.root_id if parent else rid,
        status="in_progress",
        model=engine.models.get(body.model).spec.name,
        input=items,
        output_id=new_id("msg"),
        output_text="",
        input_tokens=0,
        output_tokens=0,
        cached_tokens=0,
        request=echo,
        cancel_requested=False,
        deleted=False,
        created_at=utcnow(),
    )
    sampling = Sampling(
        max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p
    )
    user = body.user or body.safety_identifier
    if body.conversation_id is not None:
        return await conversation_draft(engine, body, row, sampling, user)
    system, messages = chain_context(links, items, body.instructions)
    if not messages:
        raise InvalidRequest(
            "There is nothing to answer: give `input` as text or at least one message.",
            param="input",
        )
    *earlier, new = messages
    request = TurnRequest(
        owner_id=owner_id,
        # Every response of a chain shares the backend state of its first one.
        target=Messages(tuple(earlier), session=row.root_id),
        new=new,
        sampling=sampling,
        model=body.model,
        system=system,
        shrink_reply=True,
        truncate=truncation != "disabled",
        user_id=user,
        dialect="responses",
    )
    return Draft(row=row, request=request)


async def conversation_draft(
    engine: Engine,
    body: ResponseCreate,
    row: StoredResponse,
    sampling: Sampling,
    user: str | None,
) -> Draft:
    """A response on a conversation: earlier input items are added to it, the last (a user
    message) becomes the turn."""
    items = row.input
    if not items or items[-1]["role"] != "user":
        raise InvalidRequest(
            "With `conversation`, the input must end with a user message.", param="input"
        )
    cid = conversation_uuid(body.conversation_id or "")
    async with engine.editing(cid) as session:
        conversation = await owned_conversation(session, row.owner_id, cid)
        await append_items(engine, session, conversation, items[:-1])
    row.conversation_id = cid
    row.request = {**row.request, "conversation": f"conv_{cid.hex}"}
    request = TurnRequest(
        owner_id=row.owner_id,
        target=Stored(cid),
        new=ChatMessage("user", item_text(items[-1])),
        sampling=sampling,
        model=body.model,
        system=(body.instructions,) if body.instructions else (),
        user_id=user,
        dialect="responses",
    )
    return Draft(row=row, request=request)


async def _unstored(runner: ResponseRunner, draft: Draft, streaming: bool) -> Response:
    stream = await runner.begin(draft)
    row = draft.row

    async def events() -> AsyncIterator[str]:
        try:
            async for event in produce(row, stream):
                yield sse.named(event["type"], event)
        finally:
            stream.cancel()

    if streaming:
        return sse.response(events(), closing=CLOSING)
    async for _ in events():
        pass
    return JSONResponse(response_object(row))


async def _followed(
    runner: ResponseRunner, response_id: str, after: int, *, cancel_on_exit: bool
) -> AsyncIterator[str]:
    try:
        async for event in runner.follow(response_id, after):
            yield sse.named(event["type"], event)
    finally:
        # A plain stream ends with its client; a background one goes on.
        if cancel_on_exit:
            runner.cancel_here(response_id)


@router.post(
    "/v1/responses",
    summary="Create a response: a turn continuing a response chain or a conversation.",
)
@generation
async def create_response(
    body: ResponseBody,
    engine: EngineDep,
    runner: RunnerDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """OpenAI's POST /v1/responses."""
    draft = await build_draft(engine, principal.owner_id, body, settings)
    if not body.store:
        return await _unstored(runner, draft, body.stream)
    stream = await runner.begin(draft)
    row = draft.row
    try:
        task = await runner.run(row, stream)
    except BaseException:
        stream.cancel()
        raise
    if body.stream:
        followed = _followed(runner, row.id, -1, cancel_on_exit=not body.background)
        return sse.response(followed, closing=CLOSING)
    if body.background:
        return JSONResponse(response_object(row))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        runner.cancel_here(row.id)
        raise
    return JSONResponse(response_object(row))


async def _owned(runner: ResponseRunner, owner_id: uuid.UUID, response_id: str) -> StoredResponse:
    async with runner.db.read() as session, session.begin():
        row = await store.get_response(session, owner_id, response_id)
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return row


@router.get("/v1/responses/{response_id}", summary="A stored response; stream=true resumes it.")
async def get_response(
    response_id: str,
    request: Request,
    runner: RunnerDep,
    principal: PrincipalDep,
) -> Response:
    """The response object, or with `stream=true` its events after `starting_after`."""
    row = await _owned(runner, principal.owner_id, response_id)
    query = request.query_params
    if query.get("stream", "").lower() in ("true", "1"):
        after = query_int(query.get("starting_after"), "starting_after", -1, low=-1, high=2**31)
        followed = _followed(runner, row.id, after, cancel_on_exit=False)
        return sse.response(followed, closing=CLOSING)
    return JSONResponse(response_object(row))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response.")
async def delete_response(
    response_id: str, runner: RunnerDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Hide a response; responses that continue it keep their context."""
    row = await _owned(runner, principal.owner_id, response_id)
    await runner.hub.request_cancel(row.id)
    async with runner.db.session() as session, session.begin():
        await store.delete_response(session, row.id)
    return {"id": row.id, "object": "response.deleted", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel", summary="Stop a background response.")
async def cancel_response(response_id: str, runner: RunnerDep, principal: PrincipalDep) -> Response:
    """Stop a running background response, wherever it runs; its partial text is kept."""
    row = await _owned(runner, principal.owner_id, response_id)
    if not row.request.get("background"):
        raise InvalidRequest("Only background responses can be cancelled.", param="response_id")
    if row.status == "in_progress":
        async with runner.db.session() as session, session.begin():
            await store.update_response(session, row.id, cancel_requested=True)
        await runner.hub.request_cancel(row.id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_until_done(runner, row.id), CANCEL_WAIT_SECONDS)
        row = await _owned(runner, principal.owner_id, response_id)
    return JSONResponse(response_object(row))


async def _until_done(runner: ResponseRunner, response_id: str) -> None:
    async for event in runner.follow(response_id, -1):
        if event["type"] in TERMINAL_EVENTS:
            return


@router.get("/v1/responses/{response_id}/input_items", summary="A response's input items.")
async def input_items(
    response_id: str, request: Request, runner: RunnerDep, principal: PrincipalDep
) -> dict[str, Any]:
    """The items this response was given, in OpenAI's list shape."""
    row = await _owned(runner, principal.owner_id, response_id)
    return list_page(row.input, request.query_params, default_order="desc")


@router.post("/v1/responses/input_tokens", summary="Count the input tokens a response would use.")
async def input_tokens(
    body: ResponseBody, engine: EngineDep, settings: SettingsDep, principal: PrincipalDep
) -> dict[str, Any]:
    """The input's token count for the model, with its chain or conversation."""
    backend = engine.models.ready_model(body.model).backend
    if body.conversation_id is not None:
        cid = conversation_uuid(body.conversation_id)
        async with engine.db.read() as session, session.begin():
            await owned_conversation(session, principal.owner_id, cid)
            stored = await queries.list_messages(session, cid)
        system: tuple[str, ...] = (body.instructions,) if body.instructions else ()
        messages = tuple(ChatMessage(m.role, m.content) for m in stored)  # type: ignore[arg-type]
        messages += tuple(item_message(i) for i in normalise_items(body.input))
    else:
        turn = (await build_draft(engine, principal.owner_id, body, settings)).request
        assert isinstance(turn.target, Messages)  # not a conversation: a chain
        system, messages = turn.system, (*turn.target.history, turn.new)
    count = backend.prompt_tokens([*system_messages(system), *messages])
    return {"object": "response.input_tokens", "input_tokens": count}
