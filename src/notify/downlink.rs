//! Commands to bracelets (`sg/v1/dev/{id}/cmd`, QoS 1) over a connection of their own.
//!
//! One publish is in flight at a time, so the broker's PUBACK unambiguously confirms it;
//! downlinks are rare (an SOS acknowledgement), so this costs nothing. The event loop is
//! polled by its own task and never publishes (rumqttc's rule).

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::MqttSettings;
use crate::ingest::mqtt::{publisher_options, MqttConfigError};

type Request = (String, Vec<u8>, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct Downlink {
    tx: mpsc::Sender<Request>,
}

impl Downlink {
    pub fn start(
        settings: &MqttSettings,
        cancel: CancellationToken,
    ) -> Result<Downlink, MqttConfigError> {
        // Nothing to resume: a command not acknowledged is retried by the outbox.
        let opts = publisher_options(settings, "downlink")?;
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (acks_tx, mut acks_rx) = mpsc::channel::<()>(64);
        let poll_cancel = cancel.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                tokio::select! {
                    _ = poll_cancel.cancelled() => return,
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Incoming(Incoming::PubAck(_))) => { let _ = acks_tx.try_send(()); }
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            backoff = Duration::from_millis(200);
                            tracing::info!("downlink connection up");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "downlink connection lost, reconnecting");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = poll_cancel.cancelled() => return,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
        });
        let (tx, mut rx) = mpsc::channel::<Request>(256);
        tokio::spawn(async move {
            while let Some((topic, payload, reply)) = rx.recv().await {
                while acks_rx.try_recv().is_ok() {} // stale acks of timed-out publishes
                let result = async {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .map_err(|e| e.to_string())?;
                    match tokio::time::timeout(Duration::from_secs(5), acks_rx.recv()).await {
                        Ok(Some(())) => Ok(()),
                        _ => Err("broker did not acknowledge the command within 5 s".to_string()),
                    }
                }
                .await;
                let _ = reply.send(result);
            }
        });
        Ok(Downlink { tx })
    }

    /// Publishes one command and waits for the broker's acknowledgement.
    pub async fn send(&self, device_id: &str, payload: Vec<u8>) -> Result<(), String> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send((
                silverguard_proto::topics::command(device_id),
                payload,
                reply,
            ))
            .await
            .map_err(|_| "downlink stopped".to_string())?;
        wait.await.map_err(|_| "downlink stopped".to_string())?
    }
}
