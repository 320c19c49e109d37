-- 001_init: users, API keys, chat sessions and their messages.
--
-- Client-supplied text is stored so that it comes back character for character. PostgreSQL's
-- `text` and `jsonb` refuse the NUL character and lone surrogates, so:
--   * a message is kept whole in `chat_messages.body` as JSON text whose string escapes
--     (\u0000, \ud800) keep such characters as plain ASCII; it is spliced into upstream
--     requests and API answers without being re-encoded;
--   * session text columns and metadata strings are stored as-is when PostgreSQL can keep them,
--     and otherwise as "\x01" + a JSON string literal (see proxy/store.py, `pack_text`).

CREATE TABLE users (
    id          text PRIMARY KEY,                 -- "user_" + random
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,                 -- "key_" + random
    user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash    bytea NOT NULL UNIQUE,            -- sha256 of the whole key; the key is never stored
    prefix      text NOT NULL,                    -- the first characters, for display
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at);

CREATE TABLE chat_sessions (
    id                    text PRIMARY KEY,       -- "sess_" + random
    user_id               text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_name          text,
    model                 text,
    system_prompt         text,
    max_history_messages  integer NOT NULL CHECK (max_history_messages BETWEEN 0 AND 1000),
    max_history_tokens    integer CHECK (max_history_tokens >= 0),
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    message_count         integer NOT NULL DEFAULT 0,
    total_tokens          bigint NOT NULL DEFAULT 0,
    next_seq              bigint NOT NULL DEFAULT 1,  -- the seq the next stored message gets
    is_active             boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    last_message_at       timestamptz,
    deleted_at            timestamptz
);
-- The session list: a user's sessions, most recent activity first.
CREATE INDEX chat_sessions_user_activity_idx
    ON chat_sessions (user_id, (COALESCE(last_message_at, created_at)) DESC, id DESC);

CREATE TABLE chat_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    session_id  text NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    role        text NOT NULL,
    has_tool_calls boolean NOT NULL DEFAULT false, -- an assistant message that opens a tool exchange
    body        text NOT NULL,                     -- the message as JSON text (see above)
    tokens      integer NOT NULL,
    status      text NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'incomplete')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The newest-N read walks this index backwards from the end of one session, so its cost
    -- does not grow with the session's length.
    PRIMARY KEY (session_id, seq)
);
CREATE UNIQUE INDEX chat_messages_id_idx ON chat_messages (id);
