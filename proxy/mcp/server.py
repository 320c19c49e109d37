"""The MCP server (contract §9): the session tools and the transcript resource, on the official SDK.

`build(runtime, caller)` makes one `MCPServer` for either door, Streamable HTTP
(`proxy.mcphttp`) or stdio (`proxy.mcpstdio`): `runtime()` is what the tools run on and
`caller(ctx)` the user id a request acts as, which each door knows in its own way. The tools'
input schemas come from their signatures, their output schemas from `proxy.mcp.schemas`; the
descriptions are written for the model that reads them.

Each tool hands its work to `proxy.mcp.tools` and answers `structuredContent` plus the text of
`proxy.mcp.text`. A `ProxyError` (a bad argument, a session that is not the caller's, the
database down) is a `ToolError`: the SDK answers it as a result with `isError: true`, and
nothing was changed. Arguments the input schema refuses are such results too (the SDK's own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from proxy.errors import ProxyError, SessionNotFound
from proxy.mcp import text as mcptext
from proxy.mcp import tools as mcptools
from proxy.mcp.schemas import (
    Cleaned,
    Cleared,
    Deleted,
    ExportDocument,
    MessagePage,
    OneSession,
    Resumed,
    Sent,
    SessionPage,
)
from proxy.reading import MAX_OFFSET
from proxy.runtime import Runtime

Caller = Callable[[Context], str]
Tool = Callable[..., Awaitable[CallToolResult]]
TRANSCRIPT = "chatproxy://sessions/{session_id}"

INSTRUCTIONS = """\
chatproxy keeps this user's chat sessions: conversations with a language model whose history is \
stored on the server. Session ids look like sess_3kTq9vYb2LwQ8cRmXa1b2c3d. Find sessions with \
list_sessions, read one with get_messages (or the resource chatproxy://sessions/{session_id}), \
pick one up again with resume_session, continue it with send_message. Every tool acts only on \
this user's own sessions."""

SessionId = Annotated[str, Field(
    description="a session id, like sess_3kTq9vYb2LwQ8cRmXa1b2c3d (from list_sessions)",
    max_length=200)]
Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET, description="how many to skip (paging)")]

READS = ToolAnnotations(read_only_hint=True, open_world_hint=False)
ADDS = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
REMOVES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                          open_world_hint=False)


def _valid_text(value: Any) -> Any:
    """`value` with lone surrogates (which stored text may hold, contract §5, but which an MCP
    message, UTF-8 JSON, cannot carry) replaced by U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    return value


def _sendable(result: dict[str, Any]) -> dict[str, Any]:
    try:
        msgspec.json.encode(result)  # the common case: nothing to replace, one fast pass
    except UnicodeEncodeError:
        cleaned: dict[str, Any] = _valid_text(result)
        return cleaned
    return result


async def _answer(
    work: Awaitable[dict[str, Any]], text: Callable[[dict[str, Any]], str]
) -> CallToolResult:
    try:
        result = _sendable(await work)
    except ProxyError as exc:  # its message names no internals and no message text
        raise ToolError(exc.message) from None
    return CallToolResult(content=[TextContent(type="text", text=text(result))],
                          structured_content=result)


def _log_fields(ctx: Context) -> dict[str, Any] | None:
    """The HTTP request's access-log fields (its scope's `state`), which a turn fills in with
    the upstream's name, status and latency; over stdio there is no request and no such log."""
    scope = getattr(ctx.request_context.request, "scope", None)
    state = scope.get("state") if isinstance(scope, dict) else None
    return state if isinstance(state, dict) else None


def build(runtime: Callable[[], Runtime], caller: Caller) -> MCPServer:
    """The server with every tool and the transcript resource."""
    server: MCPServer = MCPServer("chatproxy", instructions=INSTRUCTIONS, version="0.1.0")

    def tool(annotations: ToolAnnotations) -> Callable[[Tool], Tool]:
        def register(fn: Tool) -> Tool:
            # The docstring as one paragraph: a model reads it, not a Python programmer.
            description = " ".join((fn.__doc__ or "").split())
            server.add_tool(fn, description=description, annotations=annotations)
            return fn

        return register

    @tool(annotations=READS)
    async def list_sessions(
        ctx: Context,
        include_inactive: Annotated[bool, Field(
            description="also list deleted sessions that can still be restored")] = False,
        limit: Annotated[int, Field(ge=1, le=100, description="page size")] = 20,
        offset: Offset = 0,
        query: Annotated[str | None, Field(
            min_length=1, max_length=1000, description="only sessions whose name or a message "
            "contains every word of this (case-insensitive; words match as prefixes)")] = None,
    ) -> Annotated[CallToolResult, SessionPage]:
        """List the user's chat sessions, most recent activity first: id, name, model, message
        and token counts, last activity. Use it to find a session id (sess_...) before reading,
        resuming or tidying a session; give query to find sessions about something. Pages with
        limit/offset; has_more says there is more."""
        work = mcptools.list_sessions(
            runtime(), caller(ctx), include_inactive, limit, offset, query)
        return await _answer(work, lambda r: mcptext.sessions(r, offset))

    @tool(annotations=ADDS)
    async def resume_session(ctx: Context, session_id: SessionId) -> Annotated[
            CallToolResult, Resumed]:
        """Pick a conversation up again: restores the session if it was deleted (and not yet
        purged), and answers it with the history a new turn on it would be sent now (the newest
        max_history_messages messages, tool exchanges kept whole, within the session model's
        context window less its reply reserve and the system prompt, and max_history_tokens;
        a turn's own messages and max_tokens shrink that budget further)."""
        work = mcptools.resume_session(runtime(), caller(ctx), session_id)
        return await _answer(work, mcptext.resumed)

    @tool(annotations=READS)
    async def get_messages(
        ctx: Context,
        session_id: SessionId,
        limit: Annotated[int, Field(ge=1, le=500, description="page size")] = 50,
        offset: Offset = 0,
        order: Annotated[Literal["asc", "desc"], Field(
            description="asc: oldest first; desc: newest first")] = "asc",
    ) -> Annotated[CallToolResult, MessagePage]:
        """Read a session's stored messages (role, content, tool calls and results, token
        count, status: 'incomplete' marks a reply that was cut off), by seq. Use order='desc'
        to read the newest first. Pages with limit/offset; has_more says there is more."""
        work = mcptools.get_messages(runtime(), caller(ctx), session_id, limit, offset,
                                     order == "desc")
        return await _answer(work, lambda r: mcptext.messages(session_id, r, offset))

    @tool(annotations=ADDS)
    async def create_session(
        ctx: Context,
        session_name: Annotated[str | None, Field(max_length=1000)] = None,
        model: Annotated[str | None, Field(
            max_length=200, description="the model this session is meant for")] = None,
        system_prompt: Annotated[str | None, Field(
            description="sent as the system message of every turn that brings none")] = None,
        max_history_messages: Annotated[int | None, Field(
            ge=0, le=1000, description="stored messages a turn may inject (default: the "
            "server's setting, usually 20)")] = None,
        max_history_tokens: Annotated[int | None, Field(
            ge=0, le=100_000_000, description="a cap on the injected history's tokens")] = None,
        metadata: Annotated[dict[str, str] | None, Field(
            max_length=64, description="string labels, e.g. {\"project\": \"apollo\"}")] = None,
    ) -> Annotated[CallToolResult, OneSession]:
        """Create an empty chat session for the user and answer it, with its id (sess_...).
        Continue it with send_message (or any client of chatproxy's chat completions API)."""
        given = {
            "session_name": session_name, "model": model, "system_prompt": system_prompt,
            "max_history_messages": max_history_messages,
            "max_history_tokens": max_history_tokens, "metadata": metadata,
        }
        fields = {name: value for name, value in given.items() if value is not None}
        work = mcptools.create_session(runtime(), caller(ctx), fields)
        return await _answer(work, lambda r: mcptext.one_session("Created", r))

    @tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                      idempotent_hint=False, open_world_hint=True))
    async def send_message(
        ctx: Context,
        session_id: SessionId,
        content: Annotated[str, Field(
            min_length=1, description="the user's message: plain text")],
        model: Annotated[str | None, Field(
            min_length=1, max_length=200, description="the model to answer (default: the "
            "session's model; required when the session has none)")] = None,
    ) -> Annotated[CallToolResult, Sent]:
        """Continue a stored conversation: send one user message to the language model in the
        session, with the session's system prompt and as much of its stored history as fits the
        model's context sent before it, and get the model's reply. Both the message and the
        reply are stored in the session, so the next turn - from this tool or any chatproxy
        client - sees them. Use it to ask the session's model something in the context of that
        conversation; to only read a session, use get_messages. Each call is a new turn:
        calling it again sends the message again."""
        work = mcptools.send_message(runtime(), caller(ctx), session_id, content, model,
                                     _log_fields(ctx))
        return await _answer(work, mcptext.sent)

    @tool(annotations=READS)
    async def export_session(ctx: Context, session_id: SessionId) -> Annotated[
            CallToolResult, ExportDocument]:
        """Export a whole session as a chatproxy.session.v1 document: its settings and every
        message in order. Pass the document to import_session to copy the conversation."""
        work = mcptools.export_session(runtime(), caller(ctx), session_id)
        return await _answer(work, mcptext.exported)

    @tool(annotations=ADDS)
    async def import_session(
        ctx: Context,
        document: Annotated[dict[str, Any], Field(
            description="an export document, as export_session answers it: {\"format\": "
            "\"chatproxy.session.v1\", \"session\": {...}, \"messages\": [{\"role\", "
            "\"content\", ...}]}")],
    ) -> Annotated[CallToolResult, OneSession]:
        """Create a new session (a new id, owned by the user) holding a document's messages.
        The whole document is checked first; a problem names the field and creates nothing."""
        work = mcptools.import_session(runtime(), caller(ctx), document)
        return await _answer(work, lambda r: mcptext.one_session("Imported", r))

    @tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                      idempotent_hint=False, open_world_hint=False))
    async def merge_sessions(
        ctx: Context,
        primary_id: Annotated[str, Field(max_length=200, description="the session that "
                                         "receives the messages (sess_...)")],
        secondary_id: Annotated[str, Field(max_length=200, description="the session whose "
                                           "messages are appended; it is deleted (sess_...)")],
    ) -> Annotated[CallToolResult, OneSession]:
        """Append a copy of the secondary session's messages after the primary's, in order,
        then delete the secondary (resume_session can restore it, whole). Answers the primary."""
        work = mcptools.merge_sessions(runtime(), caller(ctx), primary_id, secondary_id)
        return await _answer(work, lambda r: mcptext.one_session("Merged into", r))

    @tool(annotations=ADDS)
    async def fork_session(
        ctx: Context,
        session_id: SessionId,
        up_to_seq: Annotated[int | None, Field(
            ge=1, le=2**62, description="copy the messages up to this seq (default: all); "
            "not inside a tool exchange")] = None,
        session_name: Annotated[str | None, Field(
            max_length=1000, description="the copy's name (default: the original's)")] = None,
    ) -> Annotated[CallToolResult, OneSession]:
        """Branch a conversation: a new session with the same settings and a copy of the
        messages up to up_to_seq, which continues from there. The original is unchanged."""
        work = mcptools.fork_session(runtime(), caller(ctx), session_id, up_to_seq, session_name)
        return await _answer(work, lambda r: mcptext.one_session("Forked into", r))

    @tool(annotations=REMOVES)
    async def clear_session(ctx: Context, session_id: SessionId) -> Annotated[
            CallToolResult, Cleared]:
        """Delete every message of a session; the session and its settings stay, empty.
        This cannot be undone."""
        work = mcptools.clear_session(runtime(), caller(ctx), session_id)
        return await _answer(work, lambda r: f"Cleared the history of {r['session_id']}.")

    @tool(annotations=REMOVES)
    async def delete_session(ctx: Context, session_id: SessionId) -> Annotated[
            CallToolResult, Deleted]:
        """Delete a session. It disappears from every list and tool, but resume_session can
        restore it until the retention period purges it."""
        work = mcptools.delete_session(runtime(), caller(ctx), session_id)
        return await _answer(work, lambda r: f"Deleted {r['session_id']} (resume_session "
                             "restores it until it is purged).")

    @tool(annotations=REMOVES)
    async def cleanup_sessions(
        ctx: Context,
        older_than: Annotated[str | None, Field(
            max_length=20, description="a duration: 30s, 15m, 12h, 7d or 2w (default: the "
            "server's retention, CHATPROXY_RETENTION_DAYS)")] = None,
    ) -> Annotated[CallToolResult, Cleaned]:
        """Permanently delete the user's own sessions inactive for longer than older_than, and
        purge their deleted sessions deleted longer ago than that, with all their messages.
        Other users' sessions are never touched. This cannot be undone."""
        work = mcptools.cleanup_sessions(runtime(), caller(ctx), older_than)
        return await _answer(work, lambda r: mcptext.cleaned(r, older_than))

    @server.resource(  # type: ignore[untyped-decorator, unused-ignore]  # untyped in some SDKs
        TRANSCRIPT, name="transcript", mime_type="text/markdown",
        description="A session's whole conversation as Markdown: roles, tool calls with their "
        "arguments, tool results; cut-off replies are marked.")
    async def transcript(session_id: str, ctx: Context) -> str:
        try:
            doc = await mcptools.export_session(runtime(), caller(ctx), session_id)
        except SessionNotFound as exc:
            raise ResourceNotFoundError(exc.message) from None
        except ProxyError as exc:
            raise ResourceError(exc.message) from None
        return mcptext.transcript(_sendable(doc))

    return server
