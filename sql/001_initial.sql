-- Stoker schema, migration 001: migration versions, clusters, nodes, elections, the NOTIFY triggers, the fence.
--
-- Plain, idempotent SQL. Objects are created in the first schema of search_path: Stoker runs this file inside a
-- transaction after `SET LOCAL search_path TO <schema>, pg_temp`. To apply it by hand (psql, another migration
-- tool), do the same first:
--     CREATE SCHEMA IF NOT EXISTS stoker;
--     SET search_path TO stoker, pg_temp;
--     \i 001_initial.sql
--     INSERT INTO migrations (version, name, checksum)
--         VALUES (1, 'initial', '<sha256 hex of this file>') ON CONFLICT DO NOTHING;
-- Functions pin that search_path (SET search_path FROM CURRENT), so they work whatever the caller's is.
--
-- Notifications go to the channel '<schema>:<cluster id>' with a JSON payload; every payload is far below the
-- 8000-byte NOTIFY limit because names are at most 255 bytes.

CREATE TABLE IF NOT EXISTS migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,               -- sha256 (hex) of the migration file as applied
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per cluster name; its id keys the notification channel.
CREATE TABLE IF NOT EXISTS clusters (
    id    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name  text    NOT NULL UNIQUE CHECK (octet_length(name) BETWEEN 1 AND 255)
);

-- One row per node incarnation (one dedicated session). The row is live while its node lock, the advisory lock
-- (node namespace, id), is granted in pg_locks; a sweep deletes rows whose lock is gone.
CREATE TABLE IF NOT EXISTS nodes (
    id            integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster_id    integer     NOT NULL REFERENCES clusters (id),
    name          text        NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 255),
    host          text        NOT NULL DEFAULT '',
    pid           integer     NOT NULL,
    backend_pid   integer     NOT NULL DEFAULT pg_backend_pid(),
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    draining      boolean     NOT NULL DEFAULT false,
    metadata      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS nodes_cluster_id_idx ON nodes (cluster_id);

-- One row per election. Its leader holds the advisory lock (election namespace, id); term is the fencing token,
-- bumped by every new leader.
CREATE TABLE IF NOT EXISTS elections (
    id            integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster_id    integer     NOT NULL REFERENCES clusters (id),
    name          text        NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 255),
    term          bigint      NOT NULL DEFAULT 0,
    leader_node   integer,
    leader_name   text,
    leader_since  timestamptz,
    UNIQUE (cluster_id, name)
);

-- node_up / node_down, once per row, whoever inserted or deleted it.
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
        json_build_object('event', 'node_down', 'node', OLD.id, 'name', OLD.name)::text);
    RETURN OLD;
END
$$;

CREATE OR REPLACE TRIGGER nodes_notify
    AFTER INSERT OR DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION notify_node_change();

-- leader (a new term) and released (a graceful hand-over: leader_node cleared).
CREATE OR REPLACE FUNCTION notify_election_change() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.term IS DISTINCT FROM OLD.term THEN
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

CREATE OR REPLACE TRIGGER elections_notify
    AFTER UPDATE ON elections
    FOR EACH ROW EXECUTE FUNCTION notify_election_change();

-- The fence. Call it first in a transaction that writes on behalf of a leader:
--     SELECT stoker.fence('billing-prod', 'importer', 7);
-- It takes FOR SHARE on the election row, so it serialises against the next leader's term bump, and raises
-- SQLSTATE SK001 unless the term is current and the election has a leader: the transaction then rolls back.
-- SECURITY DEFINER so that callers need only EXECUTE on it (FOR SHARE would otherwise need UPDATE on elections);
-- safe because its search_path is pinned to this schema with pg_temp last.
CREATE OR REPLACE FUNCTION fence(p_cluster text, p_election text, p_term bigint) RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_term   bigint;
    v_leader integer;
BEGIN
    SELECT e.term, e.leader_node INTO v_term, v_leader
      FROM elections e JOIN clusters c ON c.id = e.cluster_id
     WHERE c.name = p_cluster AND e.name = p_election
       FOR SHARE OF e;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'stoker fence: election % does not exist in cluster %', quote_literal(p_election),
                        quote_literal(p_cluster)
            USING ERRCODE = 'SK001';
    END IF;
    IF v_term IS DISTINCT FROM p_term OR v_leader IS NULL THEN
        RAISE EXCEPTION 'stoker fence: term % of election % is stale (current term %, %)', p_term,
                        quote_literal(p_election), v_term,
                        CASE WHEN v_leader IS NULL THEN 'no leader' ELSE 'led by node ' || v_leader END
            USING ERRCODE = 'SK001',
                  HINT = 'This process no longer leads the election; roll the transaction back.';
    END IF;
    RETURN v_term;
END
$$;
REVOKE ALL ON FUNCTION fence(text, text, bigint) FROM PUBLIC;
