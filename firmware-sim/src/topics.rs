//! MQTT topic names and device-id rules, exactly as `DESIGN.md` fixes them.
//!
//! Kept in one place so the simulator and its tests cannot drift apart on a topic string.

/// Longest device id the backend accepts.
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

/// A topic under the device's prefix that the backend does not know.
pub fn nonsense(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/nonsense")
}

/// `[A-Za-z0-9_-]{1,64}`: the ids the backend accepts (IMEIs and operator-chosen ids).
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Client id of a simulated bracelet's MQTT connection.
pub fn client_id(device_id: &str) -> String {
    format!("sim-{device_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert!(is_valid_device_id("sim-000001"));
        assert!(is_valid_device_id("862345067890123"));
        assert!(is_valid_device_id(&"a".repeat(64)));
        assert!(!is_valid_device_id(&"a".repeat(65)));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id("a+b"));
        assert!(!is_valid_device_id("a b"));
    }

    #[test]
    fn topic_shapes() {
        assert_eq!(heartbeat("x"), "sg/v1/dev/x/hb");
        assert_eq!(event("x"), "sg/v1/dev/x/evt");
        assert_eq!(state("x"), "sg/v1/dev/x/state");
        assert_eq!(command("x"), "sg/v1/dev/x/cmd");
        assert_eq!(client_id("x"), "sim-x");
    }
}
