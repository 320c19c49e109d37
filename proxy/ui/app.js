// chatproxy session browser. Plain JavaScript, no dependency, served from this origin only.
// Every piece of text from the server goes into the page through textContent, never as HTML.
// The key lives in this tab's sessionStorage and travels only in the Authorization header.
"use strict";

const KEY = "chatproxy.key";
const API = "/v1/chat";
const PAGE = 30;        // sessions or search hits per page
const MESSAGES = 100;   // messages per transcript page

const $ = (id) => document.getElementById(id);
const state = {
  key: null,
  query: "",
  cursor: null,          // next page of the list or of the search
  session: null,         // the open session object
  oldest: null,          // seq of the oldest message shown (for "Load earlier")
  calls: new Map(),      // tool call id -> its element, to put tool results under their call
  confirm: null,
  sending: false,
  searchTimer: 0,
};

// --- DOM helpers -----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString([], {dateStyle: "medium", timeStyle: "short"});
}

function short(iso) {
  // Today: the time; this year: the day; else the date.
  if (!iso) return "";
  const date = new Date(iso);
  if (isNaN(date)) return iso;
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], {timeStyle: "short"});
  }
  const options = date.getFullYear() === now.getFullYear()
    ? {month: "short", day: "numeric"} : {dateStyle: "medium"};
  return date.toLocaleDateString([], options);
}

let toastTimer = 0;
function toast(message, bad = false) {
  const node = $("toast");
  node.textContent = message;
  node.classList.toggle("bad", bad);
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.hidden = true; }, bad ? 6000 : 2500);
}

// --- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {Authorization: "Bearer " + state.key};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
  });
  if (response.status === 401) { signOut("That key is not valid (any more)."); }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message || message; } catch (e) { /* no body */ }
    throw new ApiError(response.status, message);
  }
  return response.status === 204 ? null : response.json();
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) return;
  toast(error.message || String(error), true);
}

// --- signing in and out ------------------------------------------------------------------------

async function signIn(key) {
  state.key = key;
  await api("GET", API + "/sessions?limit=1");  // throws for a bad key
  sessionStorage.setItem(KEY, key);
  $("who-key").textContent = key.slice(0, 10) + "…";
  $("signed-out").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  await loadList(true);
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  state.key = null;
  state.session = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("signed-out").hidden = false;
  $("list").replaceChildren();
  $("messages").replaceChildren();
  $("key").value = "";
  const error = $("sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
}

// --- the list: sessions, or search results -------------------------------------------------------

async function loadList(fresh) {
  const list = $("list");
  if (fresh) { state.cursor = null; }
  const after = state.cursor ? "&after=" + encodeURIComponent(state.cursor) : "";
  try {
    if (state.query) {
      const q = encodeURIComponent(state.query);
      const [sessions, hits] = await Promise.all([
        fresh ? api("GET", `${API}/sessions?limit=5&q=${q}`) : null,
        api("GET", `${API}/search?limit=${PAGE}&q=${q}${after}`),
      ]);
      if (fresh) {
        list.replaceChildren();
        if (sessions.data.length) {
          list.append(el("div", "group", "Sessions"));
          sessions.data.forEach((s) => list.append(sessionItem(s)));
        }
        list.append(el("div", "group", "Messages"));
      }
      hits.data.forEach((hit) => list.append(hitItem(hit)));
      if (fresh && !hits.data.length) list.append(el("div", "none", "No message matches."));
      state.cursor = hits.next_cursor;
    } else {
      const deleted = $("show-deleted").checked ? "&include_inactive=true" : "";
      const page = await api("GET", `${API}/sessions?limit=${PAGE}${deleted}${after}`);
      if (fresh) list.replaceChildren();
      page.data.forEach((s) => list.append(sessionItem(s)));
      if (fresh && !page.data.length) list.append(el("div", "none", "No sessions yet."));
      state.cursor = page.next_cursor;
    }
    $("more").hidden = !state.cursor;
    markActive();
  } catch (error) { fail(error); }
}

function sessionItem(s) {
  const item = el("button", "item");
  item.type = "button";
  item.dataset.session = s.id;
  const row = el("div", "row");
  const name = el("span", "name", s.session_name || "Untitled session");
  row.append(name, el("span", "when", short(s.last_message_at || s.created_at)));
  const meta = el("div", "meta");
  if (!s.is_active) meta.append(el("span", "badge deleted", "deleted"));
  if (s.model) meta.append(el("span", "", s.model));
  meta.append(el("span", "", s.message_count + (s.message_count === 1 ? " message" : " messages")));
  item.append(row, meta);
  item.addEventListener("click", () => openSession(s.id, s));
  return item;
}

function hitItem(hit) {
  const item = el("button", "item hit");
  item.type = "button";
  item.dataset.session = hit.session_id;
  const row = el("div", "row");
  row.append(el("span", "name", hit.session_name || "Untitled session"),
             el("span", "when", short(hit.created_at)));
  const meta = el("div", "meta");
  meta.append(el("span", "role", hit.role), el("span", "", "#" + hit.seq));
  item.append(row, el("div", "snippet", hit.snippet), meta);
  item.addEventListener("click", () => openSession(hit.session_id, null, hit.seq));
  return item;
}

function markActive() {
  const open = state.session && state.session.id;
  document.querySelectorAll(".item").forEach((item) => {
    item.classList.toggle("active", item.dataset.session === open);
  });
}

// --- one session ---------------------------------------------------------------------------

async function openSession(id, known, seq) {
  hideConfirm();
  $("rename-form").hidden = true;
  if (known && !known.is_active) { showDeleted(known); return; }
  try {
    state.session = await api("GET", `${API}/sessions/${id}`);
  } catch (error) { fail(error); return; }
  $("empty").hidden = true;
  $("session").hidden = false;
  showHead();
  await loadMessages(seq);
  markActive();
}

function showDeleted(s) {
  state.session = s;
  $("empty").hidden = true;
  $("session").hidden = false;
  showHead();
  $("messages").replaceChildren(el("li", "none", "This session is deleted. Restore it to read it."));
  $("earlier").hidden = true;
  markActive();
}

function showHead() {
  const s = state.session;
  $("title").textContent = s.session_name || "Untitled session";
  $("title").hidden = false;
  const facts = $("facts");
  facts.replaceChildren(
    el("span", "", s.model ? "model " + s.model : "no model set"),
    el("span", "", s.message_count + (s.message_count === 1 ? " message" : " messages")),
    el("span", "", s.total_tokens + " tokens"),
    el("span", "", "last activity " + when(s.last_message_at || s.created_at)),
  );
  const active = s.is_active;
  for (const id of ["rename", "fork", "export", "clear", "delete"]) $(id).hidden = !active;
  $("restore").hidden = active;
  $("composer").hidden = !active;
  $("model").hidden = !!s.model;
}

async function loadMessages(focusSeq) {
  const s = state.session;
  const list = $("messages");
  list.replaceChildren();
  state.calls = new Map();
  state.oldest = null;
  await loadEarlier(focusSeq);
  const box = $("transcript");
  const target = focusSeq && list.querySelector(`[data-seq="${Number(focusSeq)}"]`);
  if (target) {
    target.classList.add("highlight");
    target.scrollIntoView({block: "center"});
  } else {
    box.scrollTop = box.scrollHeight;
  }
  if (!s.message_count && !list.children.length) {
    list.append(el("li", "none", "No messages yet. Say something below."));
  }
}

async function loadEarlier(focusSeq) {
  // Pages walk back by seq (a keyset: as fast at the start of a long session as at its end).
  const s = state.session;
  const earlier = state.oldest !== null;
  const before = "&before_seq=" + (earlier ? state.oldest : "9223372036854775807");
  let page;
  try {
    page = await api("GET", `${API}/sessions/${s.id}/messages?limit=${MESSAGES}${before}`);
    // A search hit older than the newest page: keep loading until it is on the page.
    while (focusSeq && page.has_more && page.data.length &&
           page.data[page.data.length - 1].seq > focusSeq) {
      const more = await api("GET", `${API}/sessions/${s.id}/messages?limit=${MESSAGES}` +
                                    `&before_seq=${page.data[page.data.length - 1].seq}`);
      page = {data: page.data.concat(more.data), has_more: more.has_more};
    }
  } catch (error) { fail(error); return; }
  const ascending = page.data.slice().reverse();
  const list = $("messages");
  const box = $("transcript");
  const height = box.scrollHeight;
  const fragment = document.createDocumentFragment();
  const calls = state.calls;
  for (const m of ascending) {
    const node = renderMessage(m, calls);
    if (node) fragment.append(node);
  }
  list.prepend(fragment);
  if (ascending.length) state.oldest = ascending[0].seq;
  $("earlier").hidden = !page.has_more;
  if (earlier) box.scrollTop += box.scrollHeight - height;  // keep what was on screen in place
}

function renderMessage(m, calls) {
  // A tool result goes under the call that asked for it, when that call is on the page.
  if (m.role === "tool" && m.tool_call_id && calls.has(m.tool_call_id)) {
    const result = el("div", "result");
    result.dataset.seq = m.seq;
    const head = el("div", "result-head", "result · " + m.tokens + " tokens · " + when(m.created_at));
    const pre = el("pre", "", textOf(m.content));
    result.append(head, pre);
    calls.get(m.tool_call_id).append(result);
    return null;
  }
  const item = el("li", "msg " + m.role);
  item.dataset.seq = m.seq;
  const head = el("div", "msg-head");
  head.append(el("span", "role", m.role));
  if (m.name) head.append(el("span", "", m.name));
  if (m.status === "incomplete") head.append(el("span", "badge incomplete", "incomplete"));
  head.append(el("span", "", when(m.created_at)), el("span", "", m.tokens + " tokens"),
              el("span", "", "#" + m.seq), el("span", "spacer"));
  if (state.session && state.session.is_active) {
    const fork = el("button", "ghost small fork-here", "Fork from here");
    fork.type = "button";
    fork.addEventListener("click", () => forkAt(m.seq));
    head.append(fork);
  }
  item.append(head);
  const text = textOf(m.content);
  if (text) item.append(el("div", "text", text));
  if (m.refusal) item.append(el("div", "text muted", "Refused: " + m.refusal));
  for (const call of m.tool_calls || []) {
    const box = el("div", "call");
    const fn = call.function || {};
    const callHead = el("div", "call-head");
    callHead.append("tool call ", el("span", "fn", fn.name || "?"));
    box.append(callHead, el("pre", "", prettyArguments(fn.arguments)));
    if (call.id) calls.set(call.id, box);
    item.append(box);
  }
  return item;
}

function textOf(content) {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => {
      if (part && typeof part.text === "string") return part.text;
      if (part && part.type) return "[" + part.type + "]";
      return "";
    }).filter(Boolean).join("\n");
  }
  return JSON.stringify(content);
}

function prettyArguments(raw) {
  if (typeof raw !== "string") return JSON.stringify(raw);
  try { return JSON.stringify(JSON.parse(raw), null, 2); } catch (e) { return raw; }
}

// --- actions -------------------------------------------------------------------------------

function ask(text, action) {
  state.confirm = action;
  $("confirm-text").textContent = text;
  $("confirm").hidden = false;
  $("actions").hidden = true;
}

function hideConfirm() {
  state.confirm = null;
  $("confirm").hidden = true;
  $("actions").hidden = false;
}

async function refreshSession() {
  state.session = await api("GET", `${API}/sessions/${state.session.id}`);
  showHead();
}

async function rename(name) {
  try {
    state.session = await api("PATCH", `${API}/sessions/${state.session.id}`,
                              {session_name: name || null});
    showHead();
    await loadList(true);
    toast("Renamed");
  } catch (error) { fail(error); }
}

async function forkAt(seq) {
  try {
    const body = seq === undefined ? {} : {up_to_seq: seq};
    const fork = await api("POST", `${API}/sessions/${state.session.id}/fork`, body);
    toast(seq === undefined ? "Forked" : `Forked at message #${seq}`);
    await loadList(true);
    await openSession(fork.id, fork);
  } catch (error) { fail(error); }
}

async function exportSession() {
  const s = state.session;
  try {
    const response = await fetch(`${API}/sessions/${s.id}/export`, {
      headers: {Authorization: "Bearer " + state.key}, cache: "no-store", credentials: "omit",
    });
    if (!response.ok) throw new ApiError(response.status, "Export failed: " + response.status);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = el("a");
    link.href = url;
    link.download = s.id + ".json";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    toast("Exported " + s.id + ".json");
  } catch (error) { fail(error); }
}

async function clearSession() {
  try {
    await api("DELETE", `${API}/sessions/${state.session.id}/messages`);
    await refreshSession();
    await loadMessages();
    await loadList(true);
    toast("History cleared");
  } catch (error) { fail(error); }
}

async function deleteSession() {
  try {
    const id = state.session.id;
    await api("DELETE", `${API}/sessions/${id}`);
    state.session = {...state.session, is_active: false};
    showDeleted(state.session);
    await loadList(true);
    toast("Deleted. Tick “Show deleted” to find it again.");
  } catch (error) { fail(error); }
}

async function restoreSession() {
  try {
    state.session = await api("POST", `${API}/sessions/${state.session.id}/restore`);
    await openSession(state.session.id);
    await loadList(true);
    toast("Restored");
  } catch (error) { fail(error); }
}

async function newSession() {
  try {
    const s = await api("POST", `${API}/sessions`, {});
    await loadList(true);
    await openSession(s.id, s);
    $("input").focus();
  } catch (error) { fail(error); }
}

// --- sending: the reply streams in as it arrives ----------------------------------------------

async function send() {
  const input = $("input");
  const content = input.value;
  if (!content.trim() || state.sending) return;
  const s = state.session;
  const model = s.model || $("model").value.trim();
  if (!model) { toast("Enter a model to send with (this session has none)", true); return; }
  state.sending = true;
  $("send").disabled = true;
  input.value = "";
  const list = $("messages");
  list.querySelectorAll(":scope > .none").forEach((n) => n.remove());
  const mine = el("li", "msg user pending");
  mine.append(roleHead("user"), el("div", "text", content));
  const reply = el("li", "msg assistant pending");
  const text = el("div", "text streaming");
  reply.append(roleHead("assistant"), text);
  list.append(mine, reply);
  const box = $("transcript");
  box.scrollTop = box.scrollHeight;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {Authorization: "Bearer " + state.key, "Content-Type": "application/json"},
      body: JSON.stringify({model, session_id: s.id, stream: true,
                            messages: [{role: "user", content}]}),
      cache: "no-store", credentials: "omit",
    });
    if (!response.ok) {
      let message = "The request failed: " + response.status;
      try { message = (await response.json()).error.message || message; } catch (e) { /* */ }
      throw new ApiError(response.status, message);
    }
    await readStream(response, (delta) => {
      text.textContent += delta;
      box.scrollTop = box.scrollHeight;
    });
  } catch (error) {
    fail(error);
    if (!text.textContent) input.value = content;
  } finally {
    text.classList.remove("streaming");
    state.sending = false;
    $("send").disabled = false;
    try {
      await refreshSession();
      await loadMessages();
      loadList(true);
    } catch (error) { fail(error); }
  }
}

function roleHead(role) {
  const head = el("div", "msg-head");
  head.append(el("span", "role", role));
  return head;
}

async function readStream(response, onText) {
  // Server-sent events: "data: {...}" lines, events separated by a blank line.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        let chunk;
        try { chunk = JSON.parse(data); } catch (e) { continue; }
        if (chunk.error) throw new Error(chunk.error.message || "The upstream broke off");
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (typeof delta.content === "string" && delta.content) onText(delta.content);
          if (typeof delta.refusal === "string" && delta.refusal) onText(delta.refusal);
        }
      }
    }
  }
}

// --- wiring ----------------------------------------------------------------------------------

function wire() {
  $("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("sign-in-button").disabled = true;
    try {
      await signIn(key);
    } catch (error) {
      signOut(error instanceof ApiError && error.status === 401
        ? "That key is not valid." : (error.message || "Could not sign in."));
    } finally {
      $("sign-in-button").disabled = false;
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  const search = () => {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(() => {
      const query = $("search").value.trim();
      if (query === state.query) return;
      state.query = query;
      loadList(true);
    }, 250);
  };
  $("search").addEventListener("input", search);
  $("search").addEventListener("search", search);  // the field's own clear button
  $("show-deleted").addEventListener("change", () => loadList(true));
  $("more").addEventListener("click", () => loadList(false));
  $("new-session").addEventListener("click", newSession);
  $("earlier").addEventListener("click", () => loadEarlier());
  $("rename").addEventListener("click", () => {
    $("title").hidden = true;
    $("rename-form").hidden = false;
    $("rename-input").value = state.session.session_name || "";
    $("rename-input").focus();
  });
  $("rename-cancel").addEventListener("click", () => {
    $("rename-form").hidden = true;
    $("title").hidden = false;
  });
  $("rename-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("rename-form").hidden = true;
    rename($("rename-input").value.trim());
  });
  $("fork").addEventListener("click", () => forkAt());
  $("export").addEventListener("click", exportSession);
  $("clear").addEventListener("click", () => ask("Delete every message of this session?",
                                                 clearSession));
  $("delete").addEventListener("click", () => ask("Delete this session?", deleteSession));
  $("restore").addEventListener("click", restoreSession);
  $("confirm-yes").addEventListener("click", () => {
    const action = state.confirm;
    hideConfirm();
    if (action) action();
  });
  $("confirm-no").addEventListener("click", hideConfirm);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  const key = sessionStorage.getItem(KEY);
  if (key) {
    signIn(key).catch(() => signOut("Your key is no longer valid. Sign in again."));
  } else {
    $("key").focus();
  }
});
