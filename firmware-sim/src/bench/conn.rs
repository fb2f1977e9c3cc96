//! One bench MQTT connection: an [`AsyncClient`] for the publisher and a task that polls the
//! event loop and only counts. rumqttc's rule holds: nothing ever publishes from the poll
//! task, because a publish there could wait on the request channel that only the poll task
//! drains.
//!
//! Unlike the simulated bracelets' links (`link.rs`), a bench connection carries many
//! devices, does not track which message a packet id stands for (only how many PUBACKs came
//! back), and uses a clean session: a bench run that dies must leave nothing queued in the
//! broker.

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::BenchError;
use crate::BrokerAddr;

/// Counts shared by the connections of one role (load or SOS).
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Handed to the client (entered its request channel).
    pub published: AtomicU64,
    /// PUBACKs received.
    pub acked: AtomicU64,
    /// Reads that brought PUBACKs in (the load's own client only; [`super::load`]).
    pub ack_reads: AtomicU64,
    /// Publishes the client refused (its event loop was gone).
    pub publish_errors: AtomicU64,
    /// Connection errors after the first connect (each followed by a reconnect).
    pub reconnects: AtomicU64,
}

impl ConnCounters {
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub broker: BrokerAddr,
    pub client_id: String,
    /// QoS 1 messages in flight (written, not yet acknowledged).
    pub inflight: u16,
    /// Requests the client may queue ahead of the event loop.
    pub channel: usize,
}

/// A connected bench connection.
pub struct Conn {
    pub client: AsyncClient,
    poll: JoinHandle<()>,
}

impl Conn {
    /// Connects and waits for the CONNACK (at most `timeout`). Incoming PUBLISH packets (the
    /// broker's `$SYS` topics, when subscribed) go to `incoming` if given.
    pub async fn open(
        s: ConnSettings,
        counters: Arc<ConnCounters>,
        incoming: Option<mpsc::UnboundedSender<(String, Bytes)>>,
        timeout: Duration,
    ) -> Result<Conn, BenchError> {
        let mut opts = MqttOptions::new(s.client_id.clone(), s.broker.host.clone(), s.broker.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(s.inflight.max(1));
        if let Some((user, pass)) = &s.broker.credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, s.channel.max(1));
        let mut net = eventloop.network_options();
        // Small messages, many of them: Nagle would hold each one for the previous ack.
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        eventloop.set_network_options(net);

        let (up_tx, up_rx) = oneshot::channel::<Result<(), String>>();
        let id = s.client_id.clone();
        let poll = tokio::spawn(async move {
            let mut up = Some(up_tx);
            let mut failures = 0u32;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        if let Some(tx) = up.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(tx) = &incoming {
                            let _ = tx.send((p.topic.clone(), p.payload.clone()));
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        failures += 1;
                        if up.is_none() {
                            counters.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(client = %id, error = %e, "bench connection lost; reconnecting");
                        } else if failures >= 3 {
                            // Not connected yet: a refused or unreachable broker is a
                            // configuration error, reported at once.
                            if let Some(tx) = up.take() {
                                let _ = tx.send(Err(e.to_string()));
                            }
                            return;
                        }
                        // rumqttc reconnects on the next poll; do not spin on a dead broker.
                        tokio::time::sleep(Duration::from_millis(
                            100 * u64::from(failures.min(10)),
                        ))
                        .await;
                    }
                }
            }
        });
        match tokio::time::timeout(timeout, up_rx).await {
            Ok(Ok(Ok(()))) => Ok(Conn { client, poll }),
            Ok(Ok(Err(e))) => {
                poll.abort();
                Err(BenchError::Mqtt(format!(
                    "{} could not connect to {}:{}: {e}",
                    s.client_id, s.broker.host, s.broker.port
                )))
            }
            _ => {
                poll.abort();
                Err(BenchError::Mqtt(format!(
                    "{} could not connect to {}:{} within {timeout:?}",
                    s.client_id, s.broker.host, s.broker.port
                )))
            }
        }
    }

    /// Publishes at QoS 1, waiting for room in the request channel; counts it.
    pub async fn publish(&self, counters: &ConnCounters, topic: String, payload: Vec<u8>) -> bool {
        match self
            .client
            .publish_bytes(topic, QoS::AtLeastOnce, false, Bytes::from(payload))
            .await
        {
            Ok(()) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                counters.publish_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Sends DISCONNECT and lets the poll task write it (at most a second).
    pub async fn close(self) {
        if self.client.try_disconnect().is_ok() {
            let mut poll = self.poll;
            if tokio::time::timeout(Duration::from_secs(1), &mut poll)
                .await
                .is_err()
            {
                poll.abort();
            }
        } else {
            self.poll.abort();
        }
    }
}
