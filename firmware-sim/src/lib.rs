//! `bracelet-sim`: a fleet of simulated Silverguard bracelets.
//!
//! Each simulated bracelet is an elder's wristband with its own MQTT connection (client id
//! `sim-{device_id}`, persistent session, Last Will `Presence{online:false}` on
//! `sg/v1/dev/{id}/state`). It announces itself online, streams `Heartbeat`s with plausible
//! vitals at a fixed interval, and plays a scenario: an SOS press, a fall, a fever, silence,
//! garbage. The fleet counts what it published and what the broker acknowledged, so the
//! service's integration tests can compare the simulator's [`FleetReport`] with database rows.
//!
//! # Layout
//!
//! * [`run_fleet`], [`FleetConfig`], [`device_ids`], [`device_plan`]: the entry points
//!   (`fleet.rs`); one task per device.
//! * [`physiology`]: deterministic elders (resting heart rate, day/night rhythm, steps,
//!   battery, wear, location in Hangzhou).
//! * [`scenario`]: [`Scenario`], [`ScenarioMix`] (`normal=90,sos=5,fall=5`) and the
//!   per-device script.
//! * [`malformed`]: the bad messages of the `malformed` scenario, one per reject reason.
//! * [`report`]: [`FleetReport`] and the lock-free counters behind it.
//! * `link.rs`: one MQTT connection: the single task that polls rumqttc's event loop,
//!   reconnects with backoff, and matches PUBACKs to published messages.
//! * [`send`]: one message, for manual checks (`bracelet-sim send`).
//! * [`topics`]: topic names and the device-id rule.
//! * [`bench`]: `bracelet-sim bench`, SOS → SMS latency under heartbeat load against a
//!   `silverguard serve` it starts itself (docs/performance.md).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), firmware_sim::SimError> {
//! use firmware_sim::{run_fleet, FleetConfig};
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//!
//! let cfg = FleetConfig {
//!     devices: 20,
//!     interval: Duration::from_millis(200),
//!     count: Some(10),
//!     scenarios: "normal=80,sos=10,malformed=10".parse()?,
//!     ..FleetConfig::default()
//! };
//! let report = run_fleet(cfg, CancellationToken::new(), None).await?;
//! assert_eq!(report.heartbeats_acked, report.heartbeats_published);
//! # Ok(()) }
//! ```

pub mod bench;
mod error;
mod fleet;
mod link;
pub mod malformed;
pub mod physiology;
pub mod report;
pub mod scenario;
pub mod send;
pub mod topics;

pub use error::SimError;
pub use fleet::{device_ids, device_plan, run_fleet, FleetConfig};
pub use link::BrokerAddr;
pub use malformed::BadClass;
pub use report::FleetReport;
pub use scenario::{Scenario, ScenarioMix};

/// Wall-clock Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
