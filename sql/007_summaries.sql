-- 007_summaries: a session's summary of its earlier messages (contract §11), and the state of
-- the background job that writes it (proxy/summaries.py).
--
-- One row per session, made by the first summary job that runs for it. `text` is the summary,
-- stored like any session text (`pack_text`: characters PostgreSQL cannot keep come back
-- exactly); it is NULL while the job has only failed so far. `up_to_seq` is the newest seq the
-- summary covers; `tokens` what the summary costs in a turn (the whole system message that
-- carries it). After a failure the job backs off until `retry_after`, doubling with each
-- failure in a row (`failures`); a stored summary resets both.
--
-- The turn's read (proxy/store/messages.py) joins this row by its primary key. Deleting a
-- session's messages (clear) deletes its row; purging the session cascades.

CREATE TABLE chat_summaries (
    session_id   text PRIMARY KEY REFERENCES chat_sessions (id) ON DELETE CASCADE,
    text         text,
    up_to_seq    bigint NOT NULL DEFAULT 0 CHECK (up_to_seq >= 0),
    tokens       integer NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    model        text,
    updated_at   timestamptz,
    failures     integer NOT NULL DEFAULT 0,
    retry_after  timestamptz
);
