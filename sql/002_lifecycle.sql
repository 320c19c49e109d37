-- 002_lifecycle: indexes for the retention job (proxy/retention.py).
--
-- A session's last activity is `updated_at`: every write to a session sets it (a turn, an
-- update, a soft delete, a restore, a clear, a merge into it), and it starts at `created_at`.
-- The job deletes sessions whose `updated_at`, or whose `deleted_at` for soft-deleted ones, is
-- older than the cutoff, a small batch at a time; these indexes let each batch find its rows
-- without scanning the table.

CREATE INDEX chat_sessions_updated_idx ON chat_sessions (updated_at);

CREATE INDEX chat_sessions_deleted_idx ON chat_sessions (deleted_at) WHERE deleted_at IS NOT NULL;
