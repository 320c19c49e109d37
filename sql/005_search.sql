-- 005_search: full-text search over stored messages and session names; list filters.
-- chatproxy: no transaction
--
-- The line above makes the runner (proxy/migrate.py) run each statement of this file on its
-- own, outside a transaction: `CREATE INDEX CONCURRENTLY` cannot run inside one, and it is what
-- keeps writes flowing while an index is built over a table that already holds messages. Each
-- statement may run again after a failure (a half-built index from a failed run is dropped
-- and built anew), so the file is recorded only once all of it has run.
--
-- `search` holds the words of a message's text (its text content and its tool calls'
-- arguments) or of a session's name, as a position-less tsvector whose lexemes are exactly
-- what proxy/searchtext.py computes (case-folded Unicode words, split at every character that
-- is not a letter or a digit). The words are computed in Python, not by PostgreSQL's text
-- parser: a message body is JSON text that may hold characters `jsonb` refuses (NUL, lone
-- surrogates), and case folding must not depend on the database's locale. Turns write it in
-- the same statement that stores them. Rows stored before this migration have NULL, and the
-- server fills them in small batches in the background (proxy/searchstore.py `backfill`),
-- which the partial `*_unsearched_idx` indexes let it find without scanning the table.
--
-- Adding a nullable column without a default rewrites nothing: it takes its lock for an
-- instant.

ALTER TABLE chat_messages ADD COLUMN IF NOT EXISTS search tsvector;

ALTER TABLE chat_sessions ADD COLUMN IF NOT EXISTS search tsvector;

-- Search: which messages hold every word of the query (words matched as prefixes, `w:*`).
DROP INDEX CONCURRENTLY IF EXISTS chat_messages_search_idx;
CREATE INDEX CONCURRENTLY chat_messages_search_idx ON chat_messages USING gin (search);

-- The backfill's work list: messages and sessions not indexed yet (empty once it is done).
DROP INDEX CONCURRENTLY IF EXISTS chat_messages_unsearched_idx;
CREATE INDEX CONCURRENTLY chat_messages_unsearched_idx ON chat_messages (id)
    WHERE search IS NULL;

DROP INDEX CONCURRENTLY IF EXISTS chat_sessions_unsearched_idx;
CREATE INDEX CONCURRENTLY chat_sessions_unsearched_idx ON chat_sessions (id)
    WHERE search IS NULL;

-- The session list filtered by `model=`, in the list's own order, so a page is a walk of the
-- index whatever the page's depth (the unfiltered list has chat_sessions_user_activity_idx).
DROP INDEX CONCURRENTLY IF EXISTS chat_sessions_user_model_activity_idx;
CREATE INDEX CONCURRENTLY chat_sessions_user_model_activity_idx
    ON chat_sessions (user_id, model, (COALESCE(last_message_at, created_at)) DESC, id DESC);

-- The session list filtered by `metadata.KEY=VALUE` (`metadata @> '{"KEY": "VALUE"}'`).
DROP INDEX CONCURRENTLY IF EXISTS chat_sessions_metadata_idx;
CREATE INDEX CONCURRENTLY chat_sessions_metadata_idx
    ON chat_sessions USING gin (metadata jsonb_path_ops);
