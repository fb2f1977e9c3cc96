//! Silverguard keeps watch over elders who live alone: their bracelets' vital signs and SOS
//! presses arrive over MQTT, land in PostgreSQL, and (in later stages) raise alerts that
//! escalate until a human answers.
//!
//! # Layout
//!
//! - [`config`]: settings from TOML and `SILVERGUARD_*` environment, validated at start.
//! - [`store`]: the PostgreSQL pool, embedded migrations, partition upkeep, device registry.
//! - [`ingest`]: MQTT in, validated rows out; lanes for heartbeats (batched binary COPY),
//!   events (committed at once), presence and rejects; PUBACK only after commit.
//! - [`alerts`]: rules over events and telemetry, the alert lifecycle, escalation steps.
//! - [`notify`]: the outbox worker and its channels (email, SMS, IM, bracelet downlink).
//! - [`api`]: HTTP health, readiness and Prometheus metrics.
//! - [`metrics`]: the Prometheus registry every stage reports into.
//! - [`app`]: `silverguard serve`, wiring the stages and shutting them down in order.
//!
//! Stages talk through bounded channels or Postgres tables, never shared mutable state.
//! `docs/architecture.md` explains the choices.

pub mod alerts;
pub mod api;
pub mod app;
pub mod care;
pub mod config;
pub mod ingest;
pub mod metrics;
pub mod notify;
pub mod store;
