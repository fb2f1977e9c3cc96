//! The IO-free heart of Silverguard: what a device's message means ([`validate`]) and what a
//! stream of readings implies ([`rules`]).
//!
//! It lives in its own small crate so it can be fuzzed (see `fuzz/` and docs/fuzzing.md)
//! without building the service's database, HTTP and mail stacks. The `silverguard` crate
//! re-exports these modules at their historical paths (`silverguard::ingest::validate`,
//! `silverguard::alerts::rules`).

pub mod rules;
pub mod validate;

pub use silverguard_proto::topics::is_valid_device_id;

#[doc(hidden)]
pub mod fuzzing;
