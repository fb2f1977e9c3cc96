//! The heartbeat load: `devices` bracelets multiplexed over `connections` MQTT connections,
//! each connection paced by its own token bucket at `rate / connections` per second. The
//! rate can be changed while it runs ([`Load::set_rate`]; 0 pauses), which is how the bench
//! ramps the offered load step by step.
//!
//! A real fleet is one connection per bracelet; 200k sockets on the machine under test would
//! measure the bench's own socket handling, so the bench multiplexes. What the service sees is
//! the same: `Heartbeat`s from distinct devices on `sg/v1/dev/{id}/hb`, each with its own
//! increasing `seq` and plausible vitals from [`crate::physiology`], at QoS 1. The
//! connections use the bench's own minimal client ([`super::raw`]): whatever is due is
//! written with one call.
//!
//! Some heartbeats are **markers** for the ingest lag: about `markers_per_s` per second over
//! the whole load, each reported with the instant of its publish to the [`super::lag`]
//! tracker, which watches for its row.

use bytes::{Buf, BytesMut};
use silverguard_proto::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::ConnCounters;
use super::lag::Marker;
use super::raw;
use super::stats::TokenBucket;
use super::BenchError;
use crate::physiology::Body;
use crate::{now_unix_ms, topics, BrokerAddr};

/// QoS 1 messages in flight per connection (published, PUBACK not yet read). Mosquitto
/// acknowledges a QoS 1 PUBLISH as soon as it has it, so on localhost a window of this size
/// never paces the publisher; it bounds what a stalled broker can make the bench buffer.
const INFLIGHT: u64 = 2000;
/// The kernel wakes a coalescing PUBACK reader early once this much is waiting: about a
/// thousand PUBACKs, half the window, so unread acknowledgements never pace the publisher.
/// At the bench's rates the look every `ack_read_coalesce` comes first.
const ACK_READ_MARK: u32 = 4096;
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
    /// Heartbeats per second at start, all connections together (0: start paused).
    pub rate: f64,
    /// Seed of the simulated elders' physiology.
    pub seed: u64,
    /// Client ids are `{client_prefix}-{i}`.
    pub client_prefix: String,
    /// Lag markers per second, all connections together (0: none).
    pub markers_per_s: f64,
    /// Each connection wakes at most this often and writes everything due in one write.
    /// Longer ticks mean fewer, larger writes: less CPU for the bench and the broker per
    /// message, burstier arrivals (docs/performance.md).
    pub tick: Duration,
    /// How long a connection lets the broker's PUBACKs wait before it reads them
    /// ([`raw::Coalescing`], with a mark of a thousand PUBACKs); zero reads each as it
    /// arrives. Mosquitto writes each PUBACK on its own, and each would otherwise wake the
    /// bench, at the broker's expense and its own.
    pub ack_read_coalesce: Duration,
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
    publishers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
    rate: watch::Sender<f64>,
    stop: CancellationToken,
    pub counters: Arc<ConnCounters>,
    overflow: Arc<AtomicU64>,
    connections: usize,
}

impl Load {
    /// Connects every connection (failing fast if one cannot), then starts publishing.
    /// Markers go to `markers` when given.
    pub async fn start(
        s: LoadSettings,
        markers: Option<mpsc::UnboundedSender<Marker>>,
    ) -> Result<Load, BenchError> {
        if s.connections == 0 || s.devices.len() < s.connections {
            return Err(BenchError::Config(format!(
                "need at least one device per connection ({} devices, {} connections)",
                s.devices.len(),
                s.connections
            )));
        }
        let mut streams = Vec::with_capacity(s.connections);
        // Connected and set up before any task starts: a failure leaves nothing running.
        let mut coalescings = Vec::with_capacity(s.connections);
        for i in 0..s.connections {
            let id = format!("{}-{i}", s.client_prefix);
            let stream = raw::connect(&s.broker, &id, true, 60, Duration::from_secs(15))
                .await
                .map_err(|e| {
                    BenchError::Mqtt(format!(
                        "{id} could not connect to {}:{}: {e}",
                        s.broker.host, s.broker.port
                    ))
                })?;
            coalescings.push(if s.ack_read_coalesce.is_zero() {
                None
            } else {
                Some(
                    raw::Coalescing::start(&stream, s.ack_read_coalesce, ACK_READ_MARK).map_err(
                        |e| {
                            BenchError::Mqtt(format!("{id}: cannot coalesce the PUBACK reads: {e}"))
                        },
                    )?,
                )
            });
            streams.push(stream);
        }

        let counters = Arc::new(ConnCounters::default());
        let stop = CancellationToken::new();
        let overflow = Arc::new(AtomicU64::new(0));
        let (rate_tx, rate_rx) = watch::channel(s.rate);
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
        let marker_every = (s.markers_per_s > 0.0)
            .then(|| Duration::from_secs_f64(s.connections as f64 / s.markers_per_s));
        let mut publishers = Vec::new();
        let mut readers = Vec::new();
        for ((devices, stream), coalescing) in groups.into_iter().zip(streams).zip(coalescings) {
            let (rd, wr) = stream.into_split();
            let inflight = Arc::new(AtomicU64::new(0));
            readers.push(tokio::spawn(read_acks(
                rd,
                coalescing,
                inflight.clone(),
                counters.clone(),
            )));
            publishers.push(tokio::spawn(publish_loop(Publisher {
                wr,
                devices,
                rate: rate_rx.clone(),
                connections: s.connections,
                inflight,
                counters: counters.clone(),
                overflow: overflow.clone(),
                markers: markers.clone().zip(marker_every),
                tick: s.tick,
                stop: stop.clone(),
            })));
        }
        Ok(Load {
            publishers,
            readers,
            rate: rate_tx,
            stop,
            counters,
            overflow,
            connections: s.connections,
        })
    }

    /// Changes the offered rate (all connections together); 0 pauses.
    pub fn set_rate(&self, rate: f64) {
        let _ = self.rate.send(rate.max(0.0));
    }

    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Heartbeats that were due and never offered because the publisher was behind (the
    /// machine was busy, or the broker did not take them fast enough).
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until the broker has acknowledged everything published.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.counters.acked() < self.counters.published() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops publishing, waits up to `ack_timeout` for the broker to acknowledge everything
    /// published, and disconnects.
    pub async fn stop(mut self, ack_timeout: Duration) {
        self.set_rate(0.0);
        self.wait_acked(ack_timeout).await;
        self.stop.cancel();
        for p in std::mem::take(&mut self.publishers) {
            let _ = p.await;
        }
        // The readers go with the drop.
    }
}

/// A load dropped without [`Load::stop`] (the run was interrupted) stops publishing at once:
/// its tasks would otherwise go on flooding the broker for the rest of the process.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Counts PUBACKs (and whatever else the broker sends, which is nothing but PINGRESP).
async fn read_acks(
    mut rd: OwnedReadHalf,
    coalescing: Option<raw::Coalescing>,
    inflight: Arc<AtomicU64>,
    counters: Arc<ConnCounters>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let read = match &coalescing {
            Some(c) => c.read(rd.as_ref(), &mut buf).await,
            None => rd.read_buf(&mut buf).await,
        };
        match read {
            Ok(0) | Err(_) => {
                if inflight.load(Ordering::Relaxed) > 0 {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(_) => {}
        }
        let mut acks = 0;
        loop {
            match raw::peek_frame(&buf) {
                Ok(Some((first, header, len))) => {
                    if first >> 4 == raw::PUBACK {
                        acks += 1;
                    }
                    buf.advance(header + len);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if acks > 0 {
            inflight.fetch_sub(acks, Ordering::Relaxed);
            counters.acked.fetch_add(acks, Ordering::Relaxed);
            counters.ack_reads.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Publisher {
    wr: OwnedWriteHalf,
    devices: Vec<Device>,
    rate: watch::Receiver<f64>,
    connections: usize,
    inflight: Arc<AtomicU64>,
    counters: Arc<ConnCounters>,
    overflow: Arc<AtomicU64>,
    markers: Option<(mpsc::UnboundedSender<Marker>, Duration)>,
    tick: Duration,
    stop: CancellationToken,
}

fn bucket_for(rate: f64, connections: usize) -> (TokenBucket, f64) {
    let per_conn = rate / connections as f64;
    let capacity = (per_conn * BURST.as_secs_f64()).max(1.0);
    (
        TokenBucket::new(per_conn, capacity, Instant::now().into_std()),
        capacity,
    )
}

/// Publishes round-robin over the connection's devices at its share of the rate until
/// stopped; then sends DISCONNECT.
async fn publish_loop(mut p: Publisher) {
    let mut rate = *p.rate.borrow_and_update();
    let (mut bucket, mut capacity) = bucket_for(rate, p.connections);
    let n_devices = p.devices.len();
    let mut next = 0usize;
    let mut pkid: u16 = 0;
    let mut reported_overflow = 0u64;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut next_marker = Instant::now();
    let mut last_ping = Instant::now();
    'run: while !p.stop.is_cancelled() {
        // Compared, not `has_changed`: the wait below consumes change notifications.
        let r = *p.rate.borrow_and_update();
        if r != rate {
            rate = r;
            (bucket, capacity) = bucket_for(r, p.connections);
            reported_overflow = 0;
        }
        let now = Instant::now();
        let room = INFLIGHT.saturating_sub(p.inflight.load(Ordering::Relaxed));
        let due = bucket.take(now.into_std(), (capacity as u64).min(room));
        let o = bucket.overflow();
        if o > reported_overflow {
            p.overflow
                .fetch_add(o - reported_overflow, Ordering::Relaxed);
            reported_overflow = o;
        }
        if due == 0 {
            if now - last_ping > Duration::from_secs(20) {
                raw::encode_pingreq(&mut buf);
                last_ping = now;
                if p.wr.write_all(&buf).await.is_err() {
                    break 'run;
                }
                buf.clear();
            }
            let wait = bucket
                .until_next(now.into_std())
                .clamp(p.tick, Duration::from_millis(50));
            tokio::select! {
                _ = p.stop.cancelled() => break,
                _ = p.rate.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let published_at = Instant::now();
        let mut marker: Option<Marker> = None;
        for _ in 0..due {
            let d = &mut p.devices[next];
            next = (next + 1) % n_devices;
            d.seq += 1;
            // Strictly increasing per device, whatever the wall clock does.
            let at = now_unix_ms().max(d.last_ms + 1);
            d.last_ms = at;
            let hb = d.body.sample(at).to_heartbeat(&d.id, d.seq, at);
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            raw::encode_publish_head(&mut buf, &d.topic, pkid, hb.encoded_len());
            // Infallible: BytesMut grows as needed.
            let _ = hb.encode(&mut buf);
            if marker.is_none() && published_at >= next_marker {
                if let Some((_, every)) = &p.markers {
                    marker = Some(Marker {
                        device_id: d.id.clone(),
                        seq: d.seq as i64,
                        measured_at_ms: at,
                        published: published_at,
                    });
                    next_marker = published_at + *every;
                }
            }
        }
        p.inflight.fetch_add(due, Ordering::Relaxed);
        if p.wr.write_all(&buf).await.is_err() {
            p.counters.publish_errors.fetch_add(due, Ordering::Relaxed);
            break 'run;
        }
        buf.clear();
        p.counters.published.fetch_add(due, Ordering::Relaxed);
        if let (Some(m), Some((tx, _))) = (marker, &p.markers) {
            let _ = tx.send(m);
        }
    }
    buf.clear();
    raw::encode_disconnect(&mut buf);
    let _ = p.wr.write_all(&buf).await;
    let _ = p.wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A broker that answers as Mosquitto does where it matters here: each PUBACK with a
    /// `write` of its own, as soon as it has read the PUBLISH. It runs on a thread of its own
    /// so that its writes reach a reader that is parked, as they do on a real machine.
    fn acking_broker() -> (u16, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handle = std::thread::spawn(move || {
            let Ok((mut sock, _)) = listener.accept() else {
                return;
            };
            let _ = sock.set_nodelay(true);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let n = match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Ok(Some((first, header, len))) = raw::peek_frame(&buf) {
                    let frame = buf.split_to(header + len);
                    let mut out = BytesMut::new();
                    match first >> 4 {
                        1 => out.extend_from_slice(&[0x20, 2, 0, 0]),
                        raw::PUBLISH => {
                            let Ok(p) = raw::parse_publish(first, &frame[header..]) else {
                                return;
                            };
                            raw::encode_puback(&mut out, p.pkid);
                        }
                        14 => return,
                        _ => {}
                    }
                    if !out.is_empty() && sock.write_all(&out).is_err() {
                        return;
                    }
                }
            }
        });
        (port, handle)
    }

    async fn offer(ack_read_coalesce: Duration) -> (u64, u64, u64) {
        let (port, broker) = acking_broker();
        let load = Load::start(
            LoadSettings {
                broker: BrokerAddr {
                    host: "127.0.0.1".into(),
                    port,
                    credentials: None,
                },
                devices: (0..50).map(|i| format!("t{i}")).collect(),
                connections: 1,
                // A message a millisecond: without coalescing, each PUBACK comes alone.
                rate: 1_000.0,
                seed: 1,
                client_prefix: "load-test".into(),
                markers_per_s: 0.0,
                tick: Duration::from_millis(1),
                ack_read_coalesce,
            },
            None,
        )
        .await
        .expect("load starts");
        tokio::time::sleep(Duration::from_secs(1)).await;
        load.set_rate(0.0);
        assert!(
            load.wait_acked(Duration::from_secs(10)).await,
            "every PUBACK is read: {} published, {} acked",
            load.counters.published(),
            load.counters.acked()
        );
        let c = load.counters.clone();
        load.stop(Duration::from_secs(5)).await;
        let _ = tokio::task::spawn_blocking(move || broker.join()).await;
        (
            c.published(),
            c.acked(),
            c.ack_reads.load(Ordering::Relaxed),
        )
    }

    // Two runtime threads, as the bench has in CI: the reader must be parked when a PUBACK
    // comes for the kernel's wake-up (or its absence) to be what is tested.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_puback_reads_count_every_ack_in_few_reads() {
        let (published, acked, reads) = offer(Duration::from_millis(5)).await;
        assert!(published > 500, "the load ran: {published}");
        assert_eq!(acked, published);
        eprintln!("coalesced: {reads} reads for {acked} PUBACKs");
        // About one read per 5 ms, five PUBACKs each; one read a PUBACK without coalescing.
        assert!(
            reads * 3 < acked,
            "{reads} reads for {acked} PUBACKs: the reads were not coalesced"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uncoalesced_puback_reads_count_every_ack() {
        let (published, acked, reads) = offer(Duration::ZERO).await;
        assert!(published > 500, "the load ran: {published}");
        assert_eq!(acked, published);
        eprintln!("uncoalesced: {reads} reads for {acked} PUBACKs");
    }
}
