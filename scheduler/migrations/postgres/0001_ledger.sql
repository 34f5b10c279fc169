-- The audit ledger as the scheduler streams it (see scheduler/src/sink.rs).
-- `record` is the entry exactly as exported (JSON): what `coop audit verify --db`
-- re-hashes. `entry` is the same as JSONB, for queries and views.
CREATE TABLE ledger (
    seq       BIGINT PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL,
    kind      TEXT NOT NULL,
    entry     JSONB NOT NULL,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL UNIQUE
);
CREATE INDEX ledger_kind_at ON ledger (kind, at);

-- One row per billed usage interval.
CREATE VIEW usage_intervals AS
SELECT seq,
       entry->>'member'                                  AS member,
       entry->>'node'                                    AS node,
       entry->>'model'                                   AS model,
       (entry->>'job')::uuid                             AS job,
       (entry->>'attempt')::int                          AS attempt,
       to_timestamp((entry->>'start_ms')::bigint / 1000.0) AS started,
       to_timestamp((entry->>'end_ms')::bigint / 1000.0)   AS ended,
       (entry->>'gpu_ms')::bigint                        AS gpu_ms,
       (entry->>'weighted_gpu_ms')::bigint               AS weighted_gpu_ms,
       (entry->>'energy_mj')::bigint                     AS energy_mj
FROM ledger
WHERE kind = 'usage';

-- Statements: use per member, calendar month (UTC, by the interval's end) and model.
CREATE VIEW member_monthly_usage AS
SELECT member,
       date_trunc('month', ended AT TIME ZONE 'UTC') AS month,
       model,
       sum(gpu_ms) / 3600000.0          AS gpu_hours,
       sum(weighted_gpu_ms) / 3600000.0 AS units,
       sum(energy_mj) / 3600000000.0    AS energy_kwh,
       count(DISTINCT job)              AS jobs
FROM usage_intervals
GROUP BY 1, 2, 3;

-- Preemptions suffered and caused, per member and month.
CREATE VIEW member_monthly_preemptions AS
SELECT m.member,
       date_trunc('month', l.at AT TIME ZONE 'UTC') AS month,
       count(*) FILTER (WHERE l.entry->>'member' = m.member)     AS suffered,
       count(*) FILTER (WHERE l.entry->>'for_member' = m.member) AS caused
FROM ledger l
JOIN (SELECT DISTINCT entry->>'member' AS member FROM ledger WHERE kind = 'member_added') m
  ON l.entry->>'member' = m.member OR l.entry->>'for_member' = m.member
WHERE l.kind = 'preemption'
GROUP BY 1, 2;

-- Policy history, for annotations and the general assembly's minutes.
CREATE VIEW policy_history AS
SELECT seq, at, kind, entry
FROM ledger
WHERE kind IN ('policy_changed', 'policy_proposed', 'policy_approved');
