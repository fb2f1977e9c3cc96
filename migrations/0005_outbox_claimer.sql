-- Who holds an outbox row's lease: the instance (its mqtt.client_id, unique per instance and
-- stable across restarts) and the process (a random token drawn at each start). A process
-- that starts under an instance id takes back at once the rows its dead predecessor held,
-- instead of waiting out their 60 s lease: after a kill -9 and restart, an SOS message that
-- was being sent goes out again within a second, not a minute. Additive: old binaries
-- ignore both columns.
ALTER TABLE outbox ADD COLUMN claimed_by text;
ALTER TABLE outbox ADD COLUMN claimed_boot bigint;
CREATE INDEX outbox_sending_claimer ON outbox (claimed_by) WHERE status = 'sending';
