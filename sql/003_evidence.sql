-- Stoker schema, migration 003: the evidence rule — a successor begins only on evidence that its predecessor stopped
-- acting — and terms that never repeat, also after a failover to a standby that lost the last term bumps.
--
-- Every function keeps PostgreSQL's default EXECUTE for PUBLIC (none is SECURITY DEFINER: each runs as its caller, who
-- needs the table grants anyway), so a node role granted what 001 needed keeps working after this migration.
--
-- Applied like 001 (inside a transaction after `SET LOCAL search_path TO <schema>, pg_temp`; by hand, set the
-- search_path first and record version 3 in migrations).

-- Each node runs two sessions: the main one (election locks, LISTEN, heartbeats; its pid is backend_pid) and an idle
-- witness that holds the node lock (witness_pid). A crash closes both at once; when the server ends the main session
-- alone, the witness keeps the node lock until the node has ended its leaderships — then it closes it.
-- server_instance names the server the node joined (see server_instance()); replaces names the incarnation of the same
-- node this one follows (written after that incarnation ended its leaderships: its acknowledgement); lease_ms is the
-- node's lease.
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS witness_pid integer;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS server_instance text;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS replaces integer;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS lease_ms integer;
CREATE INDEX IF NOT EXISTS nodes_replaces_idx ON nodes (replaces) WHERE replaces IS NOT NULL;

-- server_instance(): which running server this session is on — the cluster's system identifier (shared by a primary
-- and its standbys) and the postmaster's start time (new on every restart; a promoted standby's differs from the old
-- primary's). A free node lock is evidence only on the server the node joined: a restart or a failover ends every
-- session, the witness too.
CREATE OR REPLACE FUNCTION server_instance() RETURNS text
    LANGUAGE sql
    STABLE
    SET search_path FROM CURRENT
AS $$
    SELECT (pg_control_system()).system_identifier::text || '/'
        || to_char(pg_postmaster_start_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
$$;

-- term_floor(): the lowest term this server may issue. The WAL timeline (the first 8 hex digits of the current WAL
-- file's name) rises with every promotion; terms issued on timeline t lie below t × 2^32 + 1, so the first bump on a
-- promoted standby is above every term its old primary issued — also the bumps that never reached the standby. On
-- timeline 1 the floor is 1: terms count 1, 2, 3, …
CREATE OR REPLACE FUNCTION term_floor() RETURNS bigint
    LANGUAGE sql
    VOLATILE
    SET search_path FROM CURRENT
AS $$
    SELECT ((('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint - 1) << 32) + 1
$$;

-- begin_term(election, term, node, name): the node that bumped `term` begins leading (→ the `leader` notification).
-- False when the term moved on meanwhile.
CREATE OR REPLACE FUNCTION begin_term(p_election integer, p_term bigint, p_node integer, p_name text) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE elections e
       SET leader_node = p_node, leader_name = p_name, leader_since = now()
     WHERE e.id = p_election AND e.term = p_term;
    RETURN FOUND;
END
$$;

-- take_term(namespace, election, node, name): the term bump of a node that just took the election's lock. The new term
-- is above the last one and at least term_floor(). Leadership begins in the same transaction (began) when there is
-- evidence that the previous leader stopped acting:
--   - it handed over (its release cleared leader_node), or
--   - it joined this very server and its node lock is free (its witness is gone: the process ended, or it ended its
--     leaderships and closed the witness).
-- Otherwise leader_node keeps naming the previous leader — a successor of this node that never began inherits the
-- same wait — and the caller waits for the evidence: await_predecessor() on the same server; else a row that replaces
-- the previous incarnation, or the previous node's lease (previous_lease_ms) run out.
-- previous_same_server is NULL when the previous leader's row is gone.
CREATE OR REPLACE FUNCTION take_term(p_namespace integer, p_election integer, p_node integer, p_name text)
    RETURNS TABLE (term bigint, began boolean, previous_node integer, previous_same_server boolean,
                   previous_lease_ms integer)
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_previous integer;
    v_same     boolean;
    v_lease    integer;
    v_began    boolean;
    v_term     bigint;
BEGIN
    -- A term must survive a crash of the server: never commit it asynchronously.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    SELECT e.leader_node INTO v_previous FROM elections e WHERE e.id = p_election FOR UPDATE;
    IF v_previous IS NULL OR v_previous = p_node THEN
        v_began := true;
    ELSE
        SELECT n.server_instance = server_instance(), n.lease_ms INTO v_same, v_lease
          FROM nodes n WHERE n.id = v_previous;
        -- Never a lock this session holds (advisory locks stack): the node lock of another node is held by its witness.
        v_began := coalesce(v_same, false) AND pg_try_advisory_lock(p_namespace, v_previous);
        IF v_began THEN
            PERFORM pg_advisory_unlock(p_namespace, v_previous);
        END IF;
    END IF;
    UPDATE elections e
       SET term = greatest(e.term + 1, term_floor()),
           leader_node = CASE WHEN v_began THEN p_node ELSE e.leader_node END,
           leader_name = CASE WHEN v_began THEN p_name ELSE e.leader_name END,
           leader_since = CASE WHEN v_began THEN now() ELSE e.leader_since END
     WHERE e.id = p_election
    RETURNING e.term INTO v_term;
    RETURN QUERY SELECT v_term, v_began, CASE WHEN v_began THEN NULL ELSE v_previous END,
                        CASE WHEN v_began THEN NULL ELSE v_same END, CASE WHEN v_began THEN NULL ELSE v_lease END;
END
$$;

-- await_predecessor(namespace, previous, timeout_ms, election, term, node, name): waits at most timeout_ms in the
-- queue of the previous leader's node lock; once granted (the witness is gone) releases it at once and begins the
-- term. True: leading; false: still waiting; NULL: the term moved on meanwhile.
CREATE OR REPLACE FUNCTION await_predecessor(
    p_namespace integer, p_previous integer, p_timeout_ms integer,
    p_election integer, p_term bigint, p_node integer, p_name text) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF NOT wait_for_lock(p_namespace, p_previous, p_timeout_ms) THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_unlock(p_namespace, p_previous);
    IF begin_term(p_election, p_term, p_node, p_name) THEN
        RETURN true;
    END IF;
    RETURN NULL;
END
$$;

-- leader: a leadership began (leader_since set anew, leader_node not NULL) — not at the term bump, which may precede
-- it while the new leader waits for evidence. released: a graceful hand-over (leader_node cleared).
CREATE OR REPLACE FUNCTION notify_election_change() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.leader_node IS NOT NULL AND NEW.leader_since IS DISTINCT FROM OLD.leader_since THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || ':' || NEW.cluster_id,
            json_build_object('event', 'leader', 'election', NEW.id, 'name', NEW.name,
                              'term', NEW.term, 'node', NEW.leader_node)::text);
    ELSIF OLD.leader_node IS NOT NULL AND NEW.leader_node IS NULL THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || ':' || NEW.cluster_id,
            json_build_object('event', 'released', 'election', NEW.id, 'name', NEW.name, 'term', NEW.term)::text);
    END IF;
    RETURN NEW;
END
$$;
