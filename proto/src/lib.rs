//! The wire format between bracelets and Silverguard: the `silverguard.v1` protobuf package.
//!
//! The `.proto` files in `proto/silverguard/v1/` are the contract; this crate only exposes
//! what prost generates from them. The service converts these types into validated domain
//! types at its edge (`silverguard::ingest::validate`), so nothing past ingest sees them.

#![allow(clippy::derive_partial_eq_without_eq)]

/// Package `silverguard.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/silverguard.v1.rs"));
}

pub mod topics;

pub use prost::{DecodeError, Message};
