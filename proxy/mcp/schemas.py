"""The results of the MCP tools (contract §9), as pydantic models: their `outputSchema`.

Like `proxy.wire` for the OpenAPI document, these only describe: the tools build plain dicts
(`proxy.mcp.tools`) and the SDK checks each result against its model before it is sent.
Sessions and messages are `proxy.wire`'s, so REST and MCP answer with the same objects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from proxy.schemas import ChatMessage, ExportDocument, Message, Session

__all__ = [
    "Cleaned",
    "Cleared",
    "Deleted",
    "ExportDocument",
    "MessagePage",
    "OneSession",
    "Resumed",
    "Sent",
    "SessionPage",
]


class SessionPage(BaseModel):
    sessions: list[Session] = Field(description="most recent activity first")
    total: int = Field(description="how many sessions match, on every page")
    has_more: bool = Field(description="whether a later page (a higher offset) holds more")


class CarriedSummary(BaseModel):
    text: str = Field(description="the summary of the earlier conversation")
    up_to_seq: int = Field(description="the newest message it covers")
    tokens: int


class Resumed(BaseModel):
    session: Session
    messages: list[Message] = Field(
        description="the history a turn on this session would be sent now, oldest first")
    summary: CarriedSummary | None = Field(
        description="the summary of older messages a turn would carry before that history, "
        "as one system message (null: none; summaries are off, or nothing is left out)")


class MessagePage(BaseModel):
    messages: list[Message]
    total: int = Field(description="how many messages the session holds")
    has_more: bool


class OneSession(BaseModel):
    session: Session


class Sent(BaseModel):
    reply: ChatMessage = Field(
        description="the model's reply, as stored: role, content (and tool_calls or refusal "
        "when it has them)")
    session: Session = Field(description="the session after the turn")


class Cleared(BaseModel):
    session_id: str
    cleared: Literal[True]


class Deleted(BaseModel):
    session_id: str
    deleted: Literal[True]


class Cleaned(BaseModel):
    deleted_sessions: int = Field(description="sessions removed, with their messages")
    deleted_messages: int
