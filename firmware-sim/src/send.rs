//! One message from one bracelet, for manual checks (`bracelet-sim send`).
//!
//! Uses its own short-lived connection with a distinct client id and a clean session, so it
//! neither kicks a running simulated bracelet (`sim-{id}`) off the broker nor disturbs its
//! persistent session, and no Last Will: a manual send is not a bracelet going offline.

use bytes::Bytes;
use rumqttc::QoS;
use silverguard_proto::v1::{Event, Heartbeat, Presence};
use silverguard_proto::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::link::{BrokerAddr, Link, LinkSettings, Notice};
use crate::report::{Counters, MsgClass};
use crate::{topics, SimError};

/// The message to send.
#[derive(Debug, Clone, PartialEq)]
pub enum OneShot {
    /// On `sg/v1/dev/{id}/hb`.
    Heartbeat(Heartbeat),
    /// On `sg/v1/dev/{id}/evt`.
    Event(Event),
    /// On `sg/v1/dev/{id}/state`, retained.
    Presence(Presence),
}

/// Publishes `message` as device `device_id` and waits for the broker's acknowledgement
/// (at QoS 0, until it is written). `timeout` bounds the connect and the wait for the ack.
pub async fn send_one(
    mqtt_url: &str,
    device_id: &str,
    message: &OneShot,
    qos: u8,
    timeout: Duration,
) -> Result<(), SimError> {
    if !topics::is_valid_device_id(device_id) {
        return Err(SimError::InvalidConfig(format!(
            "device id {device_id:?} does not match [A-Za-z0-9_-]{{1,64}}"
        )));
    }
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => return Err(SimError::InvalidConfig(format!("qos {q} is not 0, 1 or 2"))),
    };
    let broker = BrokerAddr::parse(mqtt_url)?;
    let settings = LinkSettings {
        broker,
        client_id: format!("sim-send-{device_id}-{:08x}", rand::random::<u32>()),
        persistent: false,
        will_topic: None,
        clock_offset_ms: 0,
        keep_alive: Duration::from_secs(30),
        connect_timeout: timeout,
    };
    let counters = Arc::new(Counters::default());
    let mut link = Link::start(settings, counters, Arc::new(Semaphore::new(1)));
    match link.next_notice().await {
        Some(Notice::Connected { .. }) => {}
        Some(Notice::GaveUp { reason }) => {
            return Err(SimError::Connect {
                device_id: device_id.to_string(),
                timeout,
                reason,
            })
        }
        None => return Err(SimError::LinkClosed(device_id.to_string())),
    }
    let (class, topic, retain, payload) = match message {
        OneShot::Heartbeat(h) => (
            MsgClass::Heartbeat,
            topics::heartbeat(device_id),
            false,
            h.encode_to_vec(),
        ),
        OneShot::Event(e) => (
            MsgClass::Event(e.kind()),
            topics::event(device_id),
            false,
            e.encode_to_vec(),
        ),
        OneShot::Presence(p) => (
            MsgClass::Presence,
            topics::state(device_id),
            true,
            p.encode_to_vec(),
        ),
    };
    link.publish(class, &topic, qos, retain, Bytes::from(payload), None)
        .await
        .map_err(|_| SimError::LinkClosed(device_id.to_string()))?;
    let left = link.wait_acked(Instant::now() + timeout).await;
    link.disconnect().await;
    if left > 0 {
        return Err(SimError::AckTimeout(timeout));
    }
    Ok(())
}
