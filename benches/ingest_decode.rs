//! Decode + validate throughput of ingest's edge (issue 5: ≥ 1M messages/s per core).
//!
//! `cargo bench --bench ingest_decode`. Each iteration takes one realistic heartbeat (vitals
//! from `firmware_sim::physiology`, 1,000 distinct devices, a GPS fix) through
//! `silverguard::ingest::validate::decode`: topic parse and device-id check, protobuf decode,
//! range checks, clock placement, the validated row. `known` adds what the connection task
//! does next for each message: the receive timestamp and the registry cache lookup (100k
//! devices). Criterion reports time per message and messages/s; one benchmark runs on one
//! thread, so its messages/s is per core.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use firmware_sim::physiology::Body;
use silverguard::ingest::validate::{decode, Decoded, Limits};
use silverguard::ingest::KnownDevices;
use silverguard_proto::Message;
use std::collections::HashSet;
use std::hint::black_box;

fn messages(n: usize) -> Vec<(String, Vec<u8>)> {
    let now = firmware_sim::now_unix_ms();
    (0..n)
        .map(|i| {
            let id = format!("8623450678{i:05}");
            let mut body = Body::new(1, i as u64);
            body.set_always_worn(true);
            let hb = body.sample(now).to_heartbeat(&id, 1000 + i as u64, now);
            (format!("sg/v1/dev/{id}/hb"), hb.encode_to_vec())
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let msgs = messages(1000);
    let limits = Limits::default();
    let received_at = chrono::Utc::now();
    let mean_len = msgs.iter().map(|m| m.1.len()).sum::<usize>() / msgs.len();
    eprintln!("payloads: {} heartbeats, mean {mean_len} bytes", msgs.len());
    for (t, p) in &msgs {
        assert!(matches!(
            decode(t, p, received_at, &limits),
            Ok(Decoded::Heartbeat(_))
        ));
    }

    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("decode_validate", |b| {
        b.iter(|| {
            let (t, p) = &msgs[i % msgs.len()];
            i += 1;
            black_box(decode(black_box(t), black_box(p), received_at, &limits))
        })
    });

    let known = KnownDevices::default();
    let mut ids: HashSet<String> = (0..100_000).map(|i| format!("8623450678{i:05}")).collect();
    ids.extend(
        msgs.iter()
            .map(|(t, _)| t.split('/').nth(3).unwrap_or("").to_string()),
    );
    known.replace(ids);
    let mut j = 0usize;
    g.bench_function("decode_validate_known", |b| {
        b.iter(|| {
            let (t, p) = &msgs[j % msgs.len()];
            j += 1;
            let d = decode(black_box(t), black_box(p), chrono::Utc::now(), &limits);
            let ok = matches!(&d, Ok(d) if d.device_id().is_some_and(|id| known.contains(id)));
            black_box((d, ok))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
