-- Ingest foundation: registry minimum, time-series heartbeats, events, presence, rejects.

CREATE TABLE elders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id   text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    elder_id    bigint REFERENCES elders (id) ON DELETE SET NULL,
    model       text,
    firmware    text,
    -- Expected heartbeat interval; silence detection (alerts) derives its deadline from it.
    heartbeat_interval_s integer NOT NULL DEFAULT 60 CHECK (heartbeat_interval_s > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_elder ON devices (elder_id) WHERE elder_id IS NOT NULL;

-- Hot per-device state kept apart from the registry row: ingest upserts it in batches
-- (one statement per flush interval, not one write per message).
CREATE TABLE device_latest (
    device_id        text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    last_seen_at     timestamptz,
    last_hb_at       timestamptz,
    last_hb_seq      bigint,
    heart_rate_bpm   smallint,
    spo2_pct         smallint,
    systolic_mmhg    smallint,
    diastolic_mmhg   smallint,
    skin_temp_dc     smallint,
    steps_today      integer,
    battery_pct      smallint,
    worn             boolean,
    lat_e7           integer,
    lon_e7           integer,
    online           boolean,
    presence_at      timestamptz
);

-- Heartbeats. `ts` is the device's measurement time, or the receive time when the device
-- clock was off by more than the configured tolerance (then clock_skewed is set and the
-- device's claim is kept in device_ts). Vitals are NULL when the bracelet did not measure.
CREATE TABLE heartbeats (
    device_id       text        NOT NULL,
    ts              timestamptz NOT NULL,
    seq             bigint      NOT NULL,
    received_at     timestamptz NOT NULL,
    heart_rate_bpm  smallint,
    spo2_pct        smallint,
    systolic_mmhg   smallint,
    diastolic_mmhg  smallint,
    skin_temp_dc    smallint,
    steps_today     integer,
    battery_pct     smallint,
    worn            boolean     NOT NULL,
    lat_e7          integer,
    lon_e7          integer,
    loc_accuracy_m  integer,
    loc_source      smallint,
    clock_skewed    boolean     NOT NULL DEFAULT false,
    device_ts       timestamptz
) PARTITION BY RANGE (ts);

-- One index serves the three needs: dedup of redelivered messages (unique), "latest per
-- device" (device_id, ts DESC scan) and "one device over a time range".
CREATE UNIQUE INDEX heartbeats_device_ts_seq ON heartbeats (device_id, ts, seq);
-- Skewed rows carry the receive time in ts, so a redelivery would not collide on the unique
-- index; this small partial index lets ingest find them by the device's own claim instead.
CREATE INDEX heartbeats_skewed ON heartbeats (device_id, seq, device_ts) WHERE clock_skewed;

-- Rows whose day has no partition yet land here instead of failing the batch; upkeep moves
-- them into their partition when it creates it.
CREATE TABLE heartbeats_default PARTITION OF heartbeats DEFAULT;

-- Creates daily partitions [today - days_behind, today + days_ahead] (UTC days), moving any
-- rows of those days out of the default partition first. Safe to run concurrently: callers
-- hold an advisory lock.
CREATE FUNCTION sg_ensure_heartbeat_partitions(days_behind integer, days_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d       date;
    name    text;
    created integer := 0;
    lo      timestamptz;
    hi      timestamptz;
BEGIN
    IF to_regclass('heartbeats') IS NULL
       OR NOT EXISTS (SELECT 1 FROM pg_partitioned_table p
                      WHERE p.partrelid = 'heartbeats'::regclass) THEN
        RETURN 0; -- a TimescaleDB hypertable manages its own chunks
    END IF;
    FOR d IN SELECT generate_series((now() AT TIME ZONE 'UTC')::date - days_behind,
                                    (now() AT TIME ZONE 'UTC')::date + days_ahead,
                                    interval '1 day')::date
    LOOP
        name := 'heartbeats_p' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(name) IS NOT NULL;
        lo := (d::timestamp AT TIME ZONE 'UTC');
        hi := ((d + 1)::timestamp AT TIME ZONE 'UTC');
        EXECUTE format('CREATE TABLE %I (LIKE heartbeats INCLUDING DEFAULTS)', name);
        EXECUTE format('WITH moved AS (DELETE FROM heartbeats_default WHERE ts >= %L AND ts < %L RETURNING *)
                        INSERT INTO %I SELECT * FROM moved', lo, hi, name);
        EXECUTE format('ALTER TABLE heartbeats ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       name, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END $$;

-- When TimescaleDB is loaded, heartbeats becomes a hypertable instead. Nothing else in
-- Silverguard depends on it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') LIKE '%timescaledb%' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        DROP TABLE heartbeats;
        CREATE TABLE heartbeats (
            device_id text NOT NULL, ts timestamptz NOT NULL, seq bigint NOT NULL,
            received_at timestamptz NOT NULL, heart_rate_bpm smallint, spo2_pct smallint,
            systolic_mmhg smallint, diastolic_mmhg smallint, skin_temp_dc smallint,
            steps_today integer, battery_pct smallint, worn boolean NOT NULL,
            lat_e7 integer, lon_e7 integer, loc_accuracy_m integer, loc_source smallint,
            clock_skewed boolean NOT NULL DEFAULT false, device_ts timestamptz);
        PERFORM create_hypertable('heartbeats', 'ts', chunk_time_interval => interval '1 day');
        CREATE UNIQUE INDEX heartbeats_device_ts_seq ON heartbeats (device_id, ts, seq);
        CREATE INDEX heartbeats_skewed ON heartbeats (device_id, seq, device_ts) WHERE clock_skewed;
        ALTER TABLE heartbeats SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id');
        PERFORM add_compression_policy('heartbeats', interval '7 days');
    END IF;
END $$;

CREATE TABLE device_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       text        NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    seq             bigint      NOT NULL,
    kind            text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    -- The device's own claim; with seq it identifies a redelivery even across clock skew.
    device_ts       timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    clock_skewed    boolean     NOT NULL DEFAULT false,
    battery_pct     smallint,
    lat_e7          integer,
    lon_e7          integer,
    loc_accuracy_m  integer,
    loc_source      smallint,
    UNIQUE (device_id, seq, device_ts)
);
CREATE INDEX device_events_device_time ON device_events (device_id, occurred_at DESC);
CREATE INDEX device_events_kind_time ON device_events (kind, occurred_at DESC);

CREATE TABLE device_presence (
    device_id    text        NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    at           timestamptz NOT NULL,
    online       boolean     NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (device_id, at, online)
);

-- Everything a device sent that could not be used, with why, bounded by upkeep.
CREATE TABLE ingest_rejects (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at   timestamptz NOT NULL,
    topic         text        NOT NULL,
    device_id     text,
    reason        text        NOT NULL,
    detail        text        NOT NULL,
    payload_size  integer     NOT NULL,
    payload       bytea       NOT NULL
);
CREATE INDEX ingest_rejects_reason ON ingest_rejects (reason, id DESC);
