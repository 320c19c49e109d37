-- 003_idempotency: Idempotency-Key records for /v1/chat/completions.
--
-- A key is scoped to its user. While the first request runs the row is 'running' (a retry gets
-- 409); once its turn is stored the row holds the exact response (a retry replays it). The row
-- is written in the same transaction as the turn, so a replayed response always has its turn.
-- Rows older than 24 hours are dead: a new request may claim the key again, and the retention
-- job deletes them.

CREATE TABLE idempotency_keys (
    user_id       text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,                 -- sha256 of the session id and the raw body
    state         text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    status_code   integer,
    headers       jsonb,                          -- the response headers to replay
    body          bytea,                          -- the response body exactly as sent
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
