-- device_latest is rewritten for every device that reported, every flush: at a city's rate
-- that is tens of thousands of row updates a second, the largest share of PostgreSQL's work
-- in the benchmark (docs/performance.md). While `silent_after` was indexed, every one of them
-- changed an indexed column, so none could be a HOT update: each wrote a new entry into the
-- primary key and into the deadline index, and left two dead ones for vacuum.
--
-- The sweeper's index now holds `silence_check_at`, a deadline that moves lazily: the flush
-- moves it only when it has come within half the silence threshold of the newest report, so a
-- device reporting steadily changes it once in several reports and every other update leaves
-- all indexed columns alone (HOT). `silence_check_at` is never later than `silent_after`; the
-- sweeper reads the index for candidates and tests the exact `silent_after`, which stays
-- current on every flush and is what the console and API read.
--
-- Locks: ADD COLUMN and DROP INDEX take device_latest's strongest lock until this
-- transaction commits, after rewriting every row and building the new index (seconds for a
-- million devices). Ingest's flush and the console's device lists wait meanwhile; heartbeats
-- and events do not. Run it in a quiet minute. Old binaries keep working on the new schema
-- but never write silence_check_at: a device they insert has none (the new sweeper also reads
-- rows whose silence_check_at is NULL), and a heartbeat interval they shorten leaves it later
-- than silent_after until a new binary flushes that device, so such an alert can come late
-- while old and new instances run side by side. Their own sweeper reads silent_after
-- unindexed.
ALTER TABLE device_latest ADD COLUMN silence_check_at timestamptz;
UPDATE device_latest SET silence_check_at = silent_after;
DROP INDEX device_latest_silent_after;
CREATE INDEX device_latest_silence_check ON device_latest (silence_check_at) WHERE NOT silence_alerted;
-- Room on each page for a new version of every row: a flush rewrites most rows of a page
-- before pruning can reclaim the old versions, and a new version that does not fit on its
-- page cannot be HOT. Measured with 100,000 bracelets at 50,000 hb/s: 46 % of the updates
-- were HOT at fillfactor 80, 87 % at 50. Half-empty pages cost little here: the table has
-- one small row per device. (New pages only; existing ones get the room back as vacuum
-- and pruning free space.)
ALTER TABLE device_latest SET (fillfactor = 50);
