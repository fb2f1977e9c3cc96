//! The library's error type.

use std::time::Duration;

/// What can go wrong in the simulator, named for what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The broker URL does not parse or is not `mqtt://host[:port]`.
    #[error("invalid MQTT URL {0}")]
    InvalidUrl(String),
    /// A valid request this version cannot serve (e.g. `mqtts://`).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A scenario name or mix string is wrong.
    #[error("invalid scenario: {0}")]
    InvalidScenario(String),
    /// A fleet setting is out of range (bad id prefix, zero interval, QoS above 2, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A device never reached the broker. The whole fleet stops: a test against a broker
    /// that is not there should fail fast, not wait for every device to time out.
    #[error("device {device_id} could not connect to the broker within {timeout:?}: {reason}")]
    Connect {
        device_id: String,
        timeout: Duration,
        reason: String,
    },
    /// A single message (`bracelet-sim send`) was not acknowledged in time.
    #[error("the broker did not acknowledge the message within {0:?}")]
    AckTimeout(Duration),
    /// The connection ended while a message was being handed over.
    #[error("the MQTT connection of device {0} closed unexpectedly")]
    LinkClosed(String),
}
