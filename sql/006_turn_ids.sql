-- 006_turn_ids: every stored turn recorded by an id of its own.
--
-- A turn's write is one statement (proxy/store/messages.py `store_turn`). When its connection
-- dies after the statement was sent, the write cannot know whether it committed, and retries
-- once on a fresh connection. The retry must store the turn only if the first attempt did
-- not: so the statement also inserts the turn's id (made by the writer, the same for both
-- attempts) here, and a retry whose first attempt committed fails on this primary key and
-- stores nothing. A turn is recognised by its id, never by its content: a turn that repeats
-- the previous one word for word is a new turn.
--
-- The ids are time-ordered (a millisecond clock, then random bits), so each insert lands at
-- the right edge of the index. A row is needed only while a retry may come, seconds after its
-- write; the retention job deletes rows older than an hour.

CREATE TABLE chat_turns (
    turn_id     uuid PRIMARY KEY,
    stored_at   timestamptz NOT NULL DEFAULT now()
);

-- An Idempotency-Key's claim, by a token of its own (proxy/store/idempotency.py): only the
-- request holding the claim settles or releases it, so a request that could not tell whether
-- its claim went in (the connection died) can give it back without touching another's, and a
-- request whose claim went stale and was taken over settles nothing. Claims made before this
-- column existed have none; they are released when they go stale, as before. Adding a
-- nullable column rewrites nothing.
ALTER TABLE idempotency_keys ADD COLUMN claim uuid;
