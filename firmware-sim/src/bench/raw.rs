//! A minimal MQTT 3.1.1 client for the bench's bulk traffic: the heartbeat load and the
//! baseline subscribers. Only what they need: CONNECT/CONNACK, PUBLISH at QoS 1 out, PUBACK
//! in (counted), SUBSCRIBE, PUBLISH in, PUBACK out, PINGREQ, DISCONNECT.
//!
//! Why not rumqttc, which the rest of the simulator uses: rumqttc 0.25 writes and flushes
//! every request on its own (one `write(2)` per PUBLISH and one per PUBACK), through a
//! channel and a task wake-up each. On a 2-core machine shared with the broker, PostgreSQL
//! and the service under test, the bench's own cost per message is taken from the system it
//! measures. This client encodes whatever is due into one buffer and writes it with one
//! call, and reads PUBACKs in bulk, so 50,000 messages/s cost the bench a few percent of a
//! core. On the wire it is the same MQTT: every message a QoS 1 PUBLISH on its device's
//! topic, every one acknowledged by the broker.

use bytes::{Buf, BufMut, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BrokerAddr;

/// MQTT control packet types (high nibble of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;

/// Appends an MQTT "remaining length" (variable byte integer).
pub fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

/// CONNECT, MQTT 3.1.1, with optional credentials.
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    clean_session: bool,
    keep_alive_s: u16,
    credentials: Option<&(String, String)>,
) {
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(4); // protocol level 3.1.1
    let mut flags = 0u8;
    if clean_session {
        flags |= 0x02;
    }
    if credentials.is_some() {
        flags |= 0xC0;
    }
    body.put_u8(flags);
    body.put_u16(keep_alive_s);
    put_str(&mut body, client_id);
    if let Some((user, pass)) = credentials {
        put_str(&mut body, user);
        put_str(&mut body, pass);
    }
    buf.put_u8(0x10);
    put_remaining_length(buf, body.len());
    buf.put_slice(&body);
}

/// The fixed header, topic and packet id of a QoS 1 PUBLISH whose payload of `payload_len`
/// bytes the caller appends right after.
pub fn encode_publish_head(buf: &mut BytesMut, topic: &str, pkid: u16, payload_len: usize) {
    buf.put_u8(0x32); // PUBLISH, QoS 1, no DUP, no RETAIN
    put_remaining_length(buf, 2 + topic.len() + 2 + payload_len);
    put_str(buf, topic);
    buf.put_u16(pkid);
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    buf.put_slice(&[0x40, 0x02]);
    buf.put_u16(pkid);
}

pub fn encode_subscribe(buf: &mut BytesMut, pkid: u16, filter: &str, qos: u8) {
    buf.put_u8(0x82);
    put_remaining_length(buf, 2 + 2 + filter.len() + 1);
    buf.put_u16(pkid);
    put_str(buf, filter);
    buf.put_u8(qos);
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}

pub fn encode_disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0x00]);
}

/// One complete packet at the front of `buf`: (first byte, header length, body length).
/// `None` while the packet is incomplete; `Err` for a malformed length.
pub fn peek_frame(buf: &[u8]) -> io::Result<Option<(u8, usize, usize)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            let header = i + 1;
            if buf.len() < header + len {
                return Ok(None);
            }
            return Ok(Some((buf[0], header, len)));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed MQTT remaining length",
    ))
}

/// A received PUBLISH: its packet id (QoS 1 and 2; 0 for QoS 0), topic and payload.
pub struct InPublish<'a> {
    pub qos: u8,
    pub pkid: u16,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
}

/// Parses the body of a PUBLISH whose first byte was `first`.
pub fn parse_publish(first: u8, body: &[u8]) -> io::Result<InPublish<'_>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed PUBLISH");
    let qos = (first >> 1) & 0x03;
    if body.len() < 2 {
        return Err(bad());
    }
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2 + tlen;
    let topic = body.get(2..at).ok_or_else(bad)?;
    let mut pkid = 0;
    if qos > 0 {
        let id = body.get(at..at + 2).ok_or_else(bad)?;
        pkid = u16::from_be_bytes([id[0], id[1]]);
        at += 2;
    }
    Ok(InPublish {
        qos,
        pkid,
        topic,
        payload: &body[at..],
    })
}

/// Connects, sends CONNECT and waits for a CONNACK that accepts it (at most `timeout`).
pub async fn connect(
    broker: &BrokerAddr,
    client_id: &str,
    clean_session: bool,
    keep_alive_s: u16,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let exchange = async {
        let mut stream = TcpStream::connect((broker.host.as_str(), broker.port)).await?;
        stream.set_nodelay(true)?;
        let mut buf = BytesMut::new();
        encode_connect(
            &mut buf,
            client_id,
            clean_session,
            keep_alive_s,
            broker.credentials.as_ref(),
        );
        stream.write_all(&buf).await?;
        let mut rbuf = BytesMut::with_capacity(64);
        loop {
            if let Some((first, header, len)) = peek_frame(&rbuf)? {
                if first >> 4 != CONNACK || len < 2 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("expected CONNACK, got packet type {}", first >> 4),
                    ));
                }
                let code = rbuf[header + 1];
                if code != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("broker refused the connection (CONNACK code {code})"),
                    ));
                }
                rbuf.advance(header + len);
                return Ok(stream);
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the connection before CONNACK",
                ));
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no CONNACK within {timeout:?}"),
        )
    })?
}

/// Subscribes at QoS 1 and waits for the SUBACK (frames before it, none expected, are
/// dropped).
pub async fn subscribe(stream: &mut TcpStream, filter: &str, timeout: Duration) -> io::Result<()> {
    let mut buf = BytesMut::new();
    encode_subscribe(&mut buf, 1, filter, 1);
    stream.write_all(&buf).await?;
    let mut rbuf = BytesMut::with_capacity(64);
    let wait = async {
        loop {
            while let Some((first, header, len)) = peek_frame(&rbuf)? {
                let is_suback = first >> 4 == SUBACK;
                let refused = is_suback && rbuf.get(header + 2) == Some(&0x80);
                rbuf.advance(header + len);
                if refused {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("subscription to {filter} refused"),
                    ));
                }
                if is_suback {
                    return Ok(());
                }
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the connection before SUBACK",
                ));
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no SUBACK"))?
}

/// Read coalescing as silverguard's heartbeat connections do it (`mqtt.read_coalesce`,
/// src/ingest/session.rs): the kernel wakes the reader only once `bytes` are waiting
/// (`SO_RCVLOWAT`), and the reader looks anyway every `wait`. The broker baseline's subscriber
/// reads this way so that the broker's limit is measured for a consumer that costs it what
/// silverguard does: without it, each of the broker's writes wakes the subscriber, which is
/// work on the broker's thread that silverguard no longer asks of it. The load's publishers
/// read their PUBACKs this way too ([`super::load`]), for the same reason.
pub struct Coalescing {
    wait: Duration,
}

impl Coalescing {
    pub fn start(stream: &TcpStream, wait: Duration, bytes: u32) -> io::Result<Coalescing> {
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
            return Err(io::Error::last_os_error());
        }
        Ok(Coalescing { wait })
    }

    /// Waits for the kernel's wake-up or `wait`, then reads what there is; 0 only at the end
    /// of the stream.
    pub async fn read(&self, stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            let woken = tokio::select! {
                biased;
                r = stream.readable() => { r?; true }
                _ = tokio::time::sleep(self.wait) => false,
            };
            let read = if woken {
                stream.try_io(tokio::io::Interest::READABLE, || read_now(stream, buf))
            } else {
                read_now(stream, buf)
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

fn read_now(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(64 * 1024);
    }
    // MSG_DONTWAIT: the BSDs refuse a plain non-blocking recv below the low-water mark.
    let n = socket2::SockRef::from(stream)
        .recv_with_flags(buf.spare_capacity_mut(), libc::MSG_DONTWAIT)?;
    // SAFETY: recv initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_lengths() {
        for (n, bytes) in [
            (0usize, vec![0u8]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut b = BytesMut::new();
            put_remaining_length(&mut b, n);
            assert_eq!(&b[..], &bytes[..], "{n}");
        }
    }

    #[test]
    fn publish_round_trip_and_partial_frames() {
        let mut b = BytesMut::new();
        encode_publish_head(&mut b, "sg/v1/dev/x/hb", 42, 3);
        b.put_slice(b"abc");
        encode_puback(&mut b, 7);
        let (first, header, len) = peek_frame(&b).unwrap().unwrap();
        assert_eq!(first >> 4, PUBLISH);
        let p = parse_publish(first, &b[header..header + len]).unwrap();
        assert_eq!((p.qos, p.pkid), (1, 42));
        assert_eq!(p.topic, b"sg/v1/dev/x/hb");
        assert_eq!(p.payload, b"abc");
        b.advance(header + len);
        assert_eq!(peek_frame(&b).unwrap(), Some((0x40, 2, 2)));
        assert_eq!(peek_frame(&b[..3]).unwrap(), None);
        assert_eq!(peek_frame(&[0x30]).unwrap(), None);
        assert!(peek_frame(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn connect_packet_shape() {
        let mut b = BytesMut::new();
        encode_connect(&mut b, "c", true, 30, None);
        assert_eq!(
            &b[..],
            &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 1, b'c']
        );
    }
}
