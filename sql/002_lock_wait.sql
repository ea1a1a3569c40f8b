-- Stoker schema, migration 002: the follower's wait in an election's lock queue (DESIGN §5), and a term bump that
-- tells whether the previous leader handed over.
--
-- Both keep PostgreSQL's default EXECUTE for PUBLIC: neither is SECURITY DEFINER (wait_for_lock takes an advisory
-- lock, which any role may; bump_term runs as its caller, who needs UPDATE on elections anyway), and a node role
-- granted what 001 needed keeps working after this migration.
--
-- Applied like 001 (inside a transaction after `SET LOCAL search_path TO <schema>, pg_temp`; by hand, set the
-- search_path first and record version 2 in migrations).
--
-- wait_for_lock(namespace, key, timeout_ms) waits at most timeout_ms in the queue of the session-level advisory lock
-- (namespace, key) and returns whether this session holds it now. Running into the timeout is not an error: no
-- server log line, no rolled-back transaction for each of a follower's waits. And when PostgreSQL grants the lock in
-- the very moment the timeout fires, it returns true: the lock is held (session locks outlive the error), and a
-- caller that took "timed out" for "not granted" would take it a second time — advisory locks stack, and one unlock
-- would no longer free it. Never call it for a lock the session already holds.
CREATE OR REPLACE FUNCTION wait_for_lock(p_namespace integer, p_key integer, p_timeout_ms integer) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM set_config('lock_timeout', p_timeout_ms::text, true);
    PERFORM pg_advisory_lock(p_namespace, p_key);
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN EXISTS (
        SELECT FROM pg_locks
         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
           AND classid = p_namespace::oid AND objid = p_key::oid AND objsubid = 2);
END
$$;

-- bump_term(election, node, name): the new leader's term bump, once it holds the election's lock. Returns the new
-- term and the previous leader's node id as the row held it — NULL when the previous leader handed over (its release
-- cleared it), a node id when that leadership ended without a hand-over (a crash, or the server ending the session).
-- The row is locked first, so a hand-over still committing is waited for and seen.
CREATE OR REPLACE FUNCTION bump_term(p_election integer, p_node integer, p_name text)
    RETURNS TABLE (term bigint, previous_node integer)
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_previous integer;
    v_term     bigint;
BEGIN
    SELECT e.leader_node INTO v_previous FROM elections e WHERE e.id = p_election FOR UPDATE;
    UPDATE elections e
       SET term = e.term + 1, leader_node = p_node, leader_name = p_name, leader_since = now()
     WHERE e.id = p_election
    RETURNING e.term INTO v_term;
    RETURN QUERY SELECT v_term, v_previous;
END
$$;
