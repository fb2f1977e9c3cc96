//! The MQTT topic scheme and the device-id rule (DESIGN.md), shared by the service and the
//! simulator so the two cannot drift apart on a topic string.

/// Longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Heartbeat topic: `sg/v1/dev/{id}/hb`.
pub fn heartbeat(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/hb")
}

/// Event topic: `sg/v1/dev/{id}/evt`.
pub fn event(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/evt")
}

/// Presence topic (retained; also the Last Will): `sg/v1/dev/{id}/state`.
pub fn state(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/state")
}

/// Downlink topic the bracelet subscribes to: `sg/v1/dev/{id}/cmd`.
pub fn command(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/cmd")
}

/// `[A-Za-z0-9_-]{1,64}`: IMEIs and operator-chosen ids. Nothing else can appear in a topic
/// level safely (no `/`, `+`, `#`).
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
