//! One integration-test binary (it links once). Every test gets its own database and its own
//! Mosquitto broker (run from deploy/mosquitto.conf), so tests run in parallel and leave
//! nothing behind. Requires `SILVERGUARD_TEST_PG_BASE` (set by scripts/test.sh).

mod alerts;
mod api;
mod authz;
mod backup;
mod care;
mod console;
mod credentials;
mod faults;
mod helpers;
mod hostile;
mod https;
mod ingest;
mod logs;
mod notify_channels;
mod registry;
mod storage;
