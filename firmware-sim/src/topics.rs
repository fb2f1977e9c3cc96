//! MQTT topic names and device-id rules, exactly as `DESIGN.md` fixes them.
//!
//! The scheme itself lives in `silverguard_proto::topics`, shared with the service; this adds
//! what only the simulator needs.

pub use silverguard_proto::topics::{
    command, event, heartbeat, is_valid_device_id, state, MAX_DEVICE_ID_LEN,
};

/// A topic under the device's prefix that the backend does not know.
pub fn nonsense(device_id: &str) -> String {
    format!("sg/v1/dev/{device_id}/nonsense")
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
