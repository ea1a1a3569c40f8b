-- Stoker schema, migration 005: triggers — a wake-up with a payload for an election's leader, sent by any process.
--
-- A trigger is a row, kept until a leader of its election has handled it (then that leader deletes it), so one sent
-- while nobody leads reaches the next leader; the notification only wakes the leader. Delivery is at least once (a
-- leader that ends before deleting what it handled leaves it to the next one) and in order per election: each
-- election numbers its triggers in the order their sends commit — 1, 2, 3, … and, like terms, above every number the
-- old primary gave after a promotion (term_floor()), so a number is never given twice.
--
-- Applied like 001 (inside a transaction after `SET LOCAL search_path TO <schema>, pg_temp`; by hand, set the
-- search_path first and record version 5 in migrations).

-- One row per election that was ever sent a trigger: the last number given. Sends to one election take its row lock
-- in turn, so numbers are given in the order the sends commit (no reordering), and a leader reading the triggers
-- after number n never misses one that commits later with a lower number. No foreign key to elections: a send then
-- takes no lock on the election's row, which term bumps lock FOR UPDATE (a send inside a long transaction must never
-- hold up a takeover).
CREATE TABLE IF NOT EXISTS trigger_queues (
    election_id integer PRIMARY KEY,
    sent        bigint  NOT NULL DEFAULT 0
);

-- The triggers not yet handled. 8000 bytes at most: the size of a NOTIFY payload (send larger data's key instead).
CREATE TABLE IF NOT EXISTS triggers (
    election_id integer     NOT NULL REFERENCES trigger_queues (election_id) ON DELETE CASCADE,
    sequence    bigint      NOT NULL,
    payload     text        NOT NULL CHECK (octet_length(payload) <= 8000),
    sent_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (election_id, sequence)
);

-- send_trigger(cluster, election, payload) → the trigger's number: stores it and wakes the leader with
-- {"event" : "trigger", "election" : <id>, "name" : <election>, "sequence" : <n>} on the cluster's channel. SQLSTATE
-- SK002 when the election does not exist (a node creates it when an activator first runs for it), 22001 for a payload
-- over 8000 bytes. SECURITY DEFINER so that a sender needs only EXECUTE on it; safe because its search_path is pinned
-- to this schema with pg_temp last.
CREATE OR REPLACE FUNCTION send_trigger(p_cluster text, p_election text, p_payload text) RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    v_election integer;
    v_cluster  integer;
    v_sequence bigint;
BEGIN
    IF octet_length(p_payload) > 8000 THEN
        RAISE EXCEPTION 'stoker trigger: the payload is % bytes; at most 8000 are allowed', octet_length(p_payload)
            USING ERRCODE = '22001';
    END IF;
    SELECT e.id, e.cluster_id INTO v_election, v_cluster
      FROM elections e JOIN clusters c ON c.id = e.cluster_id
     WHERE c.name = p_cluster AND e.name = p_election;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'stoker trigger: election % does not exist in cluster %', quote_literal(p_election),
                        quote_literal(p_cluster)
            USING ERRCODE = 'SK002',
                  HINT = 'A node creates the election when an activator first runs for it; check both names.';
    END IF;
    -- A number given must survive a crash of the server: never commit it asynchronously.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    INSERT INTO trigger_queues (election_id) VALUES (v_election) ON CONFLICT (election_id) DO NOTHING;
    UPDATE trigger_queues q SET sent = greatest(q.sent + 1, term_floor())
     WHERE q.election_id = v_election RETURNING q.sent INTO v_sequence;
    INSERT INTO triggers (election_id, sequence, payload) VALUES (v_election, v_sequence, coalesce(p_payload, ''));
    PERFORM pg_notify(current_schema() || ':' || v_cluster,
        json_build_object('event', 'trigger', 'election', v_election, 'name', p_election,
                          'sequence', v_sequence)::text);
    RETURN v_sequence;
END
$$;
REVOKE ALL ON FUNCTION send_trigger(text, text, text) FROM PUBLIC;
