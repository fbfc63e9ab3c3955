"""Second Me's kernel2 and the Bot API against a real server with the embedded model.

The kernel2 client is the Second Me documentation's Python `http.client` example, run
verbatim except for the host and port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.model

# From "Local Chat API.md", Python Request Example; only `url` is changed (by format()).
SEED_CLIENT = """import json
import http.client

url = "{host_port}"
path = "/api/kernel2/chat"
headers = {{
    "Content-Type": "application/json",
    "Accept": "text/event-stream"
}}
data = {{
    "messages": [
        {{"role": "system", "content": "You are a helpful assistant."}},
        {{"role": "user", "content": "Tell me about artificial intelligence."}}
    ],
    "stream": True
}}

conn = http.client.HTTPConnection(url)

conn.request("POST", path, body=json.dumps(data), headers=headers)

response = conn.getresponse()

for line in response:
    if line:
        decoded_line = line.decode('utf-8').strip()
        if decoded_line == 'data: [DONE]':
            break
        if decoded_line.startswith('data: '):
            try:
                json_str = decoded_line[6:]
                chunk = json.loads(json_str)
                content = chunk['choices'][0]['delta'].get('content', '')
                if content:
                    print(content, end='', flush=True)
            except json.JSONDecodeError:
                pass

conn.close()
"""


def test_seed_python_client_prints_the_stream(model_server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "seed_client.py"
    script.write_text(SEED_CLIENT.format(host_port=model_server.url.removeprefix("http://")))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    printed = done.stdout
    assert len(printed.split()) >= 5, printed  # real text from the model
    assert "data:" not in printed and "heartbeat" not in printed
    rows = model_server.rows(
        "SELECT dialect, model, completion_tokens FROM usage WHERE dialect = 'kernel2'"
    )
    assert rows and rows[-1]["model"] == "smollm2-135m-instruct"
    assert rows[-1]["completion_tokens"] > 0


def test_bot_api_with_the_embedded_model(model_server: ServerProcess) -> None:
    base = model_server.url
    with httpx.Client(base_url=base, timeout=300) as client:
        created = client.post(
            "/admin/bots",
            json={
                "slug": "poet",
                "name": "Poet",
                "system_prompt": "You write one short, cheerful sentence.",
                "max_tokens": 48,
                "temperature": 0,
            },
        )
        assert created.status_code == 201, created.text
        answer = client.post(
            "/v1/chat",
            json={"bot_slug": "poet", "prompt": "Say hello.", "stream": False, "user_id": "u1"},
        )
        assert answer.status_code == 200, answer.text
        assert list(answer.json()) == ["content"] and answer.json()["content"].strip()

        with client.stream(
            "POST",
            "/chat",
            json={"bot_uid": created.json()["uid"], "prompt": "Say hello.", "stream": True},
        ) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == 'data: {"content":""}' and lines[-1] == "data: [DONE]"
        pieces = [json.loads(line.removeprefix("data: "))["content"] for line in lines[1:-1]]
        assert "".join(pieces).strip()

        usage = client.get("/v1/usage", params={"bot": "poet"}).json()
        assert usage["totals"]["requests"] == 2
        assert {r["user_id"] for r in usage["data"]} == {"u1", None}
        assert all(r["completion_tokens"] <= 48 for r in usage["data"])
