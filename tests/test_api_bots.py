"""The Bot API (POST /chat, /v1/chat, GET /v1/bots) through the in-process app."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from parlour.backends.scripted import ScriptedBackend
from tests.support.dialects import events, make_bot, make_kb
from tests.support.kb_documents import ANSWER, QUESTION

# The three 422 examples of the Bot API's documentation, as written there.
SEED_MISSING_STREAM = """{
    "detail": [
        {
            "loc": [
                "body",
                "stream"
            ],
            "msg": "field required",
            "type": "value_error.missing"
        }
    ]
}"""
SEED_STREAM_NONE = """{
    "detail": [
        {
            "loc": [
                "body",
                "stream"
            ],
            "msg": "none is not an allowed value",
            "type": "type_error.none.not_allowed"
        }
    ]
}"""
SEED_NO_PROMPT = """{
   "detail": [
       {
           "loc": [
               "body",
               "__root__"
           ],
           "msg": "Either \\"prompt\\" or \\"messages\\" is required",
           "type": "value_error"
       }
   ]
}"""

NO_BOT = {
    "loc": ["body", "__root__"],
    "msg": 'Either "bot_uid" or "bot_slug" is required',
    "type": "value_error",
}
NO_PROMPT = {
    "loc": ["body", "__root__"],
    "msg": 'Either "prompt" or "messages" is required',
    "type": "value_error",
}


def err(loc: list[Any], msg: str, type_: str, **ctx: Any) -> dict[str, Any]:
    """One expected validation error."""
    entry: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_}
    if ctx:
        entry["ctx"] = ctx
    return entry


async def post(client: httpx.AsyncClient, body: Any, path: str = "/chat") -> httpx.Response:
    """POST a body (serialized here, so anything JSON can express can be sent)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(path, content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("body", "seed"),
    [
        ({"bot_slug": "taxson", "prompt": "Explain how to pay taxes."}, SEED_MISSING_STREAM),
        (
            {"bot_slug": "taxson", "prompt": "Explain how to pay taxes.", "stream": None},
            SEED_STREAM_NONE,
        ),
        ({"bot_slug": "taxson", "stream": True}, SEED_NO_PROMPT),
    ],
)
async def test_seed_422_examples_exactly(
    client: httpx.AsyncClient, body: dict[str, Any], seed: str
) -> None:
    for path in ("/chat", "/v1/chat"):
        response = await post(client, body, path)
        assert response.status_code == 422
        assert response.json() == json.loads(seed)


async def test_both_root_errors_at_once(client: httpx.AsyncClient) -> None:
    response = await post(client, {"stream": True})
    assert response.status_code == 422
    assert response.json() == {"detail": [NO_BOT, NO_PROMPT]}
    response = await post(client, {})
    assert response.json() == {
        "detail": [
            err(["body", "stream"], "field required", "value_error.missing"),
            NO_BOT,
            NO_PROMPT,
        ]
    }


async def test_wrong_types_for_every_field_reported_together(client: httpx.AsyncClient) -> None:
    body = {
        "bot_uid": [1],
        "bot_slug": {"a": 1},
        "prompt": [],
        "messages": "hello",
        "stream": "maybe",
        "user_id": {"id": 1},
        "language": ["en"],
        "max_words": "many",
    }
    response = await post(client, body)
    assert response.status_code == 422
    str_error = ("str type expected", "type_error.str")
    assert response.json() == {
        "detail": [
            err(["body", "bot_uid"], *str_error),
            err(["body", "bot_slug"], *str_error),
            err(["body", "prompt"], *str_error),
            err(["body", "messages"], "value is not a valid list", "type_error.list"),
            err(["body", "stream"], "value could not be parsed to a boolean", "type_error.bool"),
            err(["body", "user_id"], *str_error),
            err(["body", "language"], *str_error),
            err(["body", "max_words"], "value is not a valid integer", "type_error.integer"),
            NO_BOT,  # root checks run on what validated, like pydantic v1's root validators
            NO_PROMPT,
        ]
    }


async def test_message_errors_carry_their_index(client: httpx.AsyncClient) -> None:
    body = {
        "bot_slug": "taxson",
        "stream": False,
        "max_words": 0,
        "messages": [
            5,
            {"role": "bot", "content": "x"},
            {"role": "user"},
            {"role": "user", "content": ["x"]},
            None,
            {"role": "user", "content": "fine"},
        ],
    }
    response = await post(client, body)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            err(["body", "messages", 0], "value is not a valid dict", "type_error.dict"),
            err(
                ["body", "messages", 1, "role"],
                "unexpected value; permitted: 'system', 'user', 'assistant'",
                "value_error.const",
                given="bot",
                permitted=["system", "user", "assistant"],
            ),
            err(["body", "messages", 2, "content"], "field required", "value_error.missing"),
            err(["body", "messages", 3, "content"], "str type expected", "type_error.str"),
            err(
                ["body", "messages", 4],
                "none is not an allowed value",
                "type_error.none.not_allowed",
            ),
            err(
                ["body", "max_words"],
                "ensure this value is greater than or equal to 1",
                "value_error.number.not_ge",
                limit_value=1,
            ),
            NO_PROMPT,
        ]
    }


async def test_bodies_that_are_not_objects(client: httpx.AsyncClient) -> None:
    missing_body = err(["body"], "field required", "value_error.missing")
    assert (await post(client, b"")).json() == {"detail": [missing_body]}
    assert (await post(client, b"null")).json() == {"detail": [missing_body]}
    not_dict = await post(client, b'"text"')
    assert not_dict.status_code == 422
    assert not_dict.json() == {
        "detail": [err(["body"], "value is not a valid dict", "type_error.dict")]
    }
    broken = await post(client, b'{"stream": tru')
    assert broken.status_code == 422
    [problem] = broken.json()["detail"]
    assert problem["loc"] == ["body", 11] and problem["type"] == "value_error.jsondecode"
    assert problem["msg"] == "Expecting value: line 1 column 12 (char 11)"


async def test_v1_coercions_are_accepted(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_bot(client)
    body = {"bot_slug": "taxson", "prompt": 42, "stream": "false", "user_id": 7, "max_words": "12"}
    response = await post(client, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"content": "Echo 1: 42"}
    assert "Keep the answer under 12 words." in scripted.calls[-1].messages[0].content


def other_uid(uid: str) -> str:
    """The same uuid with its last digit changed: a well-formed uid of no bot."""
    return uid[:-1] + ("1" if uid.endswith("0") else "0")


async def test_bot_by_uid_and_slug_and_unknown(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    bot = await make_bot(client)
    by_uid = await post(client, {"bot_uid": bot["uid"], "prompt": "hi", "stream": False})
    assert by_uid.status_code == 200 and by_uid.json() == {"content": "Echo 1: hi"}
    by_slug = await post(
        client, {"bot_slug": "taxson", "prompt": "hey", "stream": False}, "/v1/chat"
    )
    assert by_slug.status_code == 200 and by_slug.json() == {"content": "Echo 1: hey"}
    for ref in (
        {"bot_slug": "nobody"},
        {"bot_uid": "not-a-uuid"},
        {"bot_uid": other_uid(str(bot["uid"]))},
    ):
        response = await post(client, {**ref, "prompt": "hi", "stream": True})
        assert response.status_code == 404
        assert response.json() == {"detail": "Bot not found"}


async def test_bot_system_prompt_first_then_request_system_messages(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_bot(client, temperature=0.25, max_tokens=77)
    body = {
        "bot_slug": "taxson",
        "stream": False,
        "language": "Spanish",
        "messages": [
            {"role": "system", "content": "User live in Texas, US."},
            {"role": "user", "content": "Explain how to pay taxes."},
            {"role": "assistant", "content": "Which taxes?"},
            {"role": "user", "content": "Property taxes."},
        ],
    }
    response = await post(client, body)
    assert response.status_code == 200, response.text
    call = scripted.calls[-1]
    assert [m.role for m in call.messages] == ["system", "user", "assistant", "user"]
    assert call.messages[0].content == (
        "You explain taxes.\n\nUser live in Texas, US.\n\nAnswer in Spanish."
    )
    assert call.params.temperature == 0.25 and call.params.max_tokens == 77
    assert response.json() == {"content": "Echo 2: Property taxes."}


async def test_stream_starts_with_empty_content_and_ends_with_done(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_bot(client)
    response = await post(client, {"bot_slug": "taxson", "stream": True, "prompt": "Pay taxes?"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith('data: {"content":""}\n\n')
    payloads, _ = events(response.text)
    assert all(set(p) == {"content"} for p in payloads)
    assert [p["content"] for p in payloads] == ["", "Echo", " 1:", " Pay", " taxes?"]


async def test_bot_knowledge_base_is_used(
    client: httpx.AsyncClient, scripted: ScriptedBackend
) -> None:
    await make_kb(client, "handbook")
    await make_bot(client, kb="handbook")  # the L0 flag defaults to on with a knowledge base
    response = await post(client, {"bot_slug": "taxson", "stream": False, "prompt": QUESTION})
    assert response.status_code == 200
    system = scripted.calls[-1].messages[0].content
    assert system.startswith("You explain taxes.\n\nReference knowledge:\n\n[1] (texas-taxes.md)")
    assert ANSWER in system


async def test_list_bots(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/bots")).json() == []
    bot = await make_bot(client, description="Tax help", welcome_message="Ask me!", model="x")
    listed = (await client.get("/v1/bots")).json()
    assert listed == [
        {
            "uid": bot["uid"],
            "slug": "taxson",
            "name": "Taxson",
            "description": "Tax help",
            "model": "scripted",  # an unknown model name is served by the default
            "welcome_message": "Ask me!",
            "avatar_url": None,
        }
    ]


async def test_nothing_to_answer_is_400(client: httpx.AsyncClient) -> None:
    await make_bot(client)
    body = {"bot_slug": "taxson", "stream": False, "messages": [{"role": "system", "content": "x"}]}
    response = await post(client, body)
    assert response.status_code == 400
    assert "nothing to answer" in response.json()["detail"]
