"""The context-length refusals real servers send (contract §11), each recognised by the
table-driven parser in proxy/turns/overflow.py, with the window and the request's size it states.

The wordings are the servers' own (their source, or error bodies their users posted).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.tokens import ModelInfo
from proxy.turns import overflow
from proxy.turns.overflow import Refusal


def openai_error(message: str, code: Any = None, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": "messages",
                                 "code": code}}).encode()


# name, status, body, (form, limit, requested)
FORMS: list[tuple[str, int, bytes, tuple[str, int | None, int | None]]] = [
    ("openai", 400, openai_error(
        "This model's maximum context length is 128000 tokens. However, your messages resulted "
        "in 130412 tokens. Please reduce the length of the messages.",
        "context_length_exceeded"), ("openai", 128000, 130412)),
    ("openai with a completion part", 400, openai_error(
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "(8000 in the messages, 1000 in the completion). Please reduce the length of the "
        "messages or completion.", "context_length_exceeded"), ("openai-parts", 8192, 9000)),
    ("openai responses", 400, openai_error(
        "Your input exceeds the context window of this model. Please adjust your input and try "
        "again.", "context_length_exceeded"), ("openai-responses", None, None)),
    ("openai code only", 400, openai_error("Request too large.", "context_length_exceeded"),
     ("code", None, None)),
    ("vllm before v1", 400, json.dumps({
        "object": "error", "message": "This model's maximum context length is 4096 tokens. "
        "However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). "
        "Please reduce the length of the messages or completion.",
        "type": "BadRequestError", "param": None, "code": 400}).encode(),
     ("openai-parts", 4096, 5000)),
    ("vllm v1", 400, openai_error(
        "This model's maximum context length is 1536 tokens. However, your request has 4176 "
        "input tokens. Please reduce the length of the input messages.", 400, "BadRequestError"),
     ("vllm-v1", 1536, 4176)),
    ("vllm 0.10 without max_tokens", 400, openai_error(
        "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens "
        "in the messages, Please reduce the length of the messages.", 400, "BadRequestError"),
     ("vllm-messages", 2048, 3000)),
    ("vllm 0.10 legacy", 400, openai_error(
        "This model's maximum context length is 2048 tokens. However, your prompt contains at "
        "least 2600 input tokens. Please reduce the length of the messages.", 400),
     ("vllm-v1", 2048, 2600)),
    ("vllm 0.11", 400, openai_error(
        "This model's maximum context length is 32768 tokens. However, you requested 0 output "
        "tokens and your prompt contains at least 32769 input tokens, for a total of at least "
        "32769 tokens. Please reduce the length of the input prompt or the number of requested "
        "output tokens. (parameter=input_tokens, value=32769)", 400, "BadRequestError"),
     ("vllm-0.11", 32768, 32769)),
    ("vllm max_tokens too large", 400, openai_error(
        "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum "
        "context length is 4096 tokens and your request has 2778 input tokens "
        "(8000 > 4096 - 2778). None", 400, "BadRequestError"),
     ("vllm-max-tokens", 4096, 10778)),
    ("llama.cpp", 400, json.dumps({"error": {
        "code": 400, "message": "request (4476 tokens) exceeds the available context size "
        "(4096 tokens), try increasing it", "type": "exceed_context_size_error",
        "n_prompt_tokens": 4476, "n_ctx": 4096}}).encode(), ("llama.cpp", 4096, 4476)),
    ("llama.cpp, older", 400, json.dumps({"error": {
        "code": 400, "message": "the request exceeds the available context size, try increasing "
        "the context size or enable context shift", "type": "invalid_request_error"}}).encode(),
     ("llama.cpp-old", None, None)),
    ("ollama", 400, json.dumps({"error": {
        "message": "the input length exceeds the context length", "type": "api_error",
        "param": None, "code": None}}).encode(), ("ollama", None, None)),
    ("ollama wrapping llama.cpp", 400, json.dumps({"error": json.dumps({"error": {
        "code": 400, "message": "request (351 tokens) exceeds the available context size "
        "(256 tokens), try increasing it", "type": "exceed_context_size_error",
        "n_prompt_tokens": 351, "n_ctx": 256}})}).encode(), ("llama.cpp", 256, 351)),
    ("anthropic compatible", 400, json.dumps({"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 208310 tokens > 200000 maximum"}}).encode(),
     ("anthropic", 200000, 208310)),
    ("litellm", 400, openai_error(
        "litellm.ContextWindowExceededError: litellm.BadRequestError: ContextWindowExceededError: "
        "OpenAIException - This model's maximum context length is 16385 tokens. However, your "
        "messages resulted in 17000 tokens. Please reduce the length of the messages.", "400",
        None), ("openai", 16385, 17000)),
    ("litellm without numbers", 400, openai_error(
        "litellm.ContextWindowExceededError: ContextWindowExceededError: prompt too long", "400"),
     ("litellm", None, None)),
    ("openrouter", 400, json.dumps({"error": {
        "message": "This endpoint's maximum context length is 131072 tokens. However, you "
        "requested about 150211 tokens (148000 of text input, 2211 in the output). Please reduce "
        "the length of either one, or use the \"middle-out\" transform to compress your prompt "
        "automatically.", "code": 400}}).encode(), ("openrouter", 131072, 150211)),
    ("gemini", 400, json.dumps([{"error": {
        "code": 400, "message": "The input token count (1196265) exceeds the maximum number of "
        "tokens allowed (1048575).", "status": "INVALID_ARGUMENT"}}]).encode(),
     ("gemini", 1048575, 1196265)),
    ("sglang", 400, openai_error(
        "The input (9000 tokens) is longer than the model's context length (8192 tokens).", 400),
     ("sglang", 8192, 9000)),
    ("text-generation-inference", 422, json.dumps({
        "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
        "Given: 4000 `inputs` tokens and 1000 `max_new_tokens`",
        "error_type": "validation"}).encode(), ("tgi", 4096, 5000)),
    ("mistral", 400, openai_error(
        "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 "
        "maximum context length", "3051"), ("mistral", 32768, 40000)),
    ("xai", 400, json.dumps({"code": "Client specified an invalid argument", "error":
        "This model's maximum prompt length is 131072 but the request contains 537812 "
        "tokens."}).encode(), ("xai", 131072, 537812)),
    ("a plain-text body", 400, b"This model's maximum context length is 2,048 tokens.",
     ("context-length", 2048, None)),
]


@pytest.mark.parametrize(("status", "body", "expected"), [f[1:] for f in FORMS],
                         ids=[f[0] for f in FORMS])
def test_each_form_is_recognised_with_what_it_states(
    status: int, body: bytes, expected: tuple[str, int | None, int | None]
) -> None:
    assert overflow.refusal(status, body) == Refusal(*expected)


@pytest.mark.parametrize(("status", "body"), [
    (400, openai_error("Invalid value for 'temperature'", "invalid_value")),
    (400, openai_error("max_tokens is too large: 100000. This model supports at most 16384 "
                       "completion tokens.", None)),
    (404, openai_error("The model `gpt-9` does not exist", "model_not_found")),
    (429, openai_error("Rate limit reached: maximum context length is 8192 tokens", None)),
    (401, openai_error("Incorrect API key provided", "invalid_api_key")),
    (503, b"upstream connect error"),
    (400, b"\xff\xfe not json at all"),
    (400, b""),
])
def test_other_errors_are_not_refusals(status: int, body: bytes) -> None:
    assert overflow.refusal(status, body) is None


def test_how_much_a_retry_leaves_out() -> None:
    stated = Refusal("openai", 8192, 9000)
    assert overflow.to_leave_out(stated, 3000) == 849  # (9000 - 8192) * 1.05, rounded up
    assert overflow.to_leave_out(Refusal("ollama"), 3001) == 1501  # half, rounded up
    assert overflow.to_leave_out(Refusal("openai", 8192, 8000), 3000) == 1500  # no excess stated


def test_a_learned_window_is_never_above_the_table_and_only_shrinks() -> None:
    info = ModelInfo(context_window=128000, reserve_output_tokens=4096, encoding="o200k_base")
    learned: overflow.Learned = {}
    window = info.context_window
    overflow.learn(learned, "u1", "qwen", Refusal("vllm-v1", 200000, 250000), window)
    assert learned == {}  # above the table's: nothing to learn
    overflow.learn(learned, "u1", "qwen", Refusal("vllm-v1", 8192, 9000), window)
    overflow.learn(learned, "u1", "qwen", Refusal("vllm-v1", 16384, 20000), window)
    assert learned == {("u1", "qwen"): 8192}
    overflow.learn(learned, "u1", "qwen", Refusal("ollama"), window)  # nothing stated
    assert overflow.limits(learned, "u1", "qwen", info) == (8192, 2048)  # reserve ≤ a quarter
    assert overflow.limits(learned, "u1", "other", info) == (128000, 4096)
    assert overflow.limits(learned, "u1", None, info) == (128000, 4096)
    # Another user's turns keep the table's window.
    assert overflow.limits(learned, "u2", "qwen", info) == (128000, 4096)


def test_learned_windows_are_bounded_the_oldest_going_first() -> None:
    learned: overflow.Learned = {}
    for n in range(overflow.MAX_LEARNED + 5):
        overflow.learn(learned, f"u{n}", "m", Refusal("vllm-v1", 1000, 2000), 8000)
    assert len(learned) == overflow.MAX_LEARNED
    assert ("u0", "m") not in learned and (f"u{overflow.MAX_LEARNED + 4}", "m") in learned
