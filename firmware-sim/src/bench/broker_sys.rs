//! The broker's own backlog, read from its `$SYS` tree while the bench runs.
//!
//! Mosquitto 2.0 reads one packet per connection each time round its event loop, so when
//! sixteen publisher connections keep it busy, the acknowledgements of a single subscriber
//! (the bare counter of the broker baseline, or silverguard) are read more slowly than the
//! messages they acknowledge are sent. The subscriber still receives everything (2.0.11 keeps
//! sending past its receive maximum) and the bench's own counters look healthy, but the
//! broker keeps every message it has not seen acknowledged: its store grows, and once one
//! client's count passes `max_queued_messages` it drops new messages for that client
//! (measured, 7 Dec 2026: the store grew by about 10,000 messages a second at 45,000/s, and a
//! third 25-second step at that rate lost 88,688 heartbeats). A step that starts while that
//! backlog is still there inherits it. The watcher lets the bench see the backlog
//! (`$SYS/broker/store/messages/count`) and the broker's drops
//! (`$SYS/broker/publish/messages/dropped`), and wait for the backlog to clear between steps.
//! Mosquitto publishes a figure only when it changed, at most once per `sys_interval` (about
//! every 2 s with the scripts' `sys_interval 1`; Mosquitto's default is 10), and the retained
//! copy expires after a minute, so the watcher stores retained messages of its own until the
//! broker publishes the count (and deletes them when it stops). A broker without `$SYS`, or a watcher whose connection
//! ended, leaves every figure unknown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::raw;
use crate::BrokerAddr;

const STORE_TOPIC: &str = "$SYS/broker/store/messages/count";
const DROPPED_TOPIC: &str = "$SYS/broker/publish/messages/dropped";

/// A backlog this close to the idle one counts as cleared: the in-flight window of a consumer
/// and a few retained messages, not a queue.
pub const CLEARED_SLACK: u64 = 5_000;

/// The end of a window is judged on the least figure of its last seconds (two or three
/// figures at `sys_interval 1`): one figure can catch a burst the broker reads a moment
/// later; a queue stays in all of them.
pub const END_SPAN: Duration = Duration::from_secs(5);

/// How long the watcher waits for its first store count: two updates at Mosquitto's default
/// `sys_interval`.
const FIRST_FIGURE_WAIT: Duration = Duration::from_secs(22);

/// How far behind on acknowledgements, in seconds of the offered rate, the broker may end a
/// step or probe (which start with it cleared). Below it the figure swings with the
/// consumer's commits and the broker's loop (up to about 80,000 at 35,000/s in a step that
/// ended at 18,209); a rate the broker only carries by queueing ends hundreds of thousands
/// behind (398,843 at 40,000/s in the same ramp) and reaches `max_queued_messages` within
/// minutes.
pub const END_BEHIND_S: f64 = 2.0;

/// Whether the broker kept up with `offered_per_s`: what it held at the end of the load is
/// within [`CLEARED_SLACK`], or [`END_BEHIND_S`] of the offered rate, of what it holds at
/// rest. Above that it was queueing: reading acknowledgements more slowly than it sent
/// messages, a rate it keeps only until a client's queue reaches `max_queued_messages`.
pub fn kept_up(idle: u64, end: u64, offered_per_s: f64) -> bool {
    let allowed = CLEARED_SLACK.max((END_BEHIND_S * offered_per_s) as u64);
    end <= idle + allowed
}

#[derive(Debug, Default)]
struct Seen {
    store: Option<u64>,
    dropped: Option<u64>,
    /// Largest store count since [`BrokerBacklog::take_max`] last ran.
    max_since: Option<u64>,
    /// Recent store counts with when they came.
    recent: VecDeque<(Instant, u64)>,
}

impl Seen {
    fn take_max(&mut self) -> Option<u64> {
        let max = self.max_since;
        self.max_since = self.store;
        max
    }

    /// The least store count that came at or after `since`; the latest one when none did.
    fn least_since(&self, since: Instant) -> Option<u64> {
        self.recent
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, n)| *n)
            .min()
            .or(self.store)
    }
}

/// A subscriber to the two `$SYS` figures; see the module documentation.
pub struct BrokerBacklog {
    seen: Arc<Mutex<Seen>>,
    /// Cleared when the connection ends: the last figures are then no longer current.
    alive: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The store count before any load: what "cleared" comes back to.
    pub idle: Option<u64>,
}

impl BrokerBacklog {
    /// Connects and subscribes; `None` when the broker refuses (the bench then runs without
    /// these figures). Waits up to [`FIRST_FIGURE_WAIT`] for the first store count, which the
    /// retained markers it stores make the broker publish; without one the figures count as
    /// unknown.
    pub async fn start(broker: &BrokerAddr, client_id: &str) -> Option<BrokerBacklog> {
        let mut stream = raw::connect(broker, client_id, true, 60, Duration::from_secs(10))
            .await
            .ok()?;
        // Not `raw::subscribe`: it drops what comes with the SUBACK, and that is the retained
        // figure, which the broker publishes again only when it changes.
        let mut out = BytesMut::new();
        raw::encode_subscribe(&mut out, 1, STORE_TOPIC, 0);
        raw::encode_subscribe(&mut out, 2, DROPPED_TOPIC, 0);
        let marker = format!("bench/broker-sys/{client_id}");
        encode_retained(&mut out, &marker, b"1");
        stream.write_all(&out).await.ok()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let alive = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let task = tokio::spawn(read_sys(
            stream,
            seen.clone(),
            alive.clone(),
            marker,
            stop.clone(),
        ));
        let mut watcher = BrokerBacklog {
            seen,
            alive,
            stop,
            task,
            idle: None,
        };
        let deadline = Instant::now() + FIRST_FIGURE_WAIT;
        while watcher.store().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watcher.idle = watcher.store();
        Some(watcher)
    }

    fn current(&self) -> Option<std::sync::MutexGuard<'_, Seen>> {
        if !self.alive.load(Ordering::Relaxed) {
            return None;
        }
        self.seen.lock().ok()
    }

    /// The broker's latest store count: messages it holds for any client.
    pub fn store(&self) -> Option<u64> {
        self.current()?.store
    }

    /// Messages the broker has dropped since it started (known once the broker has published
    /// the figure since the watcher connected: it does so when the figure changes).
    pub fn dropped(&self) -> Option<u64> {
        self.current()?.dropped
    }

    /// The largest store count seen since the last call (or since the start).
    pub fn take_max(&self) -> Option<u64> {
        self.current()?.take_max()
    }

    /// What the broker held at the end of a window: the least figure of the last
    /// [`END_SPAN`].
    pub fn held_at_end(&self) -> Option<u64> {
        let since = Instant::now().checked_sub(END_SPAN)?;
        self.current()?.least_since(since)
    }

    /// [`kept_up`] for a load that just ended; `None` when the figures are unknown.
    pub fn kept_up_at_end(&self, offered_per_s: f64) -> Option<(u64, bool)> {
        let end = self.held_at_end()?;
        Some((end, kept_up(self.idle?, end, offered_per_s)))
    }

    /// Waits until the store count is back within [`CLEARED_SLACK`] of the idle one, at most
    /// `limit`. Returns how long that took, or `None` when it did not clear in time or the
    /// figures are unknown.
    pub async fn wait_cleared(&self, limit: Duration) -> Option<Duration> {
        let bound = self.idle? + CLEARED_SLACK;
        let started = Instant::now();
        loop {
            // A watcher whose connection ended has no figures: waiting would only cost the
            // whole limit before every step.
            let store = self.store()?;
            if store <= bound {
                return Some(started.elapsed());
            }
            if started.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A QoS 0 retained PUBLISH; an empty payload deletes the topic's retained message.
fn encode_retained(buf: &mut BytesMut, topic: &str, payload: &[u8]) {
    use bytes::BufMut;
    buf.put_u8(0x31); // PUBLISH, QoS 0, RETAIN
    raw::put_remaining_length(buf, 2 + topic.len() + payload.len());
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    buf.put_slice(payload);
}

async fn read_sys(
    mut stream: tokio::net::TcpStream,
    seen: Arc<Mutex<Seen>>,
    alive: Arc<AtomicBool>,
    marker: String,
    stop: CancellationToken,
) {
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut ping = tokio::time::interval(Duration::from_secs(20));
    // Until the first store count comes, one more retained marker every 2.5 s: subscribing
    // removes the expired retained copies of the two figures from the store, which can cancel
    // the first marker out, and the broker publishes only a count that changed.
    let mut nudge = tokio::time::interval(Duration::from_millis(2500));
    let mut nudges = 0usize;
    let unseen = |seen: &Mutex<Seen>| seen.lock().map(|s| s.store.is_none()).unwrap_or(false);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let mut out = BytesMut::new();
                for n in 1..=nudges {
                    encode_retained(&mut out, &format!("{marker}/{n}"), b"");
                }
                encode_retained(&mut out, &marker, b"");
                raw::encode_disconnect(&mut out);
                let _ = stream.write_all(&out).await;
                break;
            }
            _ = ping.tick() => {
                let mut out = BytesMut::new();
                raw::encode_pingreq(&mut out);
                if stream.write_all(&out).await.is_err() {
                    break;
                }
            }
            _ = nudge.tick(), if nudges < 10 && unseen(&seen) => {
                nudges += 1;
                let mut out = BytesMut::new();
                encode_retained(&mut out, &format!("{marker}/{nudges}"), b"1");
                if stream.write_all(&out).await.is_err() {
                    break;
                }
            }
            read = stream.read_buf(&mut rbuf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    break;
                }
                let mut broken = false;
                loop {
                    match raw::peek_frame(&rbuf) {
                        Ok(Some((first, header, len))) => {
                            if first >> 4 == raw::PUBLISH {
                                if let Ok(p) = raw::parse_publish(first, &rbuf[header..header + len]) {
                                    record(&seen, p.topic, p.payload);
                                }
                            }
                            rbuf.advance(header + len);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
                if broken {
                    break;
                }
            }
        }
    }
    alive.store(false, Ordering::Relaxed);
}

fn record(seen: &Mutex<Seen>, topic: &[u8], payload: &[u8]) {
    let Some(value) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let Ok(mut s) = seen.lock() else { return };
    if topic == STORE_TOPIC.as_bytes() {
        s.store = Some(value);
        if s.recent.len() >= 600 {
            s.recent.pop_front();
        }
        s.recent.push_back((Instant::now(), value));
        s.max_since = Some(s.max_since.map_or(value, |m| m.max(value)));
    } else if topic == DROPPED_TOPIC.as_bytes() {
        s.dropped = Some(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_their_topics_and_the_maximum_restarts_at_the_latest() {
        let seen = Mutex::new(Seen::default());
        record(&seen, STORE_TOPIC.as_bytes(), b"120");
        record(&seen, STORE_TOPIC.as_bytes(), b"90000");
        record(&seen, STORE_TOPIC.as_bytes(), b"4000");
        record(&seen, DROPPED_TOPIC.as_bytes(), b"7");
        record(&seen, b"$SYS/broker/uptime", b"12 seconds");
        record(&seen, STORE_TOPIC.as_bytes(), b"not a number");
        let mut s = seen.into_inner().unwrap();
        assert_eq!((s.store, s.dropped), (Some(4000), Some(7)));
        assert_eq!(s.take_max(), Some(90000));
        // The next window starts from the latest figure, not from zero.
        assert_eq!(s.take_max(), Some(4000));
        // The end of a window: the least of its last figures, so a burst read a moment later
        // does not count as a queue.
        let long_ago = Instant::now() - Duration::from_secs(3600);
        assert_eq!(s.least_since(long_ago), Some(120));
        assert_eq!(
            s.least_since(Instant::now() + Duration::from_secs(1)),
            Some(4000)
        );
    }

    #[test]
    fn the_broker_kept_up_when_what_it_holds_at_the_end_is_a_window_not_a_queue() {
        // At rest it holds 50 (retained); at 45,000/s it may end 2 s, 90,000, behind.
        assert!(kept_up(50, 90_050, 45_000.0));
        assert!(!kept_up(50, 90_051, 45_000.0));
        assert!(!kept_up(52, 398_843, 40_000.0));
        // A slow step still allows a consumer's in-flight window.
        assert!(kept_up(50, 5_050, 1_000.0));
        assert!(!kept_up(50, 5_051, 1_000.0));
    }
}
