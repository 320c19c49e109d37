"""The Responses and Conversations objects on the wire (contract §10), as pydantic models.

They state the shapes `/schema/openapi.json` documents; the conversations routes validate their
bodies with the request models here (`ConversationCreate`, `ConversationUpdate`, `ItemsCreate`).
A Responses request is checked by proxy/responses/request.py itself (it is on the hot path, and
maps each field); `ResponseCreate` documents exactly the fields it knows
(`tests/test_responses_request.py` keeps the two the same). Shapes follow OpenAI's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from proxy.schemas import ExactText

MAX_ITEMS = 20  # a conversation's items per create (OpenAI's limit)
Item = dict[str, Any]
Metadata = dict[str, str]


class ResponseCreate(BaseModel):
    """OpenAI's Responses request. Translated into one chat completions request to the upstream
    `model` picks. Fields OpenAI knows and this table does not list are refused (400
    `unknown_parameter`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="also picks the upstream (`[[upstreams]]` patterns)")
    input: str | list[Item] | None = Field(
        default=None, description="a user message's text, or items: `message`, "
        "`function_call`, `function_call_output` (`reasoning` items are dropped)")
    instructions: str | None = Field(
        default=None, description="the head system message; not carried over to a later "
        "response")
    conversation: str | dict[str, Any] | None = Field(
        default=None, description="a conversation id (a session id), or `{\"id\": ...}`: its "
        "history is injected and this turn stored in it")
    previous_response_id: str | None = Field(
        default=None, description="the inputs and outputs of that response's chain are the "
        "history (not with `conversation`)")
    store: bool | None = Field(default=None, description="false: no response is kept")
    stream: bool | None = None
    tools: list[Item] | None = Field(
        default=None, description="function tools only; another type is 400 "
        "`unsupported_value`")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, description="→ `max_completion_tokens`")
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = Field(
        default=None, description="`format` (`text`, `json_object`, `json_schema`) → "
        "`response_format`; `verbosity` → `verbosity`")
    reasoning: dict[str, Any] | None = Field(default=None,
                                             description="`effort` → `reasoning_effort`")
    metadata: Metadata | None = Field(default=None, description="at most 16 pairs; echoed")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = Field(
        default=None, description="history is always fitted to the model (contract §7)")
    max_history_messages: int | None = Field(
        default=None, ge=0, le=1000, description="this request's history window (chatproxy's)")
    background: bool | None = Field(default=None, description="`true` is 400 `unsupported_value`")
    prompt: dict[str, Any] | None = Field(default=None,
                                          description="stored prompts: 400 `unsupported_value`")
    moderation: dict[str, Any] | None = Field(default=None,
                                              description="400 `unsupported_value` when set")
    include: list[str] | None = Field(default=None, description="accepted, changes nothing")
    stream_options: dict[str, Any] | None = Field(default=None,
                                                  description="accepted, changes nothing")
    prompt_cache_retention: str | None = Field(default=None,
                                               description="accepted, changes nothing")
    prompt_cache_options: dict[str, Any] | None = Field(default=None,
                                                        description="accepted, changes nothing")
    context_management: list[dict[str, Any]] | None = Field(
        default=None, description="accepted: history is trimmed as contract §7 says")
    image: dict[str, Any] | None = Field(default=None, description="accepted, changes nothing")
    access_programs: dict[str, Any] | None = Field(default=None,
                                                   description="accepted, changes nothing")
    background_options: dict[str, Any] | None = Field(default=None,
                                                      description="accepted, changes nothing")
    max_tool_calls: int | None = Field(default=None,
                                       description="accepted: it counts hosted tools' calls")


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """OpenAI's response object; the request's settings are echoed."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(examples=["resp_3kTq9vYb2LwQ8cRmPz4Xa1Bc"])
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    output: list[Item] = Field(description="`message` and `function_call` items")
    model: str
    previous_response_id: str | None
    conversation: dict[str, str] | None
    usage: Usage | None


class ItemList(BaseModel):
    object: Literal["list"]
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class Conversation(BaseModel):
    """A conversation: a session, seen through the Conversations API."""

    id: str = Field(examples=["sess_3kTq9vYb2LwQ8cRmPz4Xa1Bc"],
                    description="the session's id")
    object: Literal["conversation"]
    created_at: int = Field(description="unix seconds")
    metadata: dict[str, str]


class DeletedConversation(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: Literal[True]


class ConversationCreate(ExactText):
    model_config = ConfigDict(extra="forbid")

    items: list[Item] | None = Field(default=None, max_length=MAX_ITEMS,
                                     description=f"at most {MAX_ITEMS}, stored as one turn")
    metadata: Metadata | None = Field(default=None, description="at most 16 pairs")


class ConversationUpdate(ExactText):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = Field(description="replaces the metadata (null: none)")


class ItemsCreate(ExactText):
    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(min_length=1, max_length=MAX_ITEMS,
                              description=f"at most {MAX_ITEMS}, stored as one turn")

