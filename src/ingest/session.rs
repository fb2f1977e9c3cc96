//! The ingest side of the broker: an MQTT 5 session of our own, on rumqttc's packet codec.
//!
//! Why not rumqttc's event loop (the downlink and the credential admin still use it): it
//! writes and flushes every request on its own. Every PUBACK cost silverguard a channel
//! send, a task wake-up and a `write(2)`, and cost the single-threaded broker a wake-up and a
//! `read(2)` of four bytes; at tens of thousands of messages per second that was the largest
//! share of both programs' system time (`docs/performance.md`, "The ingest session"). Here a
//! reader task takes each socket read apart into packets, and an acker task writes all the
//! PUBACKs a commit releases with one `write`: a committed batch of 5,000 heartbeats is
//! acknowledged in a few writes instead of 5,000.
//!
//! Ordering: MQTT requires PUBACKs in the order the PUBLISHes arrived (MQTT 5 §4.6), while
//! our lanes commit out of order (an SOS commits before the heartbeat batch received just
//! before it). The acker therefore keeps a window of received messages and acknowledges the
//! longest committed prefix. The cost is that an ack may wait for an earlier message's
//! commit; the commit, which is what matters for safety and latency, never waits.
//!
//! Reconnects: packet ids belong to a network connection. After a reconnect the broker
//! resends everything unacknowledged (persistent session), so the acker forgets the old
//! window; those resends are deduplicated by the database's unique keys and acked anew.
//!
//! Keep-alive: the acker sends PINGREQ when it has written nothing for half the keep-alive;
//! the reader gives the connection up when the broker has sent nothing (not even PINGRESP)
//! for twice the keep-alive, and reconnects.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    Filter, Login, Packet, PingReq, PubAck, PubComp, PubRec, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::mqtt::{broker_address, tls_client_config, MqttConfigError};
use super::{AckToken, Router};
use crate::config::MqttSettings;
use crate::ingest::validate::Limits;
use crate::metrics::IngestMetrics;

type BoxReader = Box<dyn AsyncRead + Send + Unpin>;

/// The read half of a connection. Plain TCP keeps its socket, so its reads can be coalesced.
enum ReadHalf {
    Tcp {
        half: tokio::net::tcp::OwnedReadHalf,
        coalescing: Option<Coalescing>,
    },
    Tls(BoxReader),
}

impl ReadHalf {
    /// Coalesces this connection's reads from now on, when it is plain TCP and `setting`
    /// (the longest wait, the waking bytes) is on. The handshake reads every byte at once.
    fn coalesce(&mut self, setting: Option<(Duration, u32)>) {
        let (ReadHalf::Tcp { half, coalescing }, Some((wait, bytes))) = (self, setting) else {
            return;
        };
        match Coalescing::start(half.as_ref(), wait, bytes) {
            Ok(c) => *coalescing = Some(c),
            Err(e) => tracing::warn!(error = %e,
                "cannot coalesce reads (SO_RCVLOWAT); reading every message as it arrives"),
        }
    }

    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            ReadHalf::Tcp {
                half,
                coalescing: Some(c),
            } => c.read(half.as_ref(), buf).await,
            ReadHalf::Tcp { half, .. } => half.read_buf(buf).await,
            ReadHalf::Tls(r) => r.read_buf(buf).await,
        }
    }
}

/// Read coalescing. Mosquitto writes every message with a `write(2)` of its own, and on
/// loopback each write runs our socket's wake-up inside the broker's system call: with the
/// reader parked in `epoll_wait`, that was several thousand cross-core wake-ups a second at
/// 40,000 messages/s, paid by the broker's single thread, which is the first thing to run
/// out on a shared node. With `SO_RCVLOWAT` the kernel wakes us only once `bytes` are
/// waiting, and the reader looks anyway every `wait`, which bounds what a message can wait.
/// The bench's broker baseline reads the same way (`firmware-sim/src/bench/raw.rs`), so that
/// the broker's limit is measured for a consumer that costs it what silverguard does.
struct Coalescing {
    wait: Duration,
    /// `recv` calls made, with data or without: what an idle connection costs (tests).
    attempts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Coalescing {
    /// Turns coalescing on for `stream`, or reports why it cannot (the reader then reads
    /// every message as it arrives).
    fn start(
        stream: &tokio::net::TcpStream,
        wait: Duration,
        bytes: u32,
    ) -> std::io::Result<Coalescing> {
        use std::os::fd::AsRawFd;
        let value = bytes.min(i32::MAX as u32) as libc::c_int;
        // SAFETY: the descriptor is borrowed from a live socket, and the option value is a
        // c_int of the length passed, as SO_RCVLOWAT expects.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Coalescing {
            wait,
            attempts: Default::default(),
        })
    }

    /// Waits until the kernel says enough is there or `wait` has passed, then reads what
    /// there is. Returns 0 only at the end of the stream.
    async fn read(
        &self,
        stream: &tokio::net::TcpStream,
        buf: &mut BytesMut,
    ) -> std::io::Result<usize> {
        loop {
            let woken = tokio::select! {
                biased;
                r = stream.readable() => { r?; true }
                _ = tokio::time::sleep(self.wait) => false,
            };
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // After a wake-up, through tokio so that an empty read clears its readiness;
            // after the timer, straight to the socket: tokio has seen no readiness to check.
            let read = if woken {
                stream.try_io(tokio::io::Interest::READABLE, || read_now(stream, buf))
            } else {
                read_now(stream, buf)
            };
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// One non-blocking `recv` into the buffer's spare capacity (made room for first: a `recv`
/// into nothing would return 0, which means the end of the stream).
fn read_now(stream: &tokio::net::TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(READ_CHUNK);
    }
    // MSG_DONTWAIT: below the low-water mark Linux returns what is there, but the BSDs
    // refuse a plain recv on a non-blocking socket until the mark is reached.
    let n = socket2::SockRef::from(stream)
        .recv_with_flags(buf.spare_capacity_mut(), libc::MSG_DONTWAIT)?;
    // SAFETY: recv initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

type BoxWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// How much the reader asks the socket for at a time (at most).
const READ_CHUNK: usize = 64 * 1024;
/// TCP connect, TLS handshake, CONNECT and CONNACK together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands the acker applies before it writes: bounds one write and the time a ping waits.
const MAX_COMMANDS_PER_WRITE: usize = 4096;

pub enum AckCmd {
    /// A new network connection is up: its write half, and a fresh window (old packet ids
    /// are void).
    Attach(BoxWriter),
    /// The connection is gone: drop the write half and the window.
    Detach,
    /// A message was received; `ack` (QoS, packet id) is None for QoS 0 (nothing to
    /// acknowledge).
    Register { seq: u64, ack: Option<(QoS, u16)> },
    /// The message's rows are committed (or it was rejected and recorded).
    Done(u64),
    /// `Done` for several messages (a committed heartbeat batch).
    DoneMany(Vec<u64>),
    /// The broker released a QoS 2 message (PUBREL): answer PUBCOMP. Only a broker that
    /// ignores our subscription's QoS 1 would send QoS 2, but the protocol must not stall.
    Release(u16),
    /// Send what is committed, then DISCONNECT (normal) and close; answers when done.
    Disconnect(oneshot::Sender<()>),
}

impl std::fmt::Debug for AckCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckCmd::Attach(_) => f.write_str("Attach"),
            AckCmd::Detach => f.write_str("Detach"),
            AckCmd::Register { seq, ack } => write!(f, "Register({seq}, {ack:?})"),
            AckCmd::Done(seq) => write!(f, "Done({seq})"),
            AckCmd::DoneMany(seqs) => write!(f, "DoneMany({} messages)", seqs.len()),
            AckCmd::Release(pkid) => write!(f, "Release({pkid})"),
            AckCmd::Disconnect(_) => f.write_str("Disconnect"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    #[error("expected CONNACK, the broker sent {0}")]
    UnexpectedPacket(String),
    #[error("the broker closed the connection")]
    Closed,
    #[error("nothing from the broker for {0:?}")]
    Silent(Duration),
    #[error("the broker sent DISCONNECT ({0:?})")]
    Disconnected(DisconnectReasonCode),
    #[error("malformed packet: {0}")]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything one ingest connection needs to (re)connect: built once, so a bad URL or CA
/// file fails at start rather than at the first reconnect.
#[derive(Clone)]
pub struct SessionConfig {
    /// `{client_id}-{suffix}`: the persistent session's name at the broker.
    pub client_id: String,
    pub filter: String,
    addr: String,
    host: String,
    port: u16,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    login: Option<Login>,
    keep_alive: Duration,
    session_expiry: Duration,
    receive_maximum: u16,
    max_packet_bytes: u32,
    /// Read coalescing (plain TCP): the longest a message waits, and the bytes that wake the
    /// reader sooner. None reads every message as it arrives.
    read_coalesce: Option<(Duration, u32)>,
}

impl SessionConfig {
    pub fn new(
        settings: &MqttSettings,
        suffix: &str,
        filter: String,
    ) -> Result<SessionConfig, MqttConfigError> {
        let (host, port, tls) = broker_address(settings)?;
        let tls = if tls {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| MqttConfigError::Tls(format!("server name {host:?}: {e}")))?;
            Some((
                tokio_rustls::TlsConnector::from(tls_client_config(settings)?),
                name,
            ))
        } else {
            None
        };
        let login = match (&settings.username, &settings.password) {
            (Some(user), Some(pass)) => Some(Login::new(user.clone(), pass.expose())),
            _ => None,
        };
        Ok(SessionConfig {
            client_id: format!("{}-{suffix}", settings.client_id),
            filter,
            addr: format!("{host}:{port}"),
            host,
            port,
            tls,
            login,
            keep_alive: settings.keep_alive.max(Duration::from_secs(1)),
            session_expiry: settings.session_expiry,
            receive_maximum: settings.receive_maximum.max(1),
            max_packet_bytes: settings.max_packet_bytes,
            read_coalesce: (!settings.read_coalesce.is_zero())
                .then_some((settings.read_coalesce, settings.read_coalesce_bytes.max(1))),
        })
    }

    /// Whether this connection's reads are coalesced.
    pub fn coalesces_reads(&self) -> bool {
        self.read_coalesce.is_some()
    }

    /// Reads every message as it arrives: for the connection an SOS comes in on.
    pub fn without_read_coalescing(mut self) -> SessionConfig {
        self.read_coalesce = None;
        self
    }
}

fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), CodecError> {
    packet.write(out, None).map(|_| ())
}

/// Opens the network connection, logs in and subscribes. Returns the two halves, the
/// CONNACK, and whatever the broker sent right behind it (resent messages of the session).
async fn open(
    cfg: &SessionConfig,
) -> Result<(ReadHalf, BoxWriter, ConnAck, BytesMut), SessionError> {
    let tcp = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| SessionError::Connect(cfg.addr.clone(), e))?;
    // Acks are already batched here; what is written must go out now.
    tcp.set_nodelay(true)?;
    let (mut rd, mut wr): (ReadHalf, BoxWriter) = match &cfg.tls {
        None => {
            let (r, w) = tcp.into_split();
            (
                ReadHalf::Tcp {
                    half: r,
                    coalescing: None,
                },
                Box::new(w),
            )
        }
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| SessionError::Tls(cfg.addr.clone(), e))?;
            let (r, w) = tokio::io::split(tls);
            (ReadHalf::Tls(Box::new(r)), Box::new(w))
        }
    };
    let connect = Connect {
        keep_alive: cfg.keep_alive.as_secs().min(u16::MAX as u64) as u16,
        client_id: cfg.client_id.clone(),
        // A persistent session: the broker keeps our subscription and queues messages while
        // we are down or restarting, so nothing published meanwhile is lost.
        clean_start: false,
        properties: Some(ConnectProperties {
            session_expiry_interval: Some(cfg.session_expiry.as_secs().min(u32::MAX as u64) as u32),
            receive_maximum: Some(cfg.receive_maximum),
            max_packet_size: Some(cfg.max_packet_bytes),
            ..ConnectProperties::new()
        }),
    };
    let mut out = BytesMut::new();
    encode(&Packet::Connect(connect, None, cfg.login.clone()), &mut out)?;
    wr.write_all(&out).await?;
    wr.flush().await?;

    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let connack = loop {
        match Packet::read(&mut buf, Some(cfg.max_packet_bytes)) {
            Ok(Packet::ConnAck(c)) => break c,
            Ok(other) => return Err(SessionError::UnexpectedPacket(packet_name(&other).into())),
            Err(CodecError::InsufficientBytes(_)) => {
                if rd.read_buf(&mut buf).await? == 0 {
                    return Err(SessionError::Closed);
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if connack.code != ConnectReturnCode::Success {
        return Err(SessionError::Refused(connack.code));
    }
    // Subscribing again is idempotent and covers a session the broker lost.
    let mut subscribe = Subscribe::new(Filter::new(cfg.filter.clone(), QoS::AtLeastOnce), None);
    subscribe.pkid = 1;
    out.clear();
    encode(&Packet::Subscribe(subscribe), &mut out)?;
    wr.write_all(&out).await?;
    wr.flush().await?;
    Ok((rd, wr, connack, buf))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Auth(_) => "AUTH",
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PingReq(_) => "PINGREQ",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::Disconnect(_) => "DISCONNECT",
    }
}

/// One received message in the acker's window.
struct Slot {
    ack: Option<(QoS, u16)>,
    done: bool,
}

/// The acker's state: the window of received messages, the connection's write half, and the
/// bytes due on it.
struct Acker {
    window: VecDeque<Slot>,
    /// The receive sequence number of `window[0]`.
    base: u64,
    writer: Option<BoxWriter>,
    out: BytesMut,
    /// PUBACKs (and PUBRECs) encoded into `out` since the last write.
    acks_due: u64,
    last_write: Instant,
    metrics: IngestMetrics,
}

impl Acker {
    fn new(metrics: IngestMetrics) -> Acker {
        Acker {
            window: VecDeque::new(),
            base: 0,
            writer: None,
            out: BytesMut::with_capacity(16 * 1024),
            acks_due: 0,
            last_write: Instant::now(),
            metrics,
        }
    }

    fn forget_window(&mut self) {
        self.metrics.pending_acks.dec_by(self.window.len() as i64);
        self.window.clear();
        self.out.clear();
        self.acks_due = 0;
    }

    fn mark_done(&mut self, seq: u64) {
        if seq >= self.base {
            if let Some(slot) = self.window.get_mut((seq - self.base) as usize) {
                slot.done = true;
            }
        }
    }

    /// Applies one command. Returns the caller of `Disconnect`, which is answered after the
    /// final write.
    fn apply(&mut self, cmd: AckCmd) -> Option<oneshot::Sender<()>> {
        match cmd {
            AckCmd::Attach(writer) => {
                self.forget_window();
                self.writer = Some(writer);
                self.last_write = Instant::now();
            }
            AckCmd::Detach => {
                self.forget_window();
                self.writer = None;
            }
            AckCmd::Register { seq, ack } => {
                if self.window.is_empty() {
                    self.base = seq;
                }
                self.window.push_back(Slot { ack, done: false });
                self.metrics.pending_acks.inc();
            }
            AckCmd::Done(seq) => self.mark_done(seq),
            AckCmd::DoneMany(seqs) => {
                for seq in seqs {
                    self.mark_done(seq);
                }
            }
            AckCmd::Release(pkid) => {
                if self.writer.is_some() {
                    // Cannot fail: a PUBCOMP without properties has a fixed size.
                    let _ = encode(&Packet::PubComp(PubComp::new(pkid, None)), &mut self.out);
                }
            }
            AckCmd::Disconnect(reply) => return Some(reply),
        }
        None
    }

    /// Encodes the acknowledgements of the longest committed prefix of the window.
    fn take_committed_prefix(&mut self) {
        while self.window.front().is_some_and(|s| s.done) {
            let Some(slot) = self.window.pop_front() else {
                break;
            };
            self.base += 1;
            self.metrics.pending_acks.dec();
            // Without a connection there is nobody to acknowledge to: the broker redelivers
            // the message on the next one, and the unique keys make that harmless.
            if let (Some((qos, pkid)), Some(_)) = (slot.ack, &self.writer) {
                let packet = match qos {
                    QoS::ExactlyOnce => Packet::PubRec(PubRec::new(pkid, None)),
                    _ => Packet::PubAck(PubAck::new(pkid, None)),
                };
                // Cannot fail: acks without properties have a fixed size.
                let _ = encode(&packet, &mut self.out);
                self.acks_due += 1;
            }
        }
    }

    /// Writes what is due in one write. A failed write drops the write half; the reader sees
    /// the broken connection and reconnects.
    async fn write_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let Some(writer) = self.writer.as_mut() else {
            self.out.clear();
            self.acks_due = 0;
            return;
        };
        let result = async {
            writer.write_all(&self.out).await?;
            writer.flush().await
        }
        .await;
        self.out.clear();
        match result {
            Ok(()) => {
                self.last_write = Instant::now();
                if self.acks_due > 0 {
                    self.metrics.acks_sent.inc_by(self.acks_due);
                    self.metrics.ack_writes.inc();
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write to the broker; waiting for the reconnect");
                self.writer = None;
            }
        }
        self.acks_due = 0;
    }

    async fn ping_if_idle(&mut self, idle: Duration) {
        if self.writer.is_some() && self.last_write.elapsed() >= idle {
            let _ = encode(&Packet::PingReq(PingReq), &mut self.out);
            self.write_out().await;
        }
    }

    async fn disconnect(&mut self) {
        self.take_committed_prefix();
        let _ = encode(
            &Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection)),
            &mut self.out,
        );
        self.write_out().await;
        if let Some(mut writer) = self.writer.take() {
            let _ = writer.shutdown().await;
        }
    }
}

/// Acknowledges committed messages in receive order, batching whatever is due into one
/// write; sends the keep-alive pings. Lives as long as the pipeline, across reconnects.
pub async fn run_acker(
    mut rx: mpsc::UnboundedReceiver<AckCmd>,
    pending_tx: watch::Sender<usize>,
    metrics: IngestMetrics,
    keep_alive: Duration,
) {
    let mut acker = Acker::new(metrics);
    let ping_idle = (keep_alive / 2).max(Duration::from_millis(500));
    let mut tick = tokio::time::interval(ping_idle);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let mut disconnect = acker.apply(cmd);
                // Everything already queued goes into the same write.
                for _ in 0..MAX_COMMANDS_PER_WRITE {
                    if disconnect.is_some() {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(cmd) => disconnect = acker.apply(cmd),
                        Err(_) => break,
                    }
                }
                acker.take_committed_prefix();
                acker.write_out().await;
                if let Some(reply) = disconnect {
                    acker.disconnect().await;
                    let _ = reply.send(());
                }
                let pending = acker.window.len();
                pending_tx.send_if_modified(|p| std::mem::replace(p, pending) != pending);
            }
            _ = tick.tick() => acker.ping_if_idle(ping_idle).await,
        }
    }
}

/// What ended one network connection.
enum ConnectionEnd {
    /// Drained (or the drain timed out): stop for good.
    Stopped,
    /// Lost: reconnect.
    Lost(SessionError),
}

/// The per-connection reader: seq numbers run on across reconnects.
struct Reader {
    index: u16,
    seq: u64,
    acker: mpsc::UnboundedSender<AckCmd>,
    router: Router,
    limits: Limits,
    max_packet_bytes: u32,
    /// Set once the intake is cancelled: messages received since are not taken.
    draining: Option<Instant>,
}

impl Reader {
    /// Handles one packet from the broker. Err ends the connection.
    async fn handle(&mut self, packet: Packet) -> Result<(), SessionError> {
        match packet {
            Packet::Publish(publish) => {
                if self.draining.is_some() {
                    // Not acknowledged: it stays with the broker for the next start.
                    return Ok(());
                }
                self.seq += 1;
                let ack = AckToken {
                    conn: self.index,
                    seq: self.seq,
                    received: Instant::now(),
                };
                let metrics = &self.router.metrics;
                metrics.received_messages.inc();
                metrics.received_bytes.inc_by(publish.payload.len() as u64);
                let register = AckCmd::Register {
                    seq: self.seq,
                    ack: (publish.qos != QoS::AtMostOnce).then_some((publish.qos, publish.pkid)),
                };
                if self.acker.send(register).is_err() {
                    return Err(SessionError::Closed);
                }
                match std::str::from_utf8(&publish.topic) {
                    Ok(topic) => {
                        self.router
                            .handle(topic, publish.payload, &self.limits, ack)
                            .await;
                    }
                    Err(_) => {
                        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                        self.router.reject(
                            super::validate::Rejected {
                                reason: super::validate::RejectReason::BadTopic,
                                detail: "topic is not UTF-8".into(),
                                device_id: None,
                            },
                            &topic,
                            publish.payload,
                            ack,
                        );
                    }
                }
            }
            Packet::PubRel(rel) => {
                let _ = self.acker.send(AckCmd::Release(rel.pkid));
            }
            Packet::SubAck(suback) => {
                let refused: Vec<_> = suback
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .collect();
                if refused.is_empty() {
                    tracing::info!(codes = ?suback.return_codes, "subscribed");
                } else {
                    tracing::error!(codes = ?refused, "the broker refused the subscription");
                }
            }
            Packet::PingResp(_) => {}
            Packet::Disconnect(d) => return Err(SessionError::Disconnected(d.reason_code)),
            other => tracing::debug!(packet = packet_name(&other), "ignored"),
        }
        Ok(())
    }

    /// Reads one network connection until it is lost or, once draining, until everything
    /// taken is acknowledged (bounded by `drain_timeout`).
    async fn read_connection(
        &mut self,
        mut rd: ReadHalf,
        mut buf: BytesMut,
        silent_limit: Duration,
        pending: &mut watch::Receiver<usize>,
        cancel: &CancellationToken,
        drain_timeout: Duration,
    ) -> ConnectionEnd {
        loop {
            // Whole packets first: one read can bring many (on loopback at 30,000/s, about
            // two: Mosquitto writes each message on its own; `ingest_socket_reads`).
            loop {
                match Packet::read(&mut buf, Some(self.max_packet_bytes)) {
                    Ok(packet) => {
                        if let Err(e) = self.handle(packet).await {
                            return ConnectionEnd::Lost(e);
                        }
                    }
                    Err(CodecError::InsufficientBytes(_)) => break,
                    Err(e) => return ConnectionEnd::Lost(e.into()),
                }
            }
            if let Some(since) = self.draining {
                let drained = *pending.borrow() == 0;
                if drained || since.elapsed() > drain_timeout {
                    if !drained {
                        tracing::warn!(
                            pending = *pending.borrow(),
                            "drain timed out; the broker will redeliver the rest"
                        );
                    }
                    return ConnectionEnd::Stopped;
                }
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                // Reclaims the buffer when the payloads cut from it are gone, else allocates.
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                read = tokio::time::timeout(silent_limit, rd.read_buf(&mut buf)) => match read {
                    Ok(Ok(0)) => return ConnectionEnd::Lost(SessionError::Closed),
                    Ok(Ok(_)) => {
                        self.router.metrics.socket_reads.inc();
                    }
                    Ok(Err(e)) => return ConnectionEnd::Lost(e.into()),
                    Err(_) => return ConnectionEnd::Lost(SessionError::Silent(silent_limit)),
                },
                _ = cancel.cancelled(), if self.draining.is_none() => {
                    tracing::info!("stopping: no new messages, draining in-flight work");
                    self.draining = Some(Instant::now());
                }
                _ = pending.changed(), if self.draining.is_some() => {}
                // Re-checks the drain deadline while the broker is quiet.
                _ = tokio::time::sleep(Duration::from_millis(200)), if self.draining.is_some() => {}
            }
        }
    }
}

/// Runs one ingest connection until cancelled: connects (and reconnects with backoff),
/// reads, routes; on cancel takes no new messages, waits (bounded) until everything taken is
/// committed and acknowledged, then disconnects cleanly.
#[allow(clippy::too_many_arguments)]
pub async fn run_connection(
    index: u16,
    cfg: SessionConfig,
    acker: mpsc::UnboundedSender<AckCmd>,
    mut pending: watch::Receiver<usize>,
    router: Router,
    limits: Limits,
    cancel: CancellationToken,
    drain_timeout: Duration,
) {
    let span = tracing::info_span!("mqtt", conn = index, client_id = %cfg.client_id,
        broker = %cfg.addr, filter = %cfg.filter);
    async move {
        let metrics = router.metrics.clone();
        let mut reader = Reader {
            index,
            seq: 0,
            acker: acker.clone(),
            router,
            limits,
            max_packet_bytes: cfg.max_packet_bytes,
            draining: None,
        };
        let silent_limit = cfg.keep_alive * 2;
        let mut backoff = Duration::from_millis(200);
        loop {
            let opened = tokio::select! {
                r = tokio::time::timeout(CONNECT_TIMEOUT, open(&cfg)) => {
                    r.unwrap_or(Err(SessionError::ConnectTimeout(CONNECT_TIMEOUT)))
                }
                _ = cancel.cancelled() => break,
            };
            let error = match opened {
                Ok((mut rd, wr, connack, buf)) => {
                    backoff = Duration::from_millis(200);
                    rd.coalesce(cfg.read_coalesce);
                    metrics.mqtt_connected.inc();
                    tracing::info!(
                        session_present = connack.session_present,
                        "connected to broker"
                    );
                    if acker.send(AckCmd::Attach(wr)).is_err() {
                        metrics.mqtt_connected.dec();
                        break;
                    }
                    let end = reader
                        .read_connection(
                            rd,
                            buf,
                            silent_limit,
                            &mut pending,
                            &cancel,
                            drain_timeout,
                        )
                        .await;
                    match end {
                        ConnectionEnd::Stopped => {
                            let (reply_tx, reply_rx) = oneshot::channel();
                            if acker.send(AckCmd::Disconnect(reply_tx)).is_ok() {
                                // Bounded: a broker that stopped reading must not hold the stop.
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(2), reply_rx).await;
                            }
                            metrics.mqtt_connected.dec();
                            break;
                        }
                        ConnectionEnd::Lost(error) => {
                            metrics.mqtt_connected.dec();
                            let _ = acker.send(AckCmd::Detach);
                            if reader.draining.is_some() {
                                // Nothing more can be acknowledged on this connection.
                                break;
                            }
                            error
                        }
                    }
                }
                Err(error) => error,
            };
            metrics.mqtt_connection_errors.inc();
            tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64,
                "broker connection lost or refused, reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        tracing::info!("connection closed");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acker() -> Acker {
        let mut a = Acker::new(crate::metrics::Metrics::new().ingest);
        // A sink that accepts everything: only `out` is inspected.
        a.writer = Some(Box::new(tokio::io::sink()));
        a
    }

    fn acked_ids(out: &BytesMut) -> Vec<u16> {
        let mut buf = out.clone();
        let mut ids = Vec::new();
        while let Ok(p) = Packet::read(&mut buf, None) {
            match p {
                Packet::PubAck(a) => ids.push(a.pkid),
                other => panic!("unexpected {}", packet_name(&other)),
            }
        }
        ids
    }

    #[test]
    fn only_the_committed_prefix_is_acknowledged_in_receive_order() {
        let mut a = acker();
        for (seq, pkid) in [(1, 10), (2, 11), (3, 12)] {
            a.apply(AckCmd::Register {
                seq,
                ack: Some((QoS::AtLeastOnce, pkid)),
            });
        }
        // The SOS (seq 3) commits first: nothing may be acked before seq 1 is.
        a.apply(AckCmd::Done(3));
        a.take_committed_prefix();
        assert!(a.out.is_empty());
        a.apply(AckCmd::DoneMany(vec![1, 2]));
        a.take_committed_prefix();
        assert_eq!(acked_ids(&a.out), vec![10, 11, 12]);
        assert_eq!(a.acks_due, 3);
        assert!(a.window.is_empty());
    }

    #[test]
    fn a_new_connection_voids_the_old_window() {
        let mut a = acker();
        a.apply(AckCmd::Register {
            seq: 1,
            ack: Some((QoS::AtLeastOnce, 7)),
        });
        a.apply(AckCmd::Attach(Box::new(tokio::io::sink())));
        // The old message's commit arrives after the reconnect: its packet id is void.
        a.apply(AckCmd::Done(1));
        a.apply(AckCmd::Register {
            seq: 2,
            ack: Some((QoS::AtLeastOnce, 1)),
        });
        a.apply(AckCmd::Done(2));
        a.take_committed_prefix();
        assert_eq!(acked_ids(&a.out), vec![1]);
    }

    #[test]
    fn qos0_messages_take_a_place_in_the_window_but_no_ack() {
        let mut a = acker();
        a.apply(AckCmd::Register { seq: 5, ack: None });
        a.apply(AckCmd::Register {
            seq: 6,
            ack: Some((QoS::AtLeastOnce, 3)),
        });
        a.apply(AckCmd::DoneMany(vec![6, 5]));
        a.take_committed_prefix();
        assert_eq!(acked_ids(&a.out), vec![3]);
    }
}

#[cfg(test)]
mod coalescing_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connected loopback pair: (what the broker would write to, what the reader reads).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (theirs.unwrap().0, ours.unwrap())
    }

    async fn read_within(
        c: &Coalescing,
        stream: &tokio::net::TcpStream,
        buf: &mut BytesMut,
    ) -> usize {
        tokio::time::timeout(Duration::from_secs(10), c.read(stream, buf))
            .await
            .expect("a coalesced read must not wait for the low-water mark forever")
            .unwrap()
    }

    #[tokio::test]
    async fn fewer_bytes_than_the_low_water_mark_are_read_after_the_wait() {
        let (mut broker, reader) = pair().await;
        let c = Coalescing::start(&reader, Duration::from_millis(20), 1 << 20).unwrap();
        broker.write_all(b"one small message").await.unwrap();
        // No spare room at all: a read into nothing would look like the end of the stream.
        let mut buf = BytesMut::new();
        let mut got = 0;
        while got < 17 {
            let n = read_within(&c, &reader, &mut buf).await;
            assert!(n > 0, "the stream did not end");
            got += n;
        }
        assert_eq!(&buf[..], b"one small message");
    }

    #[tokio::test]
    async fn a_stream_larger_than_the_mark_is_read_whole_and_its_end_is_seen() {
        let (mut broker, reader) = pair().await;
        let c = Coalescing::start(&reader, Duration::from_millis(5), 4096).unwrap();
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for chunk in sent.chunks(1000) {
                    broker.write_all(chunk).await.unwrap();
                }
                // Dropping the socket ends the stream.
            })
        };
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            if read_within(&c, &reader, &mut buf).await == 0 {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(buf.len(), sent.len());
        assert!(buf[..] == sent[..], "bytes arrive whole and in order");
    }

    #[tokio::test]
    async fn a_connection_set_to_coalesce_reads_through_the_mark_and_does_not_spin() {
        let (mut broker, reader) = pair().await;
        let (half, _write_half) = reader.into_split();
        let mut rd = ReadHalf::Tcp {
            half,
            coalescing: None,
        };
        rd.coalesce(Some((Duration::from_millis(5), 4096)));
        let ReadHalf::Tcp {
            coalescing: Some(c),
            ..
        } = &rd
        else {
            panic!("a plain TCP connection must coalesce when asked to");
        };
        let attempts = c.attempts.clone();
        // The reader runs on a thread of its own, so that one that spins fails this test
        // instead of hanging it: it reads past the mark (the kernel's wake-up, through the
        // session's own dispatch), then sits 200 ms on a silent connection.
        let reader = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut buf = BytesMut::new();
                while buf.len() < 5000 {
                    if rd.read_buf(&mut buf).await.unwrap() == 0 {
                        break;
                    }
                }
                let idle =
                    tokio::time::timeout(Duration::from_millis(200), rd.read_buf(&mut buf)).await;
                (buf.len(), idle.is_err())
            })
        });
        broker.write_all(&[1u8; 5000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let looks = attempts.load(std::sync::atomic::Ordering::Relaxed);
        // About 40 looks in 200 ms of silence, a few for the data.
        assert!(
            looks <= 100,
            "{looks} reads: the reader spins on stale readiness"
        );
        let (read, stayed_idle) = reader.join().unwrap();
        assert_eq!(read, 5000);
        assert!(stayed_idle, "nothing more was sent");
    }

    #[tokio::test]
    async fn the_kernel_holds_the_wake_up_until_the_mark() {
        let (mut broker, reader) = pair().await;
        Coalescing::start(&reader, Duration::from_secs(3600), 4096).unwrap();
        broker.write_all(&[7u8; 100]).await.unwrap();
        // Below the mark the socket is not readable (what spares the broker its wake-ups)...
        let early = tokio::time::timeout(Duration::from_millis(100), reader.readable()).await;
        assert!(
            early.is_err(),
            "100 bytes must not wake a reader whose mark is 4,096"
        );
        // ...and at the mark it is.
        broker.write_all(&[7u8; 4096]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("the mark wakes the reader")
            .unwrap();
    }
}
