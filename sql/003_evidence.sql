-- Stoker schema, migration 003: the evidence rule — a successor begins only on evidence that its predecessor stopped
-- acting — and terms that never repeat, also after a failover to a standby that lost the last term bumps.
--
-- Every function keeps PostgreSQL's default EXECUTE for PUBLIC, so a node role granted what 001 needed keeps working
-- after this migration. server_instance() and term_floor() are SECURITY DEFINER (search_path pinned, pg_temp last):
-- they keep one-row tables of their own that no node role needs a grant on.
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

-- written_on: the server instance on which the leader fields were last written (a leadership began). Its first two
-- parts (system identifier, timeline) name the history it was written in: a restart or a crash recovery keeps what was
-- committed (node sessions commit at least flushed locally), but a failover to an asynchronous standby can lose the
-- last writes, so a row written on another timeline proves nothing about who led last. leader_lease_ms: the lease of the node that began the current (or last) leadership.
ALTER TABLE elections ADD COLUMN IF NOT EXISTS written_on text;
ALTER TABLE elections ADD COLUMN IF NOT EXISTS leader_lease_ms integer;

-- A token that lives as long as the server's shared state: unlogged, so crash recovery (after any backend crashed,
-- without a postmaster restart) empties it, and a promoted standby starts without it.
CREATE UNLOGGED TABLE IF NOT EXISTS server_epoch (
    id     integer PRIMARY KEY CHECK (id = 1),
    token  text    NOT NULL
);

-- Which band of terms this cluster issues: terms issued at (system_identifier, timeline) lie in [floor, floor + 2^32).
CREATE TABLE IF NOT EXISTS term_band (
    id                 integer PRIMARY KEY CHECK (id = 1),
    system_identifier  text    NOT NULL,
    timeline           bigint  NOT NULL,
    floor              bigint  NOT NULL
);

-- server_instance(): which running server this session is on, as system/timeline/start/token — the cluster's system
-- identifier (shared by a primary and its standbys), the WAL timeline (new with every promotion), the postmaster's
-- start time (new on every restart) and the epoch token (new after crash recovery, which keeps the postmaster). A free
-- node lock is evidence only on the server the node joined: a restart, a crash recovery or a failover ends every
-- session, the witness too.
-- A session never outlives its server instance (a restart, a crash recovery or a promotion ends it), so the answer is
-- kept for the session in a setting of its own (one per Stoker schema).
CREATE OR REPLACE FUNCTION server_instance() RETURNS text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_key   text := 'stoker.instance_' || (SELECT n.oid FROM pg_namespace n WHERE n.nspname = current_schema())::text;
    v_value text := current_setting(v_key, true);
    v_token text;
BEGIN
    IF v_value IS NOT NULL AND v_value <> '' THEN
        RETURN v_value;
    END IF;
    SELECT s.token INTO v_token FROM server_epoch s WHERE s.id = 1;
    IF NOT FOUND THEN
        INSERT INTO server_epoch (id, token) VALUES (1, gen_random_uuid()::text) ON CONFLICT (id) DO NOTHING;
        SELECT s.token INTO v_token FROM server_epoch s WHERE s.id = 1;
    END IF;
    v_value := (pg_control_system()).system_identifier::text || '/'
        || ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint::text || '/'
        || to_char(pg_postmaster_start_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '/' || v_token;
    PERFORM set_config(v_key, v_value, false);
    RETURN v_value;
END
$$;

-- term_floor(): the lowest term this server may issue. The WAL timeline (the first 8 hex digits of the current WAL
-- file's name) rises with every promotion, and each timeline gets a band of 2^32 terms above the last: the first bump
-- on a promoted standby is above every term its old primary issued — also the bumps that never reached the standby.
-- A new system identifier (pg_upgrade resets the timeline, a restore makes a new cluster; nothing is lost then) starts
-- the band above the highest term. On a fresh cluster's timeline 1 the floor is 1: terms count 1, 2, 3, …
CREATE OR REPLACE FUNCTION term_floor() RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_system   text   := (pg_control_system()).system_identifier::text;
    v_timeline bigint := ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint;
    v_highest  bigint;
    v_band     term_band%ROWTYPE;
    v_floor    bigint;
BEGIN
    SELECT * INTO v_band FROM term_band b WHERE b.id = 1;
    IF v_band.id IS NOT NULL AND v_band.system_identifier = v_system AND v_band.timeline = v_timeline THEN
        RETURN v_band.floor;
    END IF;
    SELECT coalesce(max(e.term), 0) INTO v_highest FROM elections e;
    IF v_band.id IS NOT NULL AND v_band.system_identifier = v_system AND v_band.timeline < v_timeline THEN
        -- Promoted: a band per timeline crossed.
        v_floor := v_band.floor + ((v_timeline - v_band.timeline) << 32);
    ELSE
        -- First use, or another system: this timeline's own band, unless terms already reach it.
        v_floor := ((v_timeline - 1) << 32) + 1;
        IF v_highest >= v_floor OR v_band.floor IS NOT NULL THEN
            v_floor := greatest(v_floor, coalesce(v_band.floor, 0), ((v_highest >> 32) + 1 << 32) + 1);
        END IF;
    END IF;
    INSERT INTO term_band (id, system_identifier, timeline, floor) VALUES (1, v_system, v_timeline, v_floor)
        ON CONFLICT (id) DO UPDATE
        SET system_identifier = excluded.system_identifier, timeline = excluded.timeline,
            floor = greatest(term_band.floor, excluded.floor);
    SELECT b.floor INTO v_floor FROM term_band b WHERE b.id = 1;
    RETURN v_floor;
END
$$;

-- wait_for_lock(namespace, key, timeout_ms), as in 002, cheaper: waits at most timeout_ms in the queue of the
-- session-level advisory lock (namespace, key) and returns whether this session holds it now (exactly once). A timeout
-- is no error; while the holder lives a try-lock tells so without reading pg_locks; pg_locks is read only when the
-- lock came free in the instant of the timeout (then it may have been granted as well). lock_timeout is as before
-- afterwards. Never call it for a lock the session already holds.
CREATE OR REPLACE FUNCTION wait_for_lock(p_namespace integer, p_key integer, p_timeout_ms integer) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    BEGIN
        PERFORM set_config('lock_timeout', p_timeout_ms::text, true);
        PERFORM pg_advisory_lock(p_namespace, p_key);
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
        RETURN true;
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    IF NOT pg_try_advisory_lock(p_namespace, p_key) THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_unlock(p_namespace, p_key);
    IF EXISTS (
        SELECT FROM pg_locks
         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
           AND classid = p_namespace::oid AND objid = p_key::oid AND objsubid = 2)
    THEN
        RETURN true;
    END IF;
    RETURN pg_try_advisory_lock(p_namespace, p_key);
END
$$;

-- begin_term(election, term, node, name): the node that bumped `term` begins leading (→ the `leader` notification).
-- False when the term moved on meanwhile.
CREATE OR REPLACE FUNCTION begin_term(p_election integer, p_term bigint, p_node integer, p_name text) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE elections e
       SET leader_node = p_node, leader_name = p_name, leader_since = now(), written_on = server_instance(),
           leader_lease_ms = (SELECT n.lease_ms FROM nodes n WHERE n.id = p_node)
     WHERE e.id = p_election AND e.term = p_term;
    RETURN FOUND;
END
$$;

-- take_term(namespace, election, node, name, wait_ms): the term bump of a node that just took the election's lock.
-- The new term is above the last one and at least term_floor(). Leadership begins in the same transaction (began) when
-- there is evidence that the previous leader stopped acting:
--   - it handed over (its release cleared leader_node), or
--   - it joined this very server and its node lock comes free within wait_ms (its witness is gone: the process ended,
--     or it ended its leaderships and closed the witness; after a crash its witness backend may exit a moment after
--     its main one).
-- Otherwise leader_node keeps naming the previous leader — a successor of this node that never began inherits the same
-- wait — and the caller waits for the evidence: await_predecessor() on the same server; after a restart or a crash
-- recovery a row that replaces the previous incarnation (its acknowledgement), or the lease run out. When the row was
-- written on another timeline (a failover, which may have lost the last leader) or before this migration, nobody it
-- names can be trusted to be the last leader: previous_node is NULL and only the lease counts. previous_lease_ms: the
-- longest lease the previous leader or any member may have.
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
            SELECT coalesce(n.server_instance = v_here, false) INTO v_same FROM nodes n WHERE n.id = v_previous;
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

-- wait_and_take(namespace, election, timeout_ms, node, name, others): the election's waiter (this session holds its
-- waiter token) waits in its lock queue (wait_for_lock), and when granted gives the token back and bumps the term
-- (take_term) in the same statement — and then, since the holder is
-- likely gone from its other elections too, a try of `others` (election ids), each won one bumped as well. One row per
-- election: the waited one first (granted false and the rest NULL when the wait timed out), then each other one won.
-- Never pass an election whose lock this session holds.
CREATE OR REPLACE FUNCTION wait_and_take(
    p_namespace integer, p_election integer, p_timeout_ms integer, p_node integer, p_name text, p_others integer[])
    RETURNS TABLE (election integer, granted boolean, term bigint, began boolean, previous_node integer,
                   previous_same_server boolean, previous_lease_ms integer)
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_other integer;
BEGIN
    IF NOT wait_for_lock(p_namespace, -p_election, p_timeout_ms) THEN
        RETURN QUERY SELECT p_election, false, NULL::bigint, NULL::boolean, NULL::integer, NULL::boolean, NULL::integer;
        RETURN;
    END IF;
    -- This session waited as the election's waiter (claim_waiter): the token goes back before the commit announces the
    -- new leadership, so the next follower can take it at once.
    PERFORM pg_advisory_unlock(p_namespace, -1073741824 - p_election);
    RETURN QUERY SELECT p_election, true, t.term, t.began, t.previous_node, t.previous_same_server, t.previous_lease_ms
                   FROM take_term(p_namespace, p_election, p_node, p_name, 25) AS t;
    FOREACH v_other IN ARRAY coalesce(p_others, '{}') LOOP
        IF pg_try_advisory_lock(p_namespace, -v_other) THEN
            RETURN QUERY SELECT v_other, true, t.term, t.began, t.previous_node, t.previous_same_server,
                                t.previous_lease_ms
                           FROM take_term(p_namespace, v_other, p_node, p_name, 0) AS t;
        END IF;
    END LOOP;
END
$$;

-- await_predecessor(namespace, previous, timeout_ms, election, term, node, name): waits at most timeout_ms in the
-- queue of the previous leader's node lock; once granted (its witness is gone) releases it at once and begins the
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

-- claim_waiter(namespace, elections): one follower per election waits in its lock queue; the others stay free for
-- notifications and poll rarely. Tries the waiter token of each election in order — advisory lock (namespace,
-- −2^30 − election id), apart from node locks (+id) and election locks (−id) — and returns the first one this session
-- took, or NULL. Never pass an election whose token this session holds.
CREATE OR REPLACE FUNCTION claim_waiter(p_namespace integer, p_elections integer[]) RETURNS integer
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_election integer;
BEGIN
    FOREACH v_election IN ARRAY coalesce(p_elections, '{}') LOOP
        CONTINUE WHEN v_election >= 1073741823;
        IF pg_try_advisory_lock(p_namespace, -1073741824 - v_election) THEN
            RETURN v_election;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- hand_over(namespace, election, node): a graceful release in one round trip — clears the election's leader if it is
-- this node (that is the successor's evidence), then unlocks; returns whether the lock was held. A successor granted
-- the lock by the unlock waits in take_term for this statement's commit (the row is locked first), so it sees the
-- leader cleared.
CREATE OR REPLACE FUNCTION hand_over(p_namespace integer, p_election integer, p_node integer) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE elections e
       SET leader_node = NULL, leader_name = NULL, leader_since = NULL
     WHERE e.id = p_election AND e.leader_node = p_node;
    RETURN pg_advisory_unlock(p_namespace, -p_election);
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
