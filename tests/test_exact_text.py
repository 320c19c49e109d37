"""Any text a client sends is taken and kept exactly (issue 13, item 14).

pydantic refuses lone surrogates, so a body that holds them is validated through stand-ins
(proxy/validation.py): each lone surrogate becomes a code point the body does not hold anywhere,
and back again. No valid string can collide with a stand-in: `"\\ud800\\U000F0000"`, a lone
surrogate beside the private-use character an earlier fixed swap used for it, was refused. The
storage side (`codec.pack_text`) must round-trip every string as well.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import codec
from proxy.routes.sessions import SessionFields
from proxy.schemas import MAX_SESSION_NAME, ImportDocument
from proxy.validation import validated
from tests.conftest import User

# Any code point, with lone surrogates, private-use characters (the old stand-ins among them),
# NUL and the stand-ins' own neighbourhood drawn often.
CHARACTERS = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
    st.characters(min_codepoint=0xF0000, max_codepoint=0xF0800, exclude_categories=()),
    st.characters(min_codepoint=0xE000, max_codepoint=0xE010, exclude_categories=()),
    st.sampled_from(["\x00", "\x01", "\ufffd", "\U0010fffd"]),
)
TEXTS = st.text(CHARACTERS, max_size=40)


COLLIDED = "\ud800\U000f0000"  # refused by the fixed swap of surrogates and U+F0000...


@settings(max_examples=300, deadline=None)
@given(name=TEXTS, prompt=TEXTS, metadata=st.dictionaries(TEXTS, TEXTS, max_size=4))
@example(name=COLLIDED, prompt="\U000f0000\ud800\udfff", metadata={COLLIDED: "\U000f07ff"})
def test_session_fields_are_taken_and_kept_exactly(
    name: str, prompt: str, metadata: dict[str, str]
) -> None:
    body = validated(SessionFields, {"session_name": name, "system_prompt": prompt,
                                     "metadata": metadata})
    assert (body.session_name, body.system_prompt, body.metadata) == (name, prompt, metadata)
    assert [type(k) for k in body.metadata] == [str] * len(metadata)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=6), key=TEXTS)
@example(texts=["plain", COLLIDED], key="\U000f0001\ud801")
def test_an_import_documents_text_is_taken_and_kept_exactly(texts: list[str], key: str) -> None:
    messages = [{"role": "user", "content": text, key or "k": text} for text in texts]
    doc = {"format": "chatproxy.session.v1", "session": {"session_name": texts[0]},
           "messages": messages}
    checked = validated(ImportDocument, doc)
    assert checked.session.session_name == texts[0]
    for message, text in zip(checked.messages, texts, strict=True):
        assert message.content == text
        assert message.model_extra == {key or "k": text}


def test_a_name_a_character_longer_than_the_limit_is_still_refused() -> None:
    # The stand-ins keep each string's length: limits hold as for any other text.
    at_limit = "\ud800\U000f0000" * (MAX_SESSION_NAME // 2)
    assert validated(SessionFields, {"session_name": at_limit}).session_name == at_limit
    try:
        validated(SessionFields, {"session_name": at_limit + "\udfff"})
    except ValueError as exc:  # pydantic's ValidationError
        assert "session_name" in str(exc)
    else:
        raise AssertionError("a name over the limit was taken")


@settings(max_examples=500, deadline=None)
@given(text=TEXTS)
@example(text="\x01" + COLLIDED)
def test_stored_text_unpacks_to_exactly_what_was_packed(text: str) -> None:
    packed = codec.pack_text(text)
    assert packed is not None and "\x00" not in packed
    packed.encode()  # PostgreSQL's text takes it: valid UTF-8
    assert codec.unpack_text(packed) == text


async def test_the_name_that_collided_is_taken_and_given_back(client: Any, alice: User) -> None:
    odd = COLLIDED
    body = json.dumps({"session_name": odd, "system_prompt": odd[::-1],
                       "metadata": {odd: odd}}, ensure_ascii=True)
    r = await client.post("/v1/chat/sessions", content=body,
                          headers={**alice.headers, "content-type": "application/json"})
    assert r.status_code == 201, r.text
    r = await client.get(f"/v1/chat/sessions/{r.json()['id']}", headers=alice.headers)
    got = json.loads(r.content)
    assert (got["session_name"], got["system_prompt"], got["metadata"]) == (
        odd, odd[::-1], {odd: odd})
