//! The heartbeat load: `devices` bracelets multiplexed over `connections` MQTT connections,
//! each connection paced by its own token bucket at `rate / connections` per second.
//!
//! A real fleet is one connection per bracelet; 100k sockets on the machine under test would
//! measure the bench's own socket handling, so the bench multiplexes. What the service sees is
//! the same: `Heartbeat`s from distinct devices on `sg/v1/dev/{id}/hb`, each with its own
//! increasing `seq` and plausible vitals from [`crate::physiology`], at QoS 1.

use silverguard_proto::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, ConnCounters, ConnSettings};
use super::stats::TokenBucket;
use super::BenchError;
use crate::physiology::Body;
use crate::{now_unix_ms, topics, BrokerAddr};

/// Messages in flight per connection. Far more than a localhost round trip needs at
/// 1,000 msg/s per connection, so acknowledgements never pace the publisher.
const INFLIGHT: u16 = 1000;
/// Request channel per connection: a few seconds of stall at the default rate.
const CHANNEL: usize = 8192;
/// Burst the token bucket allows: 50 ms of the connection's rate (timer wake-ups are late by
/// a millisecond or two; a burst that small does not distort the offered rate).
const BURST: Duration = Duration::from_millis(50);

/// What to offer.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub broker: BrokerAddr,
    /// Device ids; device `i` goes to connection `i % connections`.
    pub devices: Vec<String>,
    pub connections: usize,
    /// Heartbeats per second, all connections together.
    pub rate: f64,
    /// Seed of the simulated elders' physiology.
    pub seed: u64,
    /// Client ids are `{client_prefix}-{i}`.
    pub client_prefix: String,
}

/// One simulated bracelet inside a connection's publisher.
struct Device {
    topic: String,
    id: String,
    body: Body,
    seq: u64,
    last_ms: i64,
}

/// A running load.
pub struct Load {
    conns: Vec<Arc<Conn>>,
    publishers: Vec<JoinHandle<()>>,
    stop: CancellationToken,
    pub counters: Arc<ConnCounters>,
    overflow: Arc<AtomicU64>,
}

impl Load {
    /// Connects every connection (failing fast if one cannot), then starts publishing.
    pub async fn start(s: LoadSettings) -> Result<Load, BenchError> {
        if s.connections == 0 || s.devices.len() < s.connections {
            return Err(BenchError::Config(format!(
                "need at least one device per connection ({} devices, {} connections)",
                s.devices.len(),
                s.connections
            )));
        }
        let counters = Arc::new(ConnCounters::default());
        let mut conns = Vec::with_capacity(s.connections);
        for i in 0..s.connections {
            let settings = ConnSettings {
                broker: s.broker.clone(),
                client_id: format!("{}-{i}", s.client_prefix),
                inflight: INFLIGHT,
                channel: CHANNEL,
            };
            let conn = Conn::open(settings, counters.clone(), None, Duration::from_secs(15)).await;
            match conn {
                Ok(c) => conns.push(Arc::new(c)),
                Err(e) => {
                    for c in conns {
                        if let Ok(c) = Arc::try_unwrap(c) {
                            c.close().await;
                        }
                    }
                    return Err(e);
                }
            }
        }

        let stop = CancellationToken::new();
        let overflow = Arc::new(AtomicU64::new(0));
        let per_conn_rate = s.rate / s.connections as f64;
        let mut groups: Vec<Vec<Device>> = (0..s.connections).map(|_| Vec::new()).collect();
        for (i, id) in s.devices.iter().enumerate() {
            groups[i % s.connections].push(Device {
                topic: topics::heartbeat(id),
                id: id.clone(),
                body: Body::new(s.seed, i as u64),
                seq: 0,
                last_ms: 0,
            });
        }
        let publishers = groups
            .into_iter()
            .zip(conns.iter().cloned())
            .map(|(devices, conn)| {
                tokio::spawn(publish_loop(
                    conn,
                    devices,
                    per_conn_rate,
                    counters.clone(),
                    overflow.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Ok(Load {
            conns,
            publishers,
            stop,
            counters,
            overflow,
        })
    }

    /// Heartbeats that were due and never offered because the publisher was behind.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Stops publishing, waits up to `ack_timeout` for the broker to acknowledge everything
    /// published, and closes the connections.
    pub async fn stop(self, ack_timeout: Duration) {
        self.stop.cancel();
        for p in self.publishers {
            let _ = p.await;
        }
        let deadline = Instant::now() + ack_timeout;
        while self.counters.acked() < self.counters.published() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for c in self.conns {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
    }
}

/// Publishes round-robin over `devices` at `rate` per second until stopped.
async fn publish_loop(
    conn: Arc<Conn>,
    mut devices: Vec<Device>,
    rate: f64,
    counters: Arc<ConnCounters>,
    overflow: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let capacity = (rate * BURST.as_secs_f64()).max(1.0);
    let mut bucket = TokenBucket::new(rate, capacity, Instant::now().into_std());
    let n_devices = devices.len();
    let mut next = 0usize;
    let mut reported_overflow = 0u64;
    'run: while !stop.is_cancelled() {
        let now = Instant::now().into_std();
        let due = bucket.take(now, capacity as u64);
        let o = bucket.overflow();
        if o > reported_overflow {
            overflow.fetch_add(o - reported_overflow, Ordering::Relaxed);
            reported_overflow = o;
        }
        if due == 0 {
            // Never sleep less than the timer's resolution: a 0.3 ms sleep is a 1 ms sleep
            // anyway, and the bucket makes up for it with a small burst.
            let wait = bucket.until_next(now).max(Duration::from_micros(500));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        for _ in 0..due {
            let d = &mut devices[next];
            next = (next + 1) % n_devices;
            d.seq += 1;
            // Strictly increasing per device, whatever the wall clock does.
            let at = now_unix_ms().max(d.last_ms + 1);
            d.last_ms = at;
            let payload = d
                .body
                .sample(at)
                .to_heartbeat(&d.id, d.seq, at)
                .encode_to_vec();
            if !conn.publish(&counters, d.topic.clone(), payload).await {
                break 'run;
            }
        }
    }
}
