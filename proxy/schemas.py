"""The objects on the wire (contract §3-§6) as pydantic models: the one statement of their shapes.

`/schema/openapi.json` is generated from these and from the models the handlers validate with
(proxy/openapi.py). The answers are plain dicts built by proxy/store/ (`tests/test_openapi.py`
checks real ones against these models); the import document is validated with
`ImportDocument` itself (proxy/document.py). The roles, the session fields' limits and the
message object's fields are stated here once, and read from here by the code that checks them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ROLES = frozenset(get_args(Role))
Content = str | list[dict[str, Any]] | None
Status = Literal["complete", "incomplete"]
Format = Literal["chatproxy.session.v1"]
FORMAT: str = get_args(Format)[0]

# A session's settings, wherever they are set (create, update, import) or shown.
MAX_SESSION_NAME = 1000
MAX_MODEL_NAME = 200
MAX_HISTORY_MESSAGES = 1000
MAX_HISTORY_TOKENS = 100_000_000
MAX_METADATA = 64
MAX_TOKENS = 2**31 - 1  # a stored message's token count
SessionName = Annotated[str | None, Field(max_length=MAX_SESSION_NAME)]
ModelName = Annotated[str | None, Field(max_length=MAX_MODEL_NAME)]
HistoryMessages = Annotated[int, Field(ge=0, le=MAX_HISTORY_MESSAGES)]
HistoryTokens = Annotated[int, Field(ge=0, le=MAX_HISTORY_TOKENS)]
Metadata = Annotated[dict[str, str], Field(max_length=MAX_METADATA)]


def _timestamp(value: Any) -> Any:
    """An ISO 8601 string as a datetime in UTC (taken as UTC when it names no zone); anything
    else is left to fail the datetime check. A moment whose UTC date falls outside years 1 to
    9999 (`9999-12-31T23:59:59-14:00`) is refused like a malformed one."""
    if not isinstance(value, str):
        return value
    moment = datetime.fromisoformat(value)  # a ValueError is pydantic's `value_error`
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range") from None


Timestamp = Annotated[datetime, BeforeValidator(_timestamp)]


class ExactText(BaseModel):
    """A request body whose strings are stored exactly (`codec.pack_text`): validation
    (proxy/validation.py) takes lone surrogates in it, which pydantic alone refuses. Other
    bodies (names, ids) refuse them.
    """


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error` or `server_error`")
    param: str | None = Field(description="the field the error is about, when there is one")
    code: str | None = Field(description="e.g. `session_not_found`, `invalid_value`")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error the proxy itself produces has this shape."""

    error: ErrorDetail


# --- sessions -----------------------------------------------------------------------------------


class SummaryOutline(BaseModel):
    """A session's summary, without its text (`GET .../summary` has the text)."""

    up_to_seq: int = Field(description="the newest message the summary covers")
    tokens: int = Field(description="what the summary costs a turn that carries it")
    updated_at: datetime


class Summary(BaseModel):
    """A session's summary of its earlier messages (contract §11). A turn that leaves out
    messages it covers carries it as one system message right after the head."""

    text: str
    up_to_seq: int = Field(description="the newest message the summary covers")
    tokens: int = Field(description="tokens of the system message that carries it")
    model: str | None = Field(description="the model that wrote it")
    updated_at: datetime


class Session(BaseModel):
    """A chat session. Timestamps are ISO 8601 UTC (`2024-12-15T10:30:00Z`)."""

    id: str = Field(examples=["sess_3kTq9vYb2LwQ8cRm"])
    object: Literal["chat.session"]
    session_id: str = Field(description="the same as `id`")
    session_name: str | None
    model: str | None
    system_prompt: str | None = Field(
        description="sent as a system message when a request opens with none")
    max_history_messages: HistoryMessages
    max_history_tokens: int | None
    metadata: dict[str, str]
    message_count: int
    total_tokens: int = Field(description="the sum of the stored messages' `tokens`")
    is_active: bool = Field(description="false once deleted (until restored or purged)")
    created_at: datetime
    updated_at: datetime
    last_message_at: datetime | None
    summary: SummaryOutline | None = Field(
        description="the summary of the earlier messages (`GET .../summary`), or null")


class SessionList(BaseModel):
    object: Literal["list"]
    data: list[Session] = Field(description="most recent activity first")
    total: int = Field(description="the sessions that match the filters, on every page")
    limit: int
    offset: int
    has_more: bool
    next_cursor: str | None = Field(
        description="pass as `after` for the next page; null on the last page")


class Message(BaseModel):
    """A stored message; `content` exactly as the client or upstream sent it."""

    id: str = Field(examples=["msg_42"])
    object: Literal["chat.message"]
    session_id: str
    seq: int = Field(description="unique and increasing within the session")
    role: Role
    content: Content = Field(description="a string, an array of content parts, or null")
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    tokens: int
    status: Status = Field(
        description="`incomplete`: the stream ended before the reply was whole")
    created_at: datetime


# What a message object puts around a stored message (never part of one), and the message's own
# fields it shows beside `role` and `content` when they are set.
MESSAGE_ENVELOPE = frozenset(
    name for name, info in Message.model_fields.items() if info.is_required()
) - {"role", "content"}
MESSAGE_FIELDS = tuple(
    name for name, info in Message.model_fields.items() if not info.is_required()
)


class MessageList(BaseModel):
    object: Literal["list"]
    data: list[Message]
    total: int
    limit: int
    offset: int
    has_more: bool


class SearchHit(BaseModel):
    """A stored message that matches a search, with a snippet of its text."""

    session_id: str
    session_name: str | None
    message_id: str = Field(examples=["msg_42"])
    seq: int
    role: Role
    snippet: str = Field(description="plain text around the first match (`…` where cut); "
                         "not markup")
    created_at: datetime


class SearchList(BaseModel):
    object: Literal["list"]
    data: list[SearchHit] = Field(description="newest first")
    has_more: bool
    next_cursor: str | None = Field(
        description="pass as `after` for the next page; null on the last page")


class ExportDocument(BaseModel):
    """A whole session: every message, in order. `POST .../import` takes it back."""

    format: Format
    session: Session
    summary: Summary | None = Field(
        description="the session's summary, `up_to_seq` in these messages' seqs")
    messages: list[Message]


class ImportSession(BaseModel):
    """The session part of an import: its settings (anything else in it is ignored)."""

    model_config = ConfigDict(extra="allow")

    session_name: SessionName = None
    model: ModelName = None
    system_prompt: str | None = None
    max_history_messages: HistoryMessages | None = None
    max_history_tokens: HistoryTokens | None = None
    metadata: Metadata | None = None


class ImportMessage(BaseModel):
    """A message to import: `role` and `content` are required; the envelope (`id`, `object`,
    `session_id`) is ignored; `tokens` is counted when left out; other fields are kept."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: Content
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    status: Status = "complete"
    seq: int | None = Field(default=None, description="when given, increasing")
    tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    created_at: Timestamp | None = None


class ImportSummary(BaseModel):
    """The summary part of an import: `text` and `up_to_seq` (in the document's seqs, or its
    positions when its messages have none) are required; `tokens` is counted when left out."""

    model_config = ConfigDict(extra="allow")

    text: str
    up_to_seq: int = Field(ge=0, le=2**62)
    tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    model: ModelName = None
    updated_at: Timestamp | None = None


# What an import is validated with (proxy/document.py), lone surrogates and NULs included.
class ImportDocument(ExactText):
    """An export document (`GET .../export`), or one written by hand."""

    model_config = ConfigDict(extra="allow")

    format: Format
    session: ImportSession
    summary: ImportSummary | None = None
    messages: list[ImportMessage]


# --- admin --------------------------------------------------------------------------------------


class User(BaseModel):
    id: str = Field(examples=["user_7hKq2mXw"])
    name: str
    created_at: datetime


class UserList(BaseModel):
    object: Literal["list"]
    data: list[User]


class ApiKey(BaseModel):
    """A key without its secret."""

    id: str = Field(examples=["key_4bNf8sQz"])
    object: Literal["api_key"]
    user_id: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class NewApiKey(BaseModel):
    """A key as issued: `key` appears here and nowhere else, ever."""

    id: str
    object: Literal["api_key"]
    key: str = Field(examples=["sk-cp-..."])
    prefix: str
    name: str | None
    user_id: str
    created_at: datetime


class ApiKeyList(BaseModel):
    object: Literal["list"]
    data: list[ApiKey]


# --- chat completions ---------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """An OpenAI chat message; fields not listed are forwarded as they are."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: Content = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, plus the proxy's two fields; every other field is
    forwarded to the upstream unchanged."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="also picks the upstream (`[[upstreams]]` patterns)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    session_id: str | None = Field(
        default=None,
        description="inject this session's history and store the turn in it (or send the "
        "`X-Session-Id` header); removed before the request goes upstream",
    )
    max_history_messages: int | None = Field(
        default=None, ge=0, le=MAX_HISTORY_MESSAGES,
        description="this request's history window instead of the session's; removed before "
        "the request goes upstream",
    )
