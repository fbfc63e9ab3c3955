"""The seed's eight curl examples, run with the real `curl` against a real server and model.

The commands are the seed's (nanobot-openai-api-curl-examples.txt), adapted only to the
test server's address and, for a short and repeatable run, to small `max_tokens` at
temperature 0. Example 8 now streams instead of answering 400.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import ServerProcess

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary"),
]

SEED: dict[int, str] = {
    1: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "x-session-key: wx:dm:user_alice" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "Hello, who are you?"}
    ]
  }'""",
    2: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "x-session-key: wx:dm:user_alice" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "What did I just ask you?"}
    ]
  }'""",
    3: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "x-session-key: wx:dm:user_bob" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "What did I just ask you?"}
    ]
  }'""",
    4: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "x-session-key: wx:group:group_abc:user:user_alice" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "Summarize our discussion"}
    ]
  }'""",
    5: "curl http://localhost:8900/v1/models",
    6: "curl http://localhost:8900/health",
    7: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "hello"}
    ]
  }'""",
    8: """curl -X POST http://localhost:8900/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "x-session-key: wx:dm:user_alice" \\
  -d '{
    "model": "nanobot",
    "messages": [
      {"role": "user", "content": "hello"}
    ],
    "stream": true
  }'""",
}

EMBEDDED = "smollm2-135m-instruct"
MAX_TOKENS = 48


@dataclass
class CurlResult:
    """What curl printed with --include: status, headers, body."""

    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def run_seed(number: int, server: ServerProcess) -> CurlResult:
    """Run seed example `number` with bash and curl against `server`."""
    command = SEED[number].replace("http://localhost:8900", server.url)
    command = command.replace(
        '"model": "nanobot",',
        f'"model": "nanobot", "max_tokens": {MAX_TOKENS}, "temperature": 0,',
    )
    # --include shows the status line and headers; the rest is the seed's command.
    command = command.replace("curl ", "curl --silent --show-error --include ", 1)
    done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(int(status_line.split()[1]), headers, body.decode("utf-8"))


def session_messages(server: ServerProcess, session_key: str) -> list[dict[str, Any]]:
    """The persisted messages of the conversation bound to a session key, oldest first."""
    rows = server.rows(
        "SELECT m.conversation_id, m.role, m.content, m.token_count, m.finish_reason "
        "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE c.session_key = ? ORDER BY m.position",
        session_key,
    )
    return [dict(row) for row in rows]


def assert_completion(result: CurlResult) -> dict[str, Any]:
    """A 200 chat.completion from the embedded model with real usage; returns the body."""
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = result.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    # "nanobot" is not a configured model: the default serves and says so.
    assert body["model"] == EMBEDDED
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def test_examples_1_to_3_sessions_remember_and_stay_isolated(
    model_server: ServerProcess,
) -> None:
    first = assert_completion(run_seed(1, model_server))
    second = assert_completion(run_seed(2, model_server))
    bob = assert_completion(run_seed(3, model_server))

    alice = session_messages(model_server, "wx:dm:user_alice")
    assert [(m["role"], m["finish_reason"]) for m in alice] == [
        ("user", None),
        ("assistant", first["choices"][0]["finish_reason"]),
        ("user", None),
        ("assistant", second["choices"][0]["finish_reason"]),
    ]
    assert [m["content"] for m in alice] == [
        "Hello, who are you?",
        first["choices"][0]["message"]["content"],
        "What did I just ask you?",
        second["choices"][0]["message"]["content"],
    ]

    # Example 2: the model was given turn 1. Its prompt holds all of turn 1's prompt
    # and reply; and compared with Bob's identical question it is longer by exactly
    # turn 1's two messages and their template framing.
    assert (
        second["usage"]["prompt_tokens"]
        > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    )
    turn_one_tokens = alice[0]["token_count"] + alice[1]["token_count"]
    assert second["usage"]["prompt_tokens"] - bob["usage"]["prompt_tokens"] >= turn_one_tokens

    # Example 3: Bob's conversation is his alone and the model saw only his message:
    # his prompt differs from Alice's first prompt only by the length of the question.
    bobs = session_messages(model_server, "wx:dm:user_bob")
    assert [(m["role"], m["content"]) for m in bobs] == [
        ("user", "What did I just ask you?"),
        ("assistant", bob["choices"][0]["message"]["content"]),
    ]
    assert bobs[0]["conversation_id"] != alice[0]["conversation_id"]
    assert (
        bob["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
        == bobs[0]["token_count"] - alice[0]["token_count"]
    )


def test_example_4_group_session_is_its_own_conversation(model_server: ServerProcess) -> None:
    reply = assert_completion(run_seed(4, model_server))
    group = session_messages(model_server, "wx:group:group_abc:user:user_alice")
    assert [(m["role"], m["content"]) for m in group] == [
        ("user", "Summarize our discussion"),
        ("assistant", reply["choices"][0]["message"]["content"]),
    ]
    dm = session_messages(model_server, "wx:dm:user_alice")
    assert all(m["conversation_id"] != group[0]["conversation_id"] for m in dm)


def test_example_5_lists_models(model_server: ServerProcess) -> None:
    result = run_seed(5, model_server)
    assert result.status == 200, result.body
    body = result.json()
    assert body["object"] == "list"
    ids = [entry["id"] for entry in body["data"]]
    assert EMBEDDED in ids
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)


def test_example_6_health(model_server: ServerProcess) -> None:
    result = run_seed(6, model_server)
    assert result.status == 200, result.body
    body = result.json()
    assert body["status"] == "ok"
    assert body["ready"] is True


def test_example_7_missing_session_key_is_400(model_server: ServerProcess) -> None:
    result = run_seed(7, model_server)
    assert result.status == 400
    assert result.headers["content-type"].startswith("application/json")
    error = result.json()["error"]
    assert error["message"].startswith("Missing required header: x-session-key.")
    assert "session_id" in error["message"] and "PARLOUR_SESSIONLESS=stateless" in error["message"]
    assert result.json() == {
        "error": {
            "message": error["message"],
            "type": "invalid_request_error",
            "param": "x-session-key",
            "code": "missing_session_key",
        }
    }


def test_example_8_streams(model_server: ServerProcess) -> None:
    result = run_seed(8, model_server)
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("text/event-stream")
    events = [block for block in result.body.split("\n\n") if block.strip()]
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == EMBEDDED for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1)
    assert finishes[-1] in ("stop", "length")
    text = "".join(d.get("content") or "" for d in deltas)
    assert text.strip()
    assert len([d for d in deltas if d.get("content")]) > 1  # sent piece by piece

    stored = session_messages(model_server, "wx:dm:user_alice")
    assert stored[-2]["role"] == "user"
    assert stored[-2]["content"] == "hello"
    assert stored[-1]["role"] == "assistant"
    assert stored[-1]["content"] == text
    assert stored[-1]["finish_reason"] == finishes[-1]
