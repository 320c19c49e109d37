"""`chatproxy mcp --user USER`: the MCP server (`proxy.mcp.server`) over stdio, as USER (§9).

For hosts that launch a command (Claude Desktop, IDE agents). Like every CLI command it joins the
configured database (the embedded cluster, or `CHATPROXY_DATABASE_URL`) whether or not a server
runs, and it builds the same runtime a server worker has (a pool, the tokenizer, the upstream
client), so the tools behave exactly as they do over `/mcp`. Every request acts as USER.

stdout carries the protocol and nothing else: logs go to stderr, and while serving the SDK
points file descriptor 1 at stderr too, so nothing stray can reach the wire.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import asyncpg

from proxy import db
from proxy.config import Settings
from proxy.mcp import server as mcpserver
from proxy.migrate import migrate
from proxy.runtime import Runtime
from proxy.store import users
from proxy.tokens import ModelTable, TokenCounter
from proxy.upstream import make_client


async def serve(settings: Settings, user: str) -> int:
    """Serve until the host closes stdin; 1 when USER names nobody."""
    # The SDK logs every request at info, and its debug lines may quote a message.
    logging.getLogger("mcp").setLevel(max(logging.WARNING, logging.getLogger().level))
    url = await asyncio.to_thread(db.database_url, settings)
    conn = await asyncpg.connect(url, timeout=db.CONNECT_TIMEOUT)
    try:
        await migrate(conn)
        found = await users.find_user(conn, user)
    finally:
        await conn.close()
    if found is None:
        print(f"chatproxy: no user {user!r}", file=sys.stderr)
        return 1
    user_id: str = found["id"]
    tokens = TokenCounter(ModelTable.load(settings.models_file))
    pool = await db.create_pool(url, settings)
    http = make_client(settings)
    rt = Runtime(settings, pool, http, tokens)
    logging.getLogger("chatproxy").info("MCP over stdio as user %s (%s)", user_id,
                                        db.describe(settings))
    try:
        await mcpserver.build(lambda: rt, lambda ctx: user_id).run_stdio_async()
    finally:
        if rt.writes:  # write-backs a tool handed off (contract §6: never lose a stored turn)
            await asyncio.wait(set(rt.writes), timeout=settings.shutdown_grace)
        await http.aclose()
        await pool.close()
    return 0
