"""The chat page at `/` in a real browser, against a real `parlour serve` process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, expect

from tests.conftest import ServerProcess, fresh_database, server_env, start_server
from tests.support.browser import chromium, offline, screenshot

pytestmark = pytest.mark.browser

#: Scripted models: `scripted` answers at once, `slow` writes a word every 50 ms; and one
#: that never loads.
CONFIG = """
default = "scripted"

[[models]]
name = "scripted"
backend = "scripted"
context_length = 2048

[[models]]
name = "slow"
backend = "scripted"
context_length = 2048
token_delay = 0.05

# A model whose file is missing: it never loads.
[[models]]
name = "broken"
backend = "llama"
path = "/nonexistent/model.gguf"
"""
LONG = " ".join(f"w{i}" for i in range(400))
TIMEOUT = 30_000
expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the module."""
    with chromium() as found:
        yield found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the two scripted models and no auth."""
    root = tmp_path_factory.mktemp("web")
    config = root / "models.toml"
    config.write_text(CONFIG)
    with fresh_database() as url:
        process = start_server(root / "data", "--config", str(config), env=server_env(url))
        yield process
        process.stop()


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    """A fresh browser context (no stored key, no session storage) on the server's page."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT)
    tab = context.new_page()
    offline(tab)
    yield tab
    context.close()


def open_page(page: Page, url: str) -> None:
    """Load the page and wait until it has loaded its conversations."""
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def send(page: Page, text: str) -> None:
    """Type a message and press Enter."""
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def last_reply(page: Page) -> str:
    """The text of the last assistant message on the page."""
    return page.locator("article.message.assistant .body").last.inner_text()


def conversation_id(page: Page) -> str:
    """The open conversation's id, from the page's address."""
    return page.url.split("#", 1)[1]


def test_send_stream_reload_history(page: Page, server: ServerProcess) -> None:
    open_page(page, server.url + "/")
    page.get_by_label("Model").select_option("slow")
    send(page, "Hello there " + " ".join(f"t{i}" for i in range(40)))
    # The reply is on the page while it is still being written, then finishes.
    streaming = page.locator("article.message.assistant.streaming .body")
    expect(streaming).to_contain_text("Echo 1: Hello there")
    expect(page.locator("article.message.assistant.streaming")).to_have_count(0)
    expect(page.locator("article.message.assistant .body").last).to_contain_text("t39")
    meta = page.locator("article.message.assistant .meta").last
    expect(meta).to_contain_text("tokens")
    expect(meta).to_contain_text("/ 2048 tokens")
    screenshot(page, "chat-desktop")

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("article.message.user .body")).to_have_count(1)
    expect(page.locator("article.message.user .body")).to_contain_text("Hello there t0")
    expect(page.locator("article.message.assistant .body")).to_have_count(1)
    expect(page.locator("article.message.assistant .body")).to_contain_text("t39")
    expect(page.locator("#conversations li.active")).to_contain_text("Hello there")

    page.set_viewport_size({"width": 375, "height": 740})
    expect(page.get_by_role("button", name="Show conversations")).to_be_visible()
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    screenshot(page, "chat-375px")
    page.get_by_role("button", name="Show conversations").click()
    expect(page.get_by_role("button", name="New chat")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()


def test_markdown_renders_and_html_in_replies_stays_text(page: Page, server: ServerProcess) -> None:
    dialogs: list[str] = []
    requests: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("request", lambda request: requests.append(request.url))
    open_page(page, server.url + "/")
    attack = (
        "**bold** and `code` <img src=x onerror=alert(1)> <script>alert(2)</script> "
        '<a href="javascript:alert(3)">link</a> ![pic](http://example.com/p.png)'
    )
    send(page, attack)
    reply = page.locator("article.message.assistant .body").last
    expect(reply).to_contain_text("<img src=x onerror=alert(1)>")
    expect(reply).to_contain_text("<script>alert(2)</script>")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("code")).to_have_text("code")
    messages = page.locator("#messages")
    assert messages.locator("img, script, iframe, [onerror]").count() == 0
    assert messages.locator("a[href^='javascript']").count() == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("article.message.assistant .body").last).to_contain_text("<script>")
    assert dialogs == []
    assert not [u for u in requests if u.rstrip("/").endswith("/x") or "example.com" in u]


def test_stop_keeps_the_partial_reply_as_cancelled(page: Page, server: ServerProcess) -> None:
    open_page(page, server.url + "/")
    page.get_by_label("Model").select_option("slow")
    send(page, LONG)
    expect(page.locator("article.message.assistant.streaming .body")).to_contain_text("w5")
    page.get_by_role("button", name="Stop").click()
    stopped = page.locator("article.message.assistant[data-finish=cancelled]")
    expect(stopped).to_have_count(1)
    expect(stopped.locator(".meta")).to_contain_text("cancelled")
    expect(page.get_by_role("button", name="Send")).to_be_visible()

    conversation = conversation_id(page)
    rows = server.rows(
        "SELECT content, finish_reason FROM messages WHERE role = 'assistant' "
        "AND conversation_id = ?",
        conversation if server.database_url else conversation.replace("-", ""),
    )
    assert len(rows) == 1
    assert rows[0]["finish_reason"] == "cancelled"
    partial = rows[0]["content"]
    full = f"Echo 1: {LONG}"
    assert partial and full.startswith(partial) and len(partial) < len(full)
    expect(stopped.locator(".body")).to_have_text(partial)


def test_reload_and_switch_mid_reply_finish_it_exactly_once(
    page: Page, server: ServerProcess
) -> None:
    resumed: list[str] = []
    page.on("request", lambda request: resumed.append(request.url))
    open_page(page, server.url + "/")
    page.get_by_label("Model").select_option("slow")
    words = " ".join(f"r{i}" for i in range(300))
    send(page, words)
    streaming = page.locator("article.message.assistant.streaming .body")
    expect(streaming).to_contain_text("r3")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    # The page picks the stream up after the last event it had seen, with the text so far.
    expect(streaming).to_contain_text("Echo 1: r0 r1 r2 r3")
    after = [u for u in resumed if "starting_after=" in u]
    assert after and int(after[-1].rsplit("=", 1)[1]) > 0
    # Away to a new chat and back while it is still being written.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("article.message")).to_have_count(0)
    page.locator("#conversations .open").first.click()
    expect(page.locator("article.message.assistant.streaming")).to_have_count(1)
    expect(page.locator("article.message.assistant.streaming")).to_have_count(0)
    reply = page.locator("article.message.assistant .body")
    expect(reply).to_have_count(1)
    expect(reply).to_have_text(f"Echo 1: {words}")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(reply).to_have_count(1)
    expect(reply).to_have_text(f"Echo 1: {words}")
    rows = server.rows("SELECT content FROM messages WHERE role = 'assistant'")
    assert [r["content"] for r in rows].count(f"Echo 1: {words}") == 1


def test_sidebar_filter_rename_delete(page: Page, server: ServerProcess) -> None:
    for title in ("Apples to try", "Bread recipes", "Apple pie"):
        r = httpx.post(
            server.url + "/conversations", json={"title": title, "model_tag": "scripted"}
        )
        assert r.status_code == 201, r.text
    open_page(page, server.url + "/")
    items = page.locator("#conversations .open")
    expect(items.first).to_have_text("Apple pie")  # most recent first
    page.get_by_label("Filter conversations by title").fill("apple")
    expect(items).to_have_count(2)
    page.get_by_label("Filter conversations by title").fill("")

    page.get_by_role("button", name="Rename Bread recipes").click()
    page.get_by_label("New title").fill("Sourdough")
    page.get_by_label("New title").press("Enter")
    expect(page.locator("#conversations .open", has_text="Sourdough")).to_have_count(1)

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete Apples to try").click()
    expect(page.locator("#conversations .open", has_text="Apples to try")).to_have_count(0)

    titles = [c["title"] for c in httpx.get(server.url + "/conversations").json()]
    assert "Sourdough" in titles and "Bread recipes" not in titles
    assert "Apples to try" not in titles


def test_sidebar_loads_more_on_scroll(page: Page, server: ServerProcess) -> None:
    for n in range(35):
        r = httpx.post(
            server.url + "/conversations", json={"title": f"Chat {n}", "model_tag": "scripted"}
        )
        assert r.status_code == 201, r.text
    total = len(httpx.get(server.url + "/conversations?limit=200").json())
    open_page(page, server.url + "/")
    items = page.locator("#conversations .open")
    expect(items).to_have_count(30)
    expect(items.first).to_have_text("Chat 34")
    while items.count() < total:
        items.last.scroll_into_view_if_needed()
        page.locator("#conversations").evaluate("list => list.scrollBy(0, list.scrollHeight)")
        expect(items).not_to_have_count(30)
    expect(items).to_have_count(total)
    expect(page.locator("#conversations-end")).to_be_visible()


def test_system_prompt_and_errors_are_shown(page: Page, server: ServerProcess) -> None:
    open_page(page, server.url + "/")
    page.get_by_role("button", name="System prompt").click()
    page.get_by_label("System prompt for this conversation").fill("Answer briefly.")
    send(page, "hi")
    expect(page.locator("article.message.assistant .body")).to_contain_text("Echo 1: hi")
    conversation = conversation_id(page)
    state = httpx.get(f"{server.url}/ui/api/conversations/{conversation}").json()
    assert state["system_prompt"] == "Answer briefly."
    # A message longer than the model's whole window: a readable error, not silence.
    send(page, " ".join(["word"] * 2100))
    expect(page.get_by_role("alert")).to_contain_text("context")
    # A model that is not loaded: the page says so.
    page.get_by_label("Model").select_option("broken")
    send(page, "are you there?")
    expect(page.get_by_role("alert")).to_contain_text("not loaded")


def test_keyboard_regenerate_copy_model_and_dark_mode(
    browser: Browser, server: ServerProcess
) -> None:
    context = browser.new_context(color_scheme="dark", viewport={"width": 1000, "height": 700})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    context.set_default_timeout(TIMEOUT)
    try:
        page = context.new_page()
        offline(page)
        open_page(page, server.url + "/")
        box = page.get_by_label("Message", exact=True)
        box.fill("line one")
        box.press("Shift+Enter")
        box.press_sequentially("line two")
        expect(page.locator("article.message")).to_have_count(0)
        box.press("Enter")
        replies = page.locator("article.message.assistant .body")
        expect(replies).to_have_text(["Echo 1: line one\nline two"], use_inner_text=True)
        page.get_by_role("button", name="Regenerate the last reply").click()
        expect(replies).to_have_count(2)
        expect(replies.last).to_contain_text("Echo 2: line one")
        expect(page.locator("article.message.assistant.streaming")).to_have_count(0)
        expect(page.get_by_role("button", name="Copy message")).to_have_count(4)
        page.get_by_role("button", name="Copy message").last.click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied == "Echo 2: line one\nline two"
        box.fill("code:\n```\nprint(1)\n```")
        box.press("Enter")
        expect(page.locator("article.message.assistant pre code")).to_have_text("print(1)\n")
        expect(page.get_by_role("button", name="Copy message")).to_have_count(6)
        page.get_by_role("button", name="Copy code").click()
        expect(page.get_by_role("button", name="Copy code")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == "print(1)\n"

        page.get_by_label("Model").select_option("slow")
        conversation = conversation_id(page)
        expect(page.get_by_label("Model")).to_have_value("slow")
        r = httpx.get(f"{server.url}/conversations/{conversation}")
        assert r.json()["model_tag"] == "slow"

        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 24, 28)"
        screenshot(page, "chat-dark")
    finally:
        context.close()


def test_new_chat_with_a_bot(page: Page, server: ServerProcess) -> None:
    args = ["bot", "add", "--slug", "pirate", "--name", "Pirate", "--system-prompt", "Arr."]
    args += ["--welcome-message", "Ahoy, matey!", "--data-dir", str(server.data_dir)]
    subprocess.run(
        [sys.executable, "-m", "parlour", *args],
        check=True,
        capture_output=True,
        env={**server.env, "PATH": "/usr/bin:/bin"},
    )
    open_page(page, server.url + "/")
    page.get_by_label("Bot").select_option(label="Pirate")
    expect(page.locator(".welcome")).to_have_text("Ahoy, matey!")
    send(page, "hello")
    expect(page.locator("article.message.assistant .body")).to_contain_text("Echo 1: hello")
    expect(page.get_by_label("Bot")).to_be_disabled()
    state = httpx.get(f"{server.url}/ui/api/conversations/{conversation_id(page)}").json()
    assert state["bot"] == "Pirate"


def test_every_control_has_a_name_and_the_keyboard_reaches_the_message_box(
    page: Page, server: ServerProcess
) -> None:
    open_page(page, server.url + "/")
    send(page, "named")
    expect(page.locator("article.message.assistant .meta")).to_contain_text("tokens")
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, textarea, a')]
            .filter((e) => e.offsetParent !== null)
            .filter((e) => !(e.getAttribute('aria-label') || (e.labels && e.labels.length)
                || e.textContent.trim()))
            .map((e) => e.outerHTML)"""
    )
    assert unnamed == []
    page.get_by_role("button", name="New chat").focus()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Filter conversations by title")).to_be_focused()
    page.get_by_role("button", name="System prompt").focus()
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "input":
            break
    expect(page.get_by_label("Message", exact=True)).to_be_focused()


def test_docs_render_offline(page: Page, server: ServerProcess) -> None:
    refused = offline(page)
    page.goto(server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("parlour")
    expect(page.locator(".opblock-summary-path", has_text="/conversations").first).to_be_visible()
    screenshot(page, "docs")
    assert refused == []
    assert httpx.get(server.url + "/redoc").status_code == 404


def test_sign_in_with_an_api_key(browser: Browser, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with fresh_database() as url:
        env = server_env(url)
        args = ["key", "create", "--owner", "alice", "--data-dir", str(data)]
        created = subprocess.run(
            [sys.executable, "-m", "parlour", *args],
            capture_output=True,
            text=True,
            check=True,
            env={**env, "PATH": "/usr/bin:/bin"},
        )
        key = created.stdout.strip().split()[-1]
        server = start_server(data, "--model", "scripted", env=env)
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT)
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            field = page.get_by_label("API key or token")
            field.fill(key + "x")
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#signin-error")).to_contain_text("not accepted")
            field.fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_selector("body[data-ready=true]")
            send(page, "signed in")
            expect(page.locator("article.message.assistant .body")).to_contain_text("Echo 1")
            page.reload()
            page.wait_for_selector("body[data-ready=true]")
            expect(page.get_by_role("button", name="Sign out")).to_be_visible()
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_label("API key or token")).to_be_visible()
        finally:
            context.close()
            server.stop()


@pytest.mark.model
def test_a_real_model_answers_on_the_page(browser: Browser, model_server: ServerProcess) -> None:
    context = browser.new_context()
    context.set_default_timeout(120_000)
    try:
        page = context.new_page()
        offline(page)
        open_page(page, model_server.url + "/")
        send(page, "What is the capital of France?")
        meta = page.locator("article.message.assistant .meta")
        expect(meta).to_contain_text("tokens")
        assert last_reply(page).strip()
    finally:
        context.close()
