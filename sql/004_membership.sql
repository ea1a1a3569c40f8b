-- Stoker schema, migration 004: membership — every death is reported once (node_down with a reason), whichever node
-- swept it.
--
-- Every function keeps PostgreSQL's default EXECUTE for PUBLIC, so a node role granted what 001-003 needed keeps
-- working after this migration.
--
-- Applied like 001 (inside a transaction after `SET LOCAL search_path TO <schema>, pg_temp`; by hand, set the
-- search_path first and record version 4 in migrations).

-- node_up / node_down, once per row, whoever inserted or deleted it. node_down says why the row went:
--   left     the node left gracefully (leave_node);
--   died     its node lock was no longer held — its witness session ended: the process died, froze or was cut off
--            past its lease, or its session was killed — and a sweep removed it;
--   removed  anything else (an administrator's DELETE).
CREATE OR REPLACE FUNCTION notify_node_change() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || ':' || NEW.cluster_id,
            json_build_object('event', 'node_up', 'node', NEW.id, 'name', NEW.name)::text);
        RETURN NEW;
    END IF;
    PERFORM pg_notify(TG_TABLE_SCHEMA || ':' || OLD.cluster_id,
        json_build_object('event', 'node_down', 'node', OLD.id, 'name', OLD.name,
                          'reason', coalesce(nullif(current_setting('stoker.node_down_reason', true), ''),
                                             'removed'))::text);
    RETURN OLD;
END
$$;

-- leave_node(node): a graceful leave — deletes the node's row (node_down, reason left); returns whether it was there.
CREATE OR REPLACE FUNCTION leave_node(p_node integer) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM set_config('stoker.node_down_reason', 'left', true);
    DELETE FROM nodes n WHERE n.id = p_node;
    RETURN FOUND;
END
$$;

-- sweep(): deletes the rows, of every cluster of the schema, whose node lock — advisory lock (namespace, id), held by
-- the node's witness session — is no longer granted (node_down, reason died, on each cluster's channel; once: the
-- DELETE decides who saw it), and returns how many. The namespace is this schema's (the lock keys' first half), never
-- the caller's word. pg_locks is read once (it takes every lock-partition lock of the server): one node of the schema
-- sweeps — the holder of the sweeper token, advisory lock (namespace, -2^31), apart from node locks (+id), election
-- locks (-id) and waiter tokens (-2^30 - id) — so the schema sweeps a bounded number of times per interval however many
-- nodes and clusters it has. A row is visible only once its witness holds its lock (the join inserts it and takes the
-- lock in one transaction, and the statement's snapshot is taken before pg_locks is read), so a joining node is never
-- swept. The sweep touches no election: a successor holding a swept leader's election lock begins on the same evidence
-- as always (take_term, below).
CREATE OR REPLACE FUNCTION sweep() RETURNS integer
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_namespace oid := current_schema()::regnamespace::oid;
    v_count     integer;
BEGIN
    PERFORM set_config('stoker.node_down_reason', 'died', true);
    WITH held AS MATERIALIZED (
        SELECT l.objid::bigint AS id
          FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
           AND l.classid = v_namespace
    ), dead AS (
        DELETE FROM nodes n
         WHERE n.id::bigint NOT IN (SELECT h.id FROM held h)
        RETURNING n.id
    )
    SELECT count(*) INTO v_count FROM dead;
    RETURN v_count;
END
$$;

-- take_term, as in 003, with one change: whether the previous leader joined this server instance is read from where
-- its leadership was written (written_on, all four parts), not from its row — which a sweep deletes once its node lock
-- is gone. A successor of a swept leader thus still begins on its free node lock, at once, instead of waiting for an
-- acknowledgement or a lease.
CREATE OR REPLACE FUNCTION take_term(
    p_namespace integer, p_election integer, p_node integer, p_name text, p_wait_ms integer)
    RETURNS TABLE (term bigint, began boolean, previous_node integer, previous_same_server boolean,
                   previous_lease_ms integer)
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_here     text := server_instance();
    v_election elections%ROWTYPE;
    v_durable  boolean;
    v_previous integer;
    v_same     boolean := false;
    v_free     boolean := false;
    v_began    boolean := false;
    v_lease    integer;
    v_term     bigint;
BEGIN
    -- A term must survive a crash of the server: never commit it asynchronously.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    SELECT * INTO v_election FROM elections e WHERE e.id = p_election FOR UPDATE;
    v_durable := v_election.term = 0
        OR (split_part(v_election.written_on, '/', 1) = split_part(v_here, '/', 1)
            AND split_part(v_election.written_on, '/', 2) = split_part(v_here, '/', 2));
    IF coalesce(v_durable, false) THEN
        v_previous := v_election.leader_node;
        IF v_previous IS NULL OR v_previous = p_node THEN
            v_began := true;
        ELSE
            -- Its leadership began on this very server instance (written_on is written by the main session that
            -- began it) — whether or not its row is still there: a sweep deletes the row of a node whose node lock is
            -- gone, which is the evidence itself.
            v_same := v_election.written_on = v_here;
            -- Never a lock this session holds (advisory locks stack): another node's lock is held by its witness.
            IF coalesce(v_same, false) THEN
                IF p_wait_ms > 0 THEN
                    v_free := wait_for_lock(p_namespace, v_previous, p_wait_ms);
                ELSE
                    v_free := pg_try_advisory_lock(p_namespace, v_previous);
                END IF;
                IF v_free THEN
                    PERFORM pg_advisory_unlock(p_namespace, v_previous);
                    v_began := true;
                END IF;
            END IF;
        END IF;
    END IF;
    IF NOT v_began THEN
        SELECT greatest(v_election.leader_lease_ms, max(n.lease_ms)) INTO v_lease
          FROM nodes n WHERE n.cluster_id = v_election.cluster_id;
    END IF;
    -- The bump, and when the evidence is in, the begin (as begin_term does) in the same row update.
    UPDATE elections e
       SET term = greatest(e.term + 1, term_floor()),
           leader_node = CASE WHEN v_began THEN p_node ELSE e.leader_node END,
           leader_name = CASE WHEN v_began THEN p_name ELSE e.leader_name END,
           leader_since = CASE WHEN v_began THEN now() ELSE e.leader_since END,
           written_on = CASE WHEN v_began THEN v_here ELSE e.written_on END,
           leader_lease_ms = CASE WHEN v_began THEN (SELECT n.lease_ms FROM nodes n WHERE n.id = p_node)
                                  ELSE e.leader_lease_ms END
     WHERE e.id = p_election
    RETURNING e.term INTO v_term;
    RETURN QUERY SELECT v_term, v_began, CASE WHEN v_began THEN NULL ELSE v_previous END,
                        CASE WHEN v_began THEN NULL ELSE coalesce(v_same, false) END,
                        CASE WHEN v_began THEN NULL ELSE v_lease END;
END
$$;
