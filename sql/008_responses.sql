-- 008_responses: the Responses API's stored responses (contract §10).
--
-- A response is one turn: the input messages it keeps as history and its reply, each stored
-- exactly as a chat message is (`body` is the message as JSON text, see 001_init), with its
-- token count. A chain (`previous_response_id`) is read newest first by a recursive query:
-- the history of a response is the messages of every response up its chain. There is no
-- foreign key on `previous_response_id`: deleting a response ends the chains that pass through
-- it there, and leaves the later responses as they are.
--
-- A response made in a conversation also has its turn in `chat_messages` (the conversation is
-- a session); its own copy here is what `GET /v1/responses/{id}` and `input_items` show, so
-- that deleting a conversation item does not rewrite a response already given.

CREATE TABLE responses (
    id                    text PRIMARY KEY,               -- "resp_" + random
    user_id               text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    previous_response_id  text,
    session_id            text REFERENCES chat_sessions (id) ON DELETE SET NULL,
    status                text NOT NULL CHECK (status IN ('complete', 'incomplete')),
    finish_reason         text,                           -- the upstream's, when it gave one
    usage                 text,                           -- the upstream's usage as JSON text
    prompt_tokens         integer NOT NULL,               -- counted, for when it gave none
    settings              text NOT NULL,                  -- the request's settings echoed (JSON)
    message_count         integer NOT NULL,               -- rows in response_messages
    created_at            timestamptz NOT NULL DEFAULT now()
);
-- The retention job: responses older than the retention period.
CREATE INDEX responses_created_idx ON responses (created_at);

CREATE TABLE response_messages (
    response_id     text NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    ord             integer NOT NULL,                     -- input first; the reply is the last
    role            text NOT NULL,
    has_tool_calls  boolean NOT NULL,
    tokens          integer NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL CHECK (status IN ('complete', 'incomplete')),
    PRIMARY KEY (response_id, ord)
);
