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

-- sweep(namespace, cluster): deletes the rows of the cluster whose node lock — advisory lock (namespace, id), held by
-- the node's witness session — is no longer granted (node_down, reason died, once: the DELETE decides who saw it), and
-- returns how many. pg_locks is read once (it takes every lock-partition lock of the server: the cluster sweeps a
-- bounded number of times per interval, not once per node). A row is visible only once its witness holds its lock (the
-- join inserts it and takes the lock in one transaction), so a joining node is never swept.
--
-- A swept node that joined this very server instance stops being named leader of the elections it led (leader_node
-- cleared, which sends released): its node lock gone is the evidence that it stopped acting (it ends its leaderships
-- before it lets its witness go; a crash ends both), as take_term() would find it, and the next leader begins without
-- waiting — at once, on the notification, also where no follower was waiting in the election's queue. One that joined
-- another instance (before a restart or a failover) keeps being named: its successor waits for its acknowledgement or
-- its lease, as before.
CREATE OR REPLACE FUNCTION sweep(p_namespace integer, p_cluster integer) RETURNS integer
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_here  text := server_instance();
    v_count integer;
BEGIN
    PERFORM set_config('stoker.node_down_reason', 'died', true);
    WITH held AS MATERIALIZED (
        SELECT l.objid::bigint AS id
          FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
           AND l.classid = p_namespace::oid
    ), dead AS (
        DELETE FROM nodes n
         WHERE n.cluster_id = p_cluster AND n.id::bigint NOT IN (SELECT h.id FROM held h)
        RETURNING n.id, n.server_instance
    ), cleared AS (
        UPDATE elections e
           SET leader_node = NULL, leader_name = NULL, leader_since = NULL
          FROM dead d
         WHERE e.leader_node = d.id AND e.cluster_id = p_cluster AND d.server_instance = v_here
        RETURNING e.id
    )
    SELECT count(*) INTO v_count FROM dead;
    RETURN v_count;
END
$$;
