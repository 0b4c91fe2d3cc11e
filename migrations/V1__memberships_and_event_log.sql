-- Who may join which flow (the `members` access policy).
CREATE TABLE flow_members (
    flow_id    text        NOT NULL,
    user_id    text        NOT NULL,
    role       text        NOT NULL DEFAULT 'member',
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow_id, user_id)
);
-- "Which flows may this user join" (the PK serves "who is in this flow").
CREATE INDEX flow_members_by_user ON flow_members (user_id);

-- The durable log of non-volatile room events, partitioned by month on
-- created_at. created_at is derived from the event's room offset (a Redis
-- stream id "<ms>-<seq>"), so a retried write of the same event lands on the
-- same key and ON CONFLICT DO NOTHING makes writes exactly-once.
-- Partitions are created ahead by the gateway (and on demand by the writer);
-- a retention setting drops old ones.
CREATE TABLE room_events (
    flow_id    text        NOT NULL,
    offset_ms  bigint      NOT NULL,
    offset_seq bigint      NOT NULL,
    created_at timestamptz NOT NULL,
    event      text        NOT NULL,
    data       jsonb       NOT NULL,
    user_id    text,
    PRIMARY KEY (flow_id, offset_ms, offset_seq, created_at)
) PARTITION BY RANGE (created_at);
