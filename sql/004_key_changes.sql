-- 004_key_changes: every change to api_keys is announced on the channel `chatproxy_keys`.
--
-- Servers keep the keys they verified in memory and drop them all when this arrives
-- (proxy/keylease.py). Statement-level, so one revocation is one notification; the payload is
-- empty (no key material leaves the table). A notification is sent only if the change commits.

CREATE FUNCTION chatproxy_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('chatproxy_keys', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION chatproxy_keys_changed();
