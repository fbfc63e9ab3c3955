// parlour's chat page: conversations from /conversations, replies through the Responses API
// (background responses, so a reload or a switch to another chat resumes the stream from the
// last event seen instead of losing or repeating it).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "parlour.token";
  const INFLIGHT_KEY = "parlour.inflight.";
  const PAGE = 30;
  const ENDINGS = { cancelled: "cancelled", length: "cut short at the length limit", error: "failed" };

  const state = {
    token: localStorage.getItem(TOKEN_KEY) || "",
    conversations: [],
    more: true,
    loading: false,
    current: null,
    info: null,
    messages: [],
    models: [],
    bots: [],
    streams: new Map(),
    opening: 0,
    modelChange: null,
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // ---- the server ------------------------------------------------------------------------

  function bodyMessage(status, body) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    if (body && body.error && body.error.message) return body.error.message;
    if (body && typeof body.message === "string") return body.message;
    return `The server answered ${status}.`;
  }

  function readable(status, message) {
    if (status === 401) return "That key was not accepted. Check it and sign in again.";
    if (status === 503) return `The model is not ready yet: ${message}`;
    if (status === 0) return message;
    return message;
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    const headers = {};
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      const init = { method, headers, signal };
      if (body !== undefined) init.body = JSON.stringify(body);
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "The server cannot be reached. Is parlour still running?");
    }
    if (!response.ok) {
      let data = null;
      try {
        data = await response.json();
      } catch {
        data = null;
      }
      const error = new ApiError(response.status, readable(response.status, bodyMessage(response.status, data)));
      if (response.status === 401) signedOut(error.message);
      throw error;
    }
    return response;
  }

  async function json(path, options) {
    const response = await api(path, options);
    return response.status === 204 ? null : response.json();
  }

  /** Server-Sent Events of a fetch response, as {event, data} objects. */
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  }

  // ---- errors and sign-in ----------------------------------------------------------------

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function signedOut(message) {
    const hadKey = Boolean(state.token);
    state.token = "";
    localStorage.removeItem(TOKEN_KEY);
    $("app").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = hadKey ? message : "";
    $("signin-key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    state.token = $("signin-key").value.trim();
    $("signin-error").textContent = "";
    try {
      await json("/conversations?limit=1");
    } catch (error) {
      if (error.status !== 401) $("signin-error").textContent = error.message;
      return;
    }
    localStorage.setItem(TOKEN_KEY, state.token);
    $("signin-key").value = "";
    await start();
  }

  function signOut() {
    state.token = "";
    localStorage.removeItem(TOKEN_KEY);
    location.hash = "";
    location.reload();
  }

  // ---- the sidebar -----------------------------------------------------------------------

  function iconButton(label, text, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "icon";
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.title = label;
    button.addEventListener("click", onClick);
    return button;
  }

  function renderList() {
    const list = $("conversations");
    const query = $("filter").value.trim().toLowerCase();
    list.replaceChildren();
    for (const conversation of state.conversations) {
      const title = conversation.title || "Untitled";
      if (query && !title.toLowerCase().includes(query)) continue;
      const item = document.createElement("li");
      item.className = "conversation";
      item.dataset.id = conversation.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = title;
      if (state.current && state.current.id === conversation.id) {
        item.classList.add("active");
        open.setAttribute("aria-current", "page");
      }
      open.addEventListener("click", () => openConversation(conversation.id));
      item.append(
        open,
        iconButton(`Rename ${title}`, "\u270E", () => startRename(item, conversation)),
        iconButton(`Delete ${title}`, "\u2715", () => remove(conversation)),
      );
      list.append(item);
    }
    $("conversations-end").hidden = state.more || state.conversations.length === 0;
  }

  async function loadMore() {
    if (state.loading || !state.more) return;
    state.loading = true;
    try {
      const offset = state.conversations.length;
      const page = await json(`/conversations?limit=${PAGE}&offset=${offset}`);
      const known = new Set(state.conversations.map((c) => c.id));
      state.conversations.push(...page.filter((c) => !known.has(c.id)));
      state.more = page.length === PAGE;
      renderList();
    } finally {
      state.loading = false;
    }
  }

  async function filterChanged() {
    renderList();
    while (state.more && $("conversations").children.length < PAGE) {
      const before = state.conversations.length;
      await loadMore();
      if (state.conversations.length === before) break;
    }
  }

  function startRename(item, conversation) {
    const input = document.createElement("input");
    input.value = conversation.title;
    input.maxLength = 255;
    input.setAttribute("aria-label", "New title");
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== conversation.title) {
        try {
          Object.assign(conversation, await json(`/conversations/${conversation.id}`, { method: "PATCH", body: { title } }));
        } catch (error) {
          showError(error.message);
        }
      }
      renderList();
      if (state.current && state.current.id === conversation.id) $("title").textContent = conversation.title;
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
    item.replaceChildren(input);
    input.focus();
    input.select();
  }

  async function remove(conversation) {
    if (!confirm(`Delete \u201C${conversation.title}\u201D and all its messages?`)) return;
    try {
      await json(`/conversations/${conversation.id}`, { method: "DELETE" });
    } catch (error) {
      showError(error.message);
      return;
    }
    state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
    state.streams.get(conversation.id)?.controller.abort();
    sessionStorage.removeItem(INFLIGHT_KEY + conversation.id);
    if (state.current && state.current.id === conversation.id) newChat();
    renderList();
  }

  function touch(conversation) {
    state.conversations = [conversation, ...state.conversations.filter((c) => c.id !== conversation.id)];
    renderList();
  }

  function toggleSidebar(open) {
    const show = open ?? !document.body.classList.contains("sidebar-open");
    document.body.classList.toggle("sidebar-open", show);
    $("toggle-sidebar").setAttribute("aria-expanded", String(show));
    if (show && open === undefined) $("new-chat").focus();
  }

  // ---- messages --------------------------------------------------------------------------

  function copyButton(label, text) {
    const button = iconButton(label, "Copy", async () => {
      try {
        await navigator.clipboard.writeText(text());
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    button.classList.add("text");
    return button;
  }

  function fillBody(body, role, text) {
    if (role !== "assistant") {
      body.textContent = text;
      return;
    }
    body.replaceChildren(window.renderMarkdown(text));
    for (const pre of body.querySelectorAll("pre")) {
      pre.append(copyButton("Copy code", () => pre.querySelector("code")?.textContent ?? pre.textContent));
    }
  }

  function bubble(role, text) {
    const article = document.createElement("article");
    article.className = `message ${role}`;
    article.setAttribute("aria-label", role === "user" ? "You" : role === "assistant" ? "Reply" : "System");
    const body = document.createElement("div");
    body.className = "body";
    fillBody(body, role, text);
    const footer = document.createElement("footer");
    footer.className = "meta";
    article.append(body, footer);
    $("messages").append(article);
    return article;
  }

  function contextUse(upTo) {
    const info = state.info;
    if (!info || !info.context_length) return "";
    let used = info.system_tokens;
    for (const message of state.messages.slice(0, upTo + 1)) used += message.token_count;
    const share = Math.round((100 * used) / info.context_length);
    const note = used > info.context_length ? " (the oldest messages are left out)" : "";
    return `context ${used} / ${info.context_length} tokens, ${share}%${note}`;
  }

  function describe(article, message, index) {
    const parts = [];
    const ended = state.info && state.info.unfinished[message.id];
    if (message.role === "assistant") {
      if (ended) parts.push(ENDINGS[ended] || ended);
      parts.push(`${message.token_count} tokens`);
      if (message.inference_time_ms != null) parts.push(`${(message.inference_time_ms / 1000).toFixed(1)} s`);
      parts.push(contextUse(index));
      if (message.model_tag) parts.push(message.model_tag);
    }
    const meta = article.querySelector(".meta");
    const text = document.createElement("span");
    text.textContent = parts.filter(Boolean).join(" \u00B7 ");
    meta.replaceChildren(text, copyButton("Copy message", () => message.content));
    if (ended) article.dataset.finish = ended;
  }

  function renderMessages() {
    $("messages").replaceChildren();
    state.messages.forEach((message, index) => {
      if (message.role === "system") return;
      describe(bubble(message.role, message.content), message, index);
    });
    const last = state.messages.at(-1);
    if (last && last.role === "assistant" && !state.streams.has(state.current?.id)) {
      const meta = $("messages").lastElementChild.querySelector(".meta");
      const again = iconButton("Regenerate the last reply", "Regenerate", regenerate);
      again.classList.add("text");
      meta.append(again);
    }
    // A reply still being written to this conversation goes back under its question.
    const stream = state.current && state.streams.get(state.current.id);
    if (stream) attach(stream);
    else if (!state.messages.length) welcome();
    scrollDown();
  }

  function welcome() {
    const bot = state.bots.find((b) => b.uid === $("bot").value);
    const note = document.createElement("p");
    note.className = "welcome muted";
    note.textContent = (bot && bot.welcome_message) || "Send a message to start.";
    $("messages").append(note);
  }

  function scrollDown() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  // ---- conversations ---------------------------------------------------------------------

  function setPickers() {
    const conversation = state.current;
    if (conversation && !state.models.includes(conversation.model_tag)) addModelOption(conversation.model_tag);
    if (conversation && !state.modelChange) $("model").value = conversation.model_tag;
    $("bot").disabled = Boolean(conversation);
    if (conversation) {
      const bot = state.info && state.info.bot;
      const match = state.bots.find((b) => b.name === bot);
      $("bot").value = match ? match.uid : "";
    }
    $("system").value = state.info ? state.info.system_prompt : $("system").value;
  }

  async function refresh() {
    const conversation = state.current;
    const ticket = ++state.opening;
    const [messages, info] = await Promise.all([
      json(`/conversations/${conversation.id}/messages?limit=1000`),
      json(`/ui/api/conversations/${conversation.id}`),
    ]);
    if (ticket !== state.opening) return false;
    state.messages = messages;
    state.info = info;
    renderMessages();
    setPickers();
    return true;
  }

  async function openConversation(id) {
    hideError();
    toggleSidebar(false);
    try {
      state.current = state.conversations.find((c) => c.id === id) || (await json(`/conversations/${id}`));
      if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
      $("title").textContent = state.current.title;
      renderList();
      if (!(await refresh())) return;
    } catch (error) {
      showError(error.message);
      return;
    }
    if (!state.streams.has(id)) resumeSaved(id);
    setBusy();
  }

  function newChat() {
    state.current = null;
    state.info = null;
    state.messages = [];
    history.replaceState(null, "", location.pathname);
    $("title").textContent = "New chat";
    $("system").value = "";
    $("bot").disabled = false;
    hideError();
    renderList();
    renderMessages();
    setBusy();
    $("input").focus();
  }

  async function createConversation() {
    const body = { model_tag: $("model").value, system_prompt: $("system").value.trim() || null };
    if ($("bot").value) body.bot = $("bot").value;
    const conversation = await json("/ui/api/conversations", { method: "POST", body });
    state.current = conversation;
    state.info = null;
    history.replaceState(null, "", `#${conversation.id}`);
    touch(conversation);
    return conversation;
  }

  async function saveSystemPrompt() {
    const text = $("system").value.trim();
    if (!state.current) {
      $("system-status").textContent = "Used when you send the first message.";
      return;
    }
    try {
      state.info = await json(`/ui/api/conversations/${state.current.id}/system-prompt`, {
        method: "PUT",
        body: { system_prompt: text },
      });
      $("system-status").textContent = "Saved.";
      renderMessages();
    } catch (error) {
      showError(error.message);
    }
  }

  async function switchModel(id, model_tag) {
    try {
      const updated = await json(`/conversations/${id}`, { method: "PATCH", body: { model_tag } });
      if (state.current && state.current.id === id) state.current = updated;
      touch(updated);
    } catch (error) {
      showError(error.message);
    }
  }

  /** Switch the open conversation's model; a message sent meanwhile waits for it. */
  async function modelChanged() {
    if (!state.current) return;
    const change = switchModel(state.current.id, $("model").value);
    state.modelChange = change;
    await change;
    if (state.modelChange === change) state.modelChange = null;
    if (state.current) await refresh();
  }

  function botChanged() {
    const bot = state.bots.find((b) => b.uid === $("bot").value);
    if (bot && bot.model) {
      if (!state.models.includes(bot.model)) addModelOption(bot.model);
      $("model").value = bot.model;
    }
    if (!state.current) renderMessages();
  }

  function addModelOption(name) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("model").append(option);
    state.models.push(name);
  }

  // ---- replies ---------------------------------------------------------------------------

  function setBusy() {
    const busy = Boolean(state.current && state.streams.has(state.current.id));
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  function attach(stream) {
    stream.article = bubble("assistant", stream.text);
    stream.article.classList.add("streaming");
    stream.article.setAttribute("aria-busy", "true");
    scrollDown();
  }

  function paint(stream) {
    if (stream.painting) return;
    stream.painting = true;
    requestAnimationFrame(() => {
      stream.painting = false;
      if (!stream.article || !stream.article.isConnected) return;
      fillBody(stream.article.querySelector(".body"), "assistant", stream.text);
      scrollDown();
    });
  }

  function begin(conversationId, saved = {}) {
    const stream = {
      conversationId,
      text: saved.text || "",
      responseId: saved.id || null,
      seq: saved.seq ?? -1,
      controller: new AbortController(),
      error: null,
      article: null,
    };
    state.streams.set(conversationId, stream);
    if (state.current && state.current.id === conversationId) attach(stream);
    setBusy();
    return stream;
  }

  function remember(stream) {
    const record = { id: stream.responseId, seq: stream.seq, text: stream.text };
    sessionStorage.setItem(INFLIGHT_KEY + stream.conversationId, JSON.stringify(record));
  }

  async function finish(stream) {
    state.streams.delete(stream.conversationId);
    sessionStorage.removeItem(INFLIGHT_KEY + stream.conversationId);
    if (!state.current || state.current.id !== stream.conversationId) return;
    setBusy();
    if (stream.error) showError(stream.error);
    try {
      state.current = await json(`/conversations/${stream.conversationId}`);
      $("title").textContent = state.current.title;
      touch(state.current);
      await refresh();
    } catch (error) {
      showError(error.message);
    }
  }

  async function run(stream, work) {
    try {
      await work();
    } catch (error) {
      if (error.name !== "AbortError") stream.error = error.message;
    } finally {
      await finish(stream);
    }
  }

  function conversationRef(id) {
    return `conv_${id.replaceAll("-", "")}`;
  }

  async function readResponses(stream, response) {
    for await (const { data } of events(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (typeof event.sequence_number === "number") {
        if (event.sequence_number <= stream.seq) continue;
        stream.seq = event.sequence_number;
      }
      if (event.response && event.response.id && !stream.responseId) {
        stream.responseId = event.response.id;
        if (stream.stopRequested) cancel(stream);
      }
      if (event.type === "response.output_text.delta") {
        stream.text += event.delta;
        paint(stream);
      } else if (event.type === "error") {
        stream.error = event.message || (event.error && event.error.message) || "The reply failed.";
      } else if (event.type === "response.failed") {
        const failure = event.response && event.response.error;
        stream.error = (failure && failure.message) || "The reply failed.";
      }
      remember(stream);
    }
  }

  function sendThroughResponses(stream, text, model) {
    const body = {
      model,
      input: text,
      conversation: conversationRef(stream.conversationId),
      stream: true,
      background: true,
    };
    return run(stream, async () => {
      const response = await api("/v1/responses", { method: "POST", body, signal: stream.controller.signal });
      await readResponses(stream, response);
    });
  }

  function resumeSaved(conversationId) {
    const raw = sessionStorage.getItem(INFLIGHT_KEY + conversationId);
    if (!raw) return;
    const saved = JSON.parse(raw);
    if (!saved.id) {
      sessionStorage.removeItem(INFLIGHT_KEY + conversationId);
      return;
    }
    const stream = begin(conversationId, saved);
    paint(stream);
    const path = `/v1/responses/${encodeURIComponent(saved.id)}?stream=true&starting_after=${stream.seq}`;
    run(stream, async () => {
      const response = await api(path, { signal: stream.controller.signal });
      await readResponses(stream, response);
    });
  }

  async function send(text) {
    hideError();
    if (!text.trim()) return;
    await state.modelChange;
    let conversation = state.current;
    try {
      if (!conversation) conversation = await createConversation();
    } catch (error) {
      showError(error.message);
      return;
    }
    if (state.streams.has(conversation.id)) return;
    $("messages").querySelector(".welcome")?.remove();
    bubble("user", text);
    const stream = begin(conversation.id);
    await sendThroughResponses(stream, text, conversation.model_tag);
  }

  async function cancel(stream) {
    try {
      await json(`/v1/responses/${encodeURIComponent(stream.responseId)}/cancel`, { method: "POST", body: {} });
    } catch (error) {
      showError(error.message);
    }
  }

  /** Stop the open conversation's reply; the server keeps its partial text as cancelled. */
  function stop() {
    const stream = state.current && state.streams.get(state.current.id);
    if (!stream) return;
    // Before the response has an id, cancel it as soon as it gets one.
    if (stream.responseId) cancel(stream);
    else stream.stopRequested = true;
  }

  function regenerate() {
    const last = [...state.messages].reverse().find((m) => m.role === "user");
    if (last) send(last.content);
  }

  // ---- start -----------------------------------------------------------------------------

  async function loadPickers() {
    const [models, bots] = await Promise.all([json("/v1/models"), json("/v1/bots").catch(() => [])]);
    state.models = [];
    $("model").replaceChildren();
    for (const model of models.data) addModelOption(model.id);
    state.bots = bots;
    $("bot").replaceChildren(new Option("None", ""));
    for (const bot of bots) $("bot").append(new Option(bot.name, bot.uid));
  }

  async function start() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = !state.token;
    try {
      await loadPickers();
      state.conversations = [];
      state.more = true;
      await loadMore();
    } catch (error) {
      if (error.status !== 401) showError(error.message);
      return;
    }
    const id = location.hash.slice(1);
    if (id) await openConversation(id);
    else newChat();
    document.body.dataset.ready = "true";
  }

  function bind() {
    $("signin-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("new-chat").addEventListener("click", newChat);
    $("filter").addEventListener("input", filterChanged);
    $("conversations").addEventListener("scroll", (event) => {
      const list = event.target;
      if (list.scrollTop + list.clientHeight >= list.scrollHeight - 40) loadMore();
    });
    $("toggle-sidebar").addEventListener("click", () => toggleSidebar());
    $("system-toggle").addEventListener("click", () => {
      const panel = $("system-panel");
      panel.hidden = !panel.hidden;
      $("system-toggle").setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) $("system").focus();
    });
    $("system-save").addEventListener("click", saveSystemPrompt);
    $("model").addEventListener("change", modelChanged);
    $("bot").addEventListener("change", botChanged);
    $("stop").addEventListener("click", stop);
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("input").value;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") toggleSidebar(false);
    });
    window.addEventListener("hashchange", () => {
      const id = location.hash.slice(1);
      if (id && (!state.current || state.current.id !== id)) openConversation(id);
    });
  }

  async function boot() {
    bind();
    try {
      await json("/conversations?limit=1");
    } catch (error) {
      if (error.status === 401) return;
      $("app").hidden = false;
      showError(error.message);
      return;
    }
    await start();
  }

  window.addEventListener("DOMContentLoaded", boot);
})();
