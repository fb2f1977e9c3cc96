//! The limits silverguard is measured against, in the same run, on the same machine, before
//! the service starts (so nothing else consumes the stream):
//!
//! * **broker pass-through**: the same heartbeat stream, offered as fast as the bench can,
//!   into the same broker, and a bare subscriber (QoS 1, acknowledging every message at
//!   once, in bulk) that only counts. Its receive rate is what the broker (and this machine)
//!   can pass; silverguard cannot do better.
//! * **PostgreSQL COPY**: `psql \copy` of heartbeat rows from a CSV file into a table of the
//!   same shape as `heartbeats` (same columns, partitioned by `ts`, same unique index), from
//!   one client. The database's own bulk-load limit.
//! * **naive bridge**: what a hand-written MQTT-to-Postgres script does: one subscriber,
//!   one `INSERT` per message (autocommit, a prepared statement, `ON CONFLICT DO NOTHING`),
//!   the PUBACK after the insert, one message at a time.

use bytes::{Buf, BytesMut};
use serde::Serialize;
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::load::{Load, LoadSettings};
use super::{raw, BenchError};
use crate::physiology::Body;
use crate::{now_unix_ms, BrokerAddr};

/// Which baselines to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Which {
    pub broker: bool,
    pub copy: bool,
    pub naive: bool,
}

impl std::str::FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> Result<Which, String> {
        let mut w = Which::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => {
                    w = Which {
                        broker: true,
                        copy: true,
                        naive: true,
                    }
                }
                "none" => w = Which::default(),
                "broker" => w.broker = true,
                "copy" => w.copy = true,
                "naive" => w.naive = true,
                other => {
                    return Err(format!(
                        "unknown baseline {other:?} (broker, copy, naive, all, none)"
                    ))
                }
            }
        }
        Ok(w)
    }
}

impl Which {
    pub fn any(&self) -> bool {
        self.broker || self.copy || self.naive
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerBaseline {
    pub offered_per_s: f64,
    pub connections: usize,
    pub window_s: f64,
    /// What the bench managed to publish (if this is about the offered rate, the publisher
    /// and not the broker may be the limit).
    pub published_per_s: f64,
    /// What the bare subscriber received: the pass-through rate.
    pub received_per_s: f64,
    pub published: u64,
    pub received: u64,
    /// Every `mosquitto` process here over the window, % of one core: at 100 % the broker's
    /// one thread is the limit; well below, the publisher or the machine is.
    pub broker_cpu_percent: Option<f64>,
    /// The bench (publisher and bare subscriber) over the window, % of one core.
    pub bench_cpu_percent: Option<f64>,
    /// What the broker held (`$SYS` store count, [`super::broker_sys`]) at the window's end,
    /// with the load still running, whether that was within what a step may end with
    /// ([`super::broker_sys::BrokerBacklog::kept_up_at_end`], the test a service step gets),
    /// and the most it held from the call's start to then.
    pub broker_held_at_end: Option<u64>,
    pub broker_kept_up: Option<bool>,
    pub broker_held_max: Option<u64>,
    /// Steps at fixed offered rates from the flood's figure up, each judged as the service's
    /// steps are ([`BrokerProbe::sustained`]). A flooded broker can pass less than it keeps
    /// up with at a matched rate (it did on a slow machine: 19,272/s flooded, while the
    /// service's own steps, offered 21,250/s, went through it with nothing lost), so the
    /// flood alone can understate the limit and flatter the ratio.
    pub probes: Vec<BrokerProbe>,
    /// The highest rate the bare subscriber received in a probe that held (what it
    /// received, as a service step counts what it committed).
    pub sustained_per_s: Option<f64>,
    /// The limit the ratios use. With the broker's backlog watched (`$SYS`,
    /// [`super::broker_sys`]): `sustained_per_s`, since the probes are then judged on whether
    /// the broker kept up, and the flood's figure is what it passes while queueing. Without:
    /// the larger of the flood's `received_per_s` and `sustained_per_s`.
    pub limit_per_s: f64,
    /// `limit_per_s` is a probe that held with the broker's backlog judged, not the flood's
    /// figure: only two limits of the same kind are compared (`broker_after`).
    pub limit_held: bool,
}

/// One fixed-rate step of the broker baseline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerProbe {
    pub offered_per_s: f64,
    pub published_per_s: f64,
    pub received_per_s: f64,
    /// Published in the whole probe and not received by the bare subscriber after its drain.
    pub lost: u64,
    pub broker_cpu_percent: Option<f64>,
    /// Published and received ≥ 98 % of offered in the window, nothing lost: the test a
    /// service step passes (its lag test aside: the bare subscriber keeps no backlog).
    pub sustained: bool,
    /// Messages the broker held (`$SYS` store count) at most during the probe and at its
    /// end: what it had sent but not yet seen acknowledged ([`super::broker_sys`]).
    pub broker_backlog_max: Option<u64>,
    pub broker_backlog_end: Option<u64>,
    /// What the broker held at the probe's end was a consumer's window, not a queue
    /// ([`super::broker_sys::kept_up`]); `None` when its figures are unknown. A probe that
    /// held only by queueing does not hold.
    pub broker_kept_up: Option<bool>,
    /// Seconds the probe waited before it started for the broker to clear what the previous
    /// load left.
    pub waited_for_broker_s: Option<f64>,
}

impl BrokerProbe {
    pub fn of(b: &BrokerBaseline) -> BrokerProbe {
        let offered = b.offered_per_s;
        let lost = b.published.saturating_sub(b.received);
        BrokerProbe {
            offered_per_s: offered,
            published_per_s: b.published_per_s,
            received_per_s: b.received_per_s,
            lost,
            broker_cpu_percent: b.broker_cpu_percent,
            sustained: b.published_per_s >= 0.98 * offered
                && b.received_per_s >= 0.98 * offered
                && lost == 0,
            broker_backlog_max: None,
            broker_backlog_end: None,
            broker_kept_up: None,
            waited_for_broker_s: None,
        }
    }
}

/// The next rate to probe the broker at, or `None` when the limit is bracketed within 2.5 %
/// (or no probe rate is left to try). Up in steps of a tenth of the flood's figure while
/// the probes hold, down in such steps while none has held, then halving the gap between the
/// last that held and the first that did not, as the service's refinement does.
pub fn next_broker_probe(flood_per_s: f64, probes: &[BrokerProbe]) -> Option<f64> {
    const MAX_PROBES: usize = 8;
    if flood_per_s <= 0.0 || probes.len() >= MAX_PROBES {
        return None;
    }
    let held = probes
        .iter()
        .filter(|p| p.sustained)
        .map(|p| p.offered_per_s)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let failed = probes
        .iter()
        .filter(|p| !p.sustained)
        .map(|p| p.offered_per_s)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.min(r))));
    match (held, failed) {
        (None, None) => Some(flood_per_s),
        // The broker does not hold the rate it passed when flooded (it passed it by queueing,
        // [`super::broker_sys`]): down until a rate holds.
        (None, Some(lo)) => Some(lo - 0.1 * flood_per_s).filter(|r| *r > 0.0),
        (Some(lo), None) => Some(lo + 0.1 * flood_per_s),
        (Some(lo), Some(hi)) => ((hi - lo) > 0.025 * lo).then_some((lo + hi) / 2.0),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyBaseline {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    /// Table + indexes after the load, per row.
    pub bytes_per_row: Option<f64>,
    pub csv_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NaiveBaseline {
    pub offered_per_s: f64,
    pub window_s: f64,
    pub committed_per_s: f64,
    pub committed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Baselines {
    pub broker: Option<BrokerBaseline>,
    /// The broker measured again after a ramp, once the service had stopped: the same
    /// flood and probes. The ratio uses the higher of the two limits when both are of the
    /// same kind ([`BrokerBaseline::limit_held`]), else the one a probe held.
    pub broker_after: Option<BrokerBaseline>,
    pub copy: Option<CopyBaseline>,
    pub naive: Option<NaiveBaseline>,
    /// Baselines that could not run, and why.
    pub skipped: Vec<String>,
}

/// The heartbeat columns, in `heartbeats` order (as silverguard writes them).
pub const COLUMNS: &str = "device_id, ts, seq, received_at, heart_rate_bpm, spo2_pct, \
     systolic_mmhg, diastolic_mmhg, skin_temp_dc, steps_today, battery_pct, worn, lat_e7, \
     lon_e7, loc_accuracy_m, loc_source, clock_skewed, device_ts";

/// A table shaped like `heartbeats`: same columns, partitioned by `ts` (one default
/// partition), the same unique and partial indexes.
pub fn same_shape_table_sql(name: &str) -> String {
    format!(
        "DROP TABLE IF EXISTS {name};
         CREATE TABLE {name} (LIKE heartbeats INCLUDING DEFAULTS) PARTITION BY RANGE (ts);
         CREATE TABLE {name}_p PARTITION OF {name} DEFAULT;
         CREATE UNIQUE INDEX ON {name} (device_id, ts, seq);
         CREATE INDEX ON {name} (device_id, seq, device_ts) WHERE clock_skewed;"
    )
}

/// A subscriber on a raw connection. `on_publish` handles each message (and may take its
/// time); the PUBACKs of what was read are written after it, together.
async fn subscriber(
    broker: &BrokerAddr,
    client_id: &str,
) -> Result<tokio::net::TcpStream, BenchError> {
    let mut s = raw::connect(broker, client_id, true, 60, Duration::from_secs(10))
        .await
        .map_err(|e| BenchError::Mqtt(format!("{client_id}: {e}")))?;
    raw::subscribe(&mut s, "sg/v1/dev/+/hb", Duration::from_secs(10))
        .await
        .map_err(|e| BenchError::Mqtt(format!("{client_id}: {e}")))?;
    Ok(s)
}

/// The heartbeat stream a baseline is offered.
#[derive(Debug, Clone)]
pub struct Offer {
    pub devices: Vec<String>,
    pub connections: usize,
    pub rate: f64,
    pub warmup: Duration,
    pub window: Duration,
    /// The publishers' write tick, as in the load ([`LoadSettings::tick`]).
    pub tick: Duration,
    /// How the broker baseline's subscriber coalesces its reads (zero: it does not).
    pub read_coalesce: Duration,
    /// How the publishers read the broker's PUBACKs, as in the load
    /// ([`LoadSettings::ack_read_coalesce`]).
    pub ack_read_coalesce: Duration,
}

/// Broker pass-through: flood the broker with the load, count what a bare subscriber gets.
pub async fn broker_passthrough(
    broker: &BrokerAddr,
    offer: Offer,
    tag: &str,
    backlog: Option<&super::broker_sys::BrokerBacklog>,
) -> Result<BrokerBaseline, BenchError> {
    let Offer {
        devices,
        connections,
        rate,
        warmup,
        window,
        tick,
        read_coalesce,
        ack_read_coalesce,
    } = offer;
    let stream = subscriber(broker, &format!("bench-base-sub-{tag}")).await?;
    // As silverguard's heartbeat connections read (`mqtt.read_coalesce_bytes` is 32 KiB).
    let coalescing = if read_coalesce.is_zero() {
        None
    } else {
        Some(
            raw::Coalescing::start(&stream, read_coalesce, 32 * 1024)
                .map_err(|e| BenchError::Mqtt(format!("bench-base-sub-{tag}: SO_RCVLOWAT: {e}")))?,
        )
    };
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    // The counter is spawned: if the load cannot start, it must not stay subscribed and
    // acknowledging for the rest of the run (up to nine of these run, flood and probes).
    let _stop_on_return = stop.clone().drop_guard();
    let counter = {
        let received = received.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut rbuf = BytesMut::with_capacity(256 * 1024);
            let mut wbuf = BytesMut::with_capacity(16 * 1024);
            loop {
                if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                    rbuf.reserve(256 * 1024);
                }
                let read = async {
                    match &coalescing {
                        Some(c) => c.read(&stream, &mut rbuf).await,
                        None => stream.read_buf(&mut rbuf).await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = read => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
                let mut n = 0;
                while let Ok(Some((first, header, len))) = raw::peek_frame(&rbuf) {
                    if first >> 4 == raw::PUBLISH {
                        if let Ok(p) = raw::parse_publish(first, &rbuf[header..header + len]) {
                            if p.qos > 0 {
                                raw::encode_puback(&mut wbuf, p.pkid);
                            }
                            n += 1;
                        }
                    }
                    rbuf.advance(header + len);
                }
                received.fetch_add(n, Ordering::Relaxed);
                if !wbuf.is_empty() {
                    if stream.write_all(&wbuf).await.is_err() {
                        break;
                    }
                    wbuf.clear();
                }
            }
            wbuf.clear();
            raw::encode_disconnect(&mut wbuf);
            let _ = stream.write_all(&wbuf).await;
        })
    };
    let load = Load::start(
        LoadSettings {
            broker: broker.clone(),
            devices,
            connections,
            rate,
            seed: 7,
            client_prefix: format!("bench-base-pub-{tag}"),
            markers_per_s: 0.0,
            tick,
            ack_read_coalesce,
        },
        None,
    )
    .await?;
    tokio::time::sleep(warmup).await;
    let cpu = || {
        (
            super::service::ticks_by_command("mosquitto"),
            super::service::process_ticks(std::process::id()),
        )
    };
    let (t0, p0, r0, cpu0) = (
        Instant::now(),
        load.counters.published(),
        received.load(Ordering::Relaxed),
        cpu(),
    );
    tokio::time::sleep(window).await;
    let (t1, p1, r1, cpu1) = (
        Instant::now(),
        load.counters.published(),
        received.load(Ordering::Relaxed),
        cpu(),
    );
    // Judged here, as a service step is at its window's end: once the publishers stop, the
    // broker reads the acknowledgements it fell behind on within seconds.
    let broker_end = backlog.and_then(|b| b.kept_up_at_end(rate));
    let broker_held_max = backlog.and_then(|b| b.take_max());
    let ticks = super::service::clock_ticks_per_s();
    let pct = |a: Option<u64>, b: Option<u64>| super::stats::cpu_percent_of(a, b, ticks, t1 - t0);
    let published = load.counters.clone();
    load.stop(Duration::from_secs(10)).await;
    // Let the subscriber take what the broker still has for it.
    let total = published.published();
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = counter.await;
    let secs = (t1 - t0).as_secs_f64();
    Ok(BrokerBaseline {
        offered_per_s: rate,
        connections,
        window_s: secs,
        published_per_s: (p1 - p0) as f64 / secs,
        received_per_s: (r1 - r0) as f64 / secs,
        published: total,
        received: received.load(Ordering::Relaxed),
        broker_cpu_percent: pct(cpu0.0, cpu1.0),
        bench_cpu_percent: pct(cpu0.1, cpu1.1),
        limit_per_s: (r1 - r0) as f64 / secs,
        broker_held_at_end: broker_end.map(|(n, _)| n),
        broker_kept_up: broker_end.map(|(_, k)| k),
        broker_held_max,
        ..BrokerBaseline::default()
    })
}

/// One heartbeat as the naive bridge maps it to columns.
struct Row {
    device_id: String,
    ts: SystemTime,
    seq: i64,
    received_at: SystemTime,
    vitals: [Option<i16>; 5],
    steps: Option<i32>,
    battery: Option<i16>,
    worn: bool,
    lat: Option<i32>,
    lon: Option<i32>,
    acc: Option<i32>,
    src: Option<i16>,
}

fn nonzero16(v: u32) -> Option<i16> {
    (v != 0).then(|| v.min(i16::MAX as u32) as i16)
}

fn row_of(topic: &[u8], payload: &[u8]) -> Option<Row> {
    let topic = std::str::from_utf8(topic).ok()?;
    let device_id = topic.split('/').nth(3)?.to_string();
    let hb = pb::Heartbeat::decode(payload).ok()?;
    let loc = hb.location;
    Some(Row {
        device_id,
        ts: UNIX_EPOCH + Duration::from_millis(hb.measured_at_ms.max(0) as u64),
        seq: hb.seq as i64,
        received_at: SystemTime::now(),
        vitals: [
            nonzero16(hb.heart_rate_bpm),
            nonzero16(hb.spo2_pct),
            nonzero16(hb.systolic_mmhg),
            nonzero16(hb.diastolic_mmhg),
            (hb.skin_temp_decicelsius != 0).then_some(hb.skin_temp_decicelsius as i16),
        ],
        steps: Some(hb.steps_today as i32),
        battery: Some(hb.battery_pct as i16),
        worn: hb.worn,
        lat: loc.map(|l| l.lat_e7),
        lon: loc.map(|l| l.lon_e7),
        acc: loc.map(|l| l.accuracy_m as i32),
        src: loc.map(|l| l.source as i16),
    })
}

/// The naive bridge: one INSERT per message, then its PUBACK.
pub async fn naive_bridge(
    broker: &BrokerAddr,
    db: &tokio_postgres::Client,
    offer: Offer,
    tag: &str,
) -> Result<NaiveBaseline, BenchError> {
    let Offer {
        devices,
        connections,
        rate,
        warmup,
        window,
        tick,
        ack_read_coalesce,
        ..
    } = offer;
    let db_err = |e: tokio_postgres::Error| BenchError::Db(format!("naive bridge: {e}"));
    db.batch_execute(&same_shape_table_sql("naive_heartbeats"))
        .await
        .map_err(db_err)?;
    let insert = db
        .prepare(&format!(
            "INSERT INTO naive_heartbeats ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, false, NULL) \
             ON CONFLICT DO NOTHING"
        ))
        .await
        .map_err(db_err)?;
    let mut stream = subscriber(broker, &format!("bench-naive-{tag}")).await?;
    let committed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let bridge = async {
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let mut ack = BytesMut::with_capacity(4);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok::<(), BenchError>(()),
                r = stream.read_buf(&mut rbuf) => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                },
            }
            while let Ok(Some((first, header, len))) = raw::peek_frame(&rbuf) {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if first >> 4 == raw::PUBLISH {
                    if let Ok(p) = raw::parse_publish(first, &rbuf[header..header + len]) {
                        if let Some(r) = row_of(p.topic, p.payload) {
                            db.execute(
                                &insert,
                                &[
                                    &r.device_id,
                                    &r.ts,
                                    &r.seq,
                                    &r.received_at,
                                    &r.vitals[0],
                                    &r.vitals[1],
                                    &r.vitals[2],
                                    &r.vitals[3],
                                    &r.vitals[4],
                                    &r.steps,
                                    &r.battery,
                                    &r.worn,
                                    &r.lat,
                                    &r.lon,
                                    &r.acc,
                                    &r.src,
                                ],
                            )
                            .await
                            .map_err(db_err)?;
                            committed.fetch_add(1, Ordering::Relaxed);
                        }
                        if p.qos > 0 {
                            ack.clear();
                            raw::encode_puback(&mut ack, p.pkid);
                            if stream.write_all(&ack).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                rbuf.advance(header + len);
            }
        }
    };
    let measure = async {
        let load = Load::start(
            LoadSettings {
                broker: broker.clone(),
                devices,
                connections,
                rate,
                seed: 11,
                client_prefix: format!("bench-naive-pub-{tag}"),
                markers_per_s: 0.0,
                tick,
                ack_read_coalesce,
            },
            None,
        )
        .await?;
        tokio::time::sleep(warmup).await;
        let (t0, c0) = (Instant::now(), committed.load(Ordering::Relaxed));
        tokio::time::sleep(window).await;
        let (t1, c1) = (Instant::now(), committed.load(Ordering::Relaxed));
        load.stop(Duration::from_secs(10)).await;
        stop.cancel();
        let secs = (t1 - t0).as_secs_f64();
        Ok::<_, BenchError>(NaiveBaseline {
            offered_per_s: rate,
            window_s: secs,
            committed_per_s: (c1 - c0) as f64 / secs,
            committed: c1 - c0,
        })
    };
    let (b, m) = tokio::join!(bridge, measure);
    b?;
    let report = m?;
    // The rest of the stream is the broker's to discard (clean session); the table goes.
    let _ = db
        .batch_execute("DROP TABLE IF EXISTS naive_heartbeats")
        .await;
    Ok(report)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Unix ms as a PostgreSQL `timestamptz` literal in UTC.
pub fn timestamptz_text(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, frac) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{frac:03}+00")
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

/// Writes `rows` heartbeat rows as CSV in `COLUMNS` order: devices round-robin, vitals from
/// the same physiology as the load, distinct `(device_id, ts, seq)`.
pub fn write_copy_csv(
    path: &Path,
    rows: u64,
    devices: &[String],
    seed: u64,
) -> std::io::Result<u64> {
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let n = devices.len().max(1);
    let mut bodies: Vec<Option<Body>> = (0..n).map(|_| None).collect();
    let base = now_unix_ms() - rows as i64 - 60_000;
    for i in 0..rows {
        let d = (i % n as u64) as usize;
        let body = bodies[d].get_or_insert_with(|| Body::new(seed, d as u64));
        let at = base + i as i64;
        let seq = i / n as u64 + 1;
        let hb = body.sample(at).to_heartbeat(&devices[d], seq, at);
        let nz = |v: u32| (v != 0).then_some(v);
        let loc = hb.location;
        let ts = timestamptz_text(at);
        writeln!(
            out,
            "{},{ts},{seq},{ts},{},{},{},{},{},{},{},{},{},{},{},{},false,",
            devices[d],
            opt(nz(hb.heart_rate_bpm)),
            opt(nz(hb.spo2_pct)),
            opt(nz(hb.systolic_mmhg)),
            opt(nz(hb.diastolic_mmhg)),
            opt((hb.skin_temp_decicelsius != 0).then_some(hb.skin_temp_decicelsius)),
            hb.steps_today,
            hb.battery_pct,
            hb.worn,
            opt(loc.map(|l| l.lat_e7)),
            opt(loc.map(|l| l.lon_e7)),
            opt(loc.map(|l| l.accuracy_m)),
            opt(loc.map(|l| l.source)),
        )?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// PostgreSQL's own COPY rate: `psql \copy` of `rows` rows into a same-shaped table.
pub async fn copy_rate(
    db: &tokio_postgres::Client,
    db_url: &str,
    rows: u64,
    devices: &[String],
    seed: u64,
    csv: &Path,
) -> Result<CopyBaseline, BenchError> {
    let db_err = |e: tokio_postgres::Error| BenchError::Db(format!("COPY baseline: {e}"));
    let csv_bytes = {
        let (path, devices) = (csv.to_path_buf(), devices.to_vec());
        tokio::task::spawn_blocking(move || write_copy_csv(&path, rows, &devices, seed))
            .await
            .map_err(|e| BenchError::Config(format!("CSV writer: {e}")))?
            .map_err(|e| BenchError::io(&format!("writing {}", csv.display()), e))?
    };
    db.batch_execute(&same_shape_table_sql("copy_heartbeats"))
        .await
        .map_err(db_err)?;
    let command = format!(
        "\\copy copy_heartbeats ({COLUMNS}) FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let started = Instant::now();
    let out = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db_url,
            "-c",
            &command,
        ])
        .output()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(csv);
    let out = out.map_err(|e| BenchError::io("running psql (is it installed?)", e))?;
    if !out.status.success() {
        return Err(BenchError::Db(format!(
            "psql \\copy failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let bytes = db
        .query_one(
            "SELECT sum(pg_total_relation_size(relid))::float8 FROM pg_partition_tree('copy_heartbeats')",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get::<_, Option<f64>>(0).ok().flatten());
    let _ = db
        .batch_execute("DROP TABLE IF EXISTS copy_heartbeats")
        .await;
    Ok(CopyBaseline {
        rows,
        seconds,
        rows_per_s: rows as f64 / seconds,
        bytes_per_row: bytes.map(|b| b / rows as f64),
        csv_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_probes_climb_from_the_flood_and_bracket_the_limit() {
        use super::{next_broker_probe, BrokerProbe};
        let probe = |offered: f64, sustained: bool| BrokerProbe {
            offered_per_s: offered,
            sustained,
            ..BrokerProbe::default()
        };
        assert_eq!(next_broker_probe(20_000.0, &[]), Some(20_000.0));
        assert_eq!(
            next_broker_probe(20_000.0, &[probe(20_000.0, false)]),
            Some(18_000.0)
        );
        let down = [
            probe(20_000.0, false),
            probe(18_000.0, false),
            probe(16_000.0, true),
        ];
        assert_eq!(next_broker_probe(20_000.0, &down), Some(17_000.0));
        assert_eq!(
            next_broker_probe(20_000.0, &[probe(20_000.0, true)]),
            Some(22_000.0)
        );
        let climbed = [
            probe(20_000.0, true),
            probe(22_000.0, true),
            probe(24_000.0, false),
        ];
        assert_eq!(next_broker_probe(20_000.0, &climbed), Some(23_000.0));
        let bracketed = [
            probe(20_000.0, true),
            probe(22_000.0, true),
            probe(24_000.0, false),
            probe(23_000.0, false),
            probe(22_500.0, true),
        ];
        assert_eq!(next_broker_probe(20_000.0, &bracketed), None);
        let endless: Vec<BrokerProbe> = (0..8).map(|i| probe(20_000.0 + i as f64, true)).collect();
        assert_eq!(next_broker_probe(20_000.0, &endless), None);
    }

    #[test]
    fn a_broker_probe_holds_only_when_everything_offered_passed() {
        use super::{BrokerBaseline, BrokerProbe};
        let b = |published_per_s: f64, received_per_s: f64, published: u64, received: u64| {
            BrokerProbe::of(&BrokerBaseline {
                offered_per_s: 20_000.0,
                published_per_s,
                received_per_s,
                published,
                received,
                ..BrokerBaseline::default()
            })
        };
        assert!(b(19_900.0, 19_880.0, 240_000, 240_000).sustained);
        assert!(
            !b(19_000.0, 19_000.0, 228_000, 228_000).sustained,
            "the publisher fell behind"
        );
        assert!(
            !b(19_900.0, 18_000.0, 240_000, 240_000).sustained,
            "a backlog in the window"
        );
        assert!(
            !b(19_900.0, 19_880.0, 240_000, 239_990).sustained,
            "ten lost"
        );
    }

    #[test]
    fn which_parses() {
        let all: Which = "all".parse().unwrap();
        assert!(all.broker && all.copy && all.naive);
        let w: Which = "broker, naive".parse().unwrap();
        assert!(w.broker && w.naive && !w.copy);
        assert!(!"none".parse::<Which>().unwrap().any());
        assert!("bogus".parse::<Which>().is_err());
    }

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(timestamptz_text(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(
            timestamptz_text(1_709_164_800_123 + 3_723_000),
            "2024-02-29 01:02:03.123+00"
        );
        assert_eq!(timestamptz_text(-1), "1969-12-31 23:59:59.999+00");
    }

    #[test]
    fn csv_rows_have_every_column() {
        let dir = std::env::temp_dir().join(format!("sg-csv-{}", rand::random::<u32>()));
        let devices = vec!["a".to_string(), "b".to_string()];
        write_copy_csv(&dir, 5, &devices, 1).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        for l in lines {
            assert_eq!(l.split(',').count(), 18, "{l}");
        }
        assert!(text.starts_with("a,"));
    }
}
