-- device_latest stops following every heartbeat (docs/performance.md, "fourth round").
-- Rewriting one row per device per report was more than half of PostgreSQL's work per
-- heartbeat at a city's rate, and nearly half its WAL. The newest heartbeat is already
-- stored, and the unique index (device_id, ts, seq) finds it with one probe per partition,
-- so the row now holds state and a snapshot that is refreshed now and then:
--
-- * ingest writes a device's row on first sight, on events and presence changes, and at
--   most once per `ingest.latest_refresh` for heartbeats;
-- * the silence sweeper, when a device's deadline comes, reads its newest heartbeat and
--   either raises `device_silent` or moves the deadline (and the snapshot) forward; it also
--   re-arms alerted devices whose data came back.
--
-- Readers that show "now" (console, API, outbox, CLI) read `device_current`: the row with
-- the newest heartbeat laid over it. The probe only looks at heartbeats at or after the
-- snapshot's and at most a day ahead (ingest.max_clock_ahead is at most 1d, and a skewed
-- heartbeat is stored at its receive time), so partitions outside are pruned at run time
-- (the days created ahead and older ones: one or two index probes, not one per partition),
-- and a device whose heartbeats were all dropped by retention shows its snapshot. `silent_after` is moved
-- by as much as `last_seen_at` (the row keeps both, a threshold apart).
CREATE VIEW device_current AS
SELECT l.device_id,
       greatest(l.last_seen_at, h.received_at) AS last_seen_at,
       CASE WHEN h.ts IS NULL THEN l.last_hb_at ELSE h.ts END AS last_hb_at,
       CASE WHEN h.ts IS NULL THEN l.last_hb_seq ELSE h.seq END AS last_hb_seq,
       CASE WHEN h.ts IS NULL THEN l.heart_rate_bpm ELSE h.heart_rate_bpm END AS heart_rate_bpm,
       CASE WHEN h.ts IS NULL THEN l.spo2_pct ELSE h.spo2_pct END AS spo2_pct,
       CASE WHEN h.ts IS NULL THEN l.systolic_mmhg ELSE h.systolic_mmhg END AS systolic_mmhg,
       CASE WHEN h.ts IS NULL THEN l.diastolic_mmhg ELSE h.diastolic_mmhg END AS diastolic_mmhg,
       CASE WHEN h.ts IS NULL THEN l.skin_temp_dc ELSE h.skin_temp_dc END AS skin_temp_dc,
       CASE WHEN h.ts IS NULL THEN l.steps_today ELSE h.steps_today END AS steps_today,
       CASE WHEN h.ts IS NULL THEN l.battery_pct ELSE h.battery_pct END AS battery_pct,
       CASE WHEN h.ts IS NULL THEN l.worn ELSE h.worn END AS worn,
       CASE WHEN h.ts IS NULL THEN l.lat_e7 ELSE h.lat_e7 END AS lat_e7,
       CASE WHEN h.ts IS NULL THEN l.lon_e7 ELSE h.lon_e7 END AS lon_e7,
       l.online,
       l.presence_at,
       l.silent_after + (greatest(l.last_seen_at, h.received_at) - l.last_seen_at) AS silent_after,
       l.silence_alerted
FROM device_latest l
LEFT JOIN LATERAL (
    SELECT hb.ts, hb.seq, hb.received_at, hb.heart_rate_bpm, hb.spo2_pct, hb.systolic_mmhg,
           hb.diastolic_mmhg, hb.skin_temp_dc, hb.steps_today, hb.battery_pct, hb.worn,
           hb.lat_e7, hb.lon_e7
    FROM heartbeats hb
    WHERE hb.device_id = l.device_id
      AND hb.ts >= coalesce(l.last_hb_at, '-infinity')
      AND hb.ts <= now() + interval '1 day'
    ORDER BY hb.ts DESC, hb.seq DESC
    LIMIT 1
) h ON true;

-- The sweeper reads due deadlines as a range of the index (no NULL branch). Only binaries
-- older than 0006 left rows without one; from 0007 on they must not run (docs/deployment.md).
UPDATE device_latest SET silence_check_at = silent_after
WHERE silence_check_at IS NULL AND silent_after IS NOT NULL;

-- The sweeper looks for data from alerted devices a batch at a time; for them
-- silence_check_at is the time of the next look.
CREATE INDEX device_latest_silence_alerted ON device_latest (silence_check_at) WHERE silence_alerted;

-- A shorter heartbeat interval brings the silence deadline forward, but the row is no longer
-- rewritten by the next heartbeat to notice. Whichever path (CLI, API, bulk import) changes
-- the interval, the device is queued here and the sweeper makes its deadline due at once.
-- Queued, not updated in place: a bulk import is one transaction, and row locks on
-- device_latest held until it commits would stall ingest's flush.
CREATE TABLE silence_rechecks (device_id text PRIMARY KEY);
CREATE FUNCTION sg_queue_silence_recheck() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO silence_rechecks (device_id) VALUES (NEW.device_id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER devices_interval_recheck_silence
    AFTER UPDATE OF heartbeat_interval_s ON devices
    FOR EACH ROW WHEN (NEW.heartbeat_interval_s IS DISTINCT FROM OLD.heartbeat_interval_s)
    EXECUTE FUNCTION sg_queue_silence_recheck();
