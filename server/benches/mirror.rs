//! The E2EE mirror's hot paths at the default batch size (`[mirror] segment_max_bytes`,
//! 1 MiB): an owner sealing a batch of changes (batch encoding, age, the descriptor's
//! signature), and a mirror checking a pushed segment without decrypting it (signature,
//! chain, length, quota, BLAKE3). Also prints the storage overhead: what a mirror stores
//! (descriptor + ciphertext) over the batch's plaintext, and the batch's framing over the
//! changes' own bytes.
//!
//! The floor for verification is BLAKE3 over the same ciphertext on one core
//! (`blake3_floor`, `blake3::hash` is single-threaded), measured in the same run: the
//! bench prints both rates and their ratio. It also prints what a checkpoint stores for a
//! namespace of 1,000 resources (one snapshot entry each) over their plaintext.
//!
//! Run: `cargo bench -p plait-server --bench mirror`
//!
//! The changes are 200-byte automerge-sized payloads with realistic paths, versions and
//! parents, filling one segment; throughput is per byte of batch plaintext (MB/s) and
//! per change.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use plait_bridge::Keypair;
use plait_bridge::mirror::{Allowance, ChainHead, DESCRIPTOR_LEN, SealKey, check, seal};
use plait_server::mirror::MirrorSettings;
use plait_server::mirror::batch::{self, Entry, What};
use plait_server::model::{Kind, ResourcePath, Version, VersionId};

const CHANGE_BYTES: usize = 200;

/// Changes filling one default-sized segment.
fn changes() -> Vec<Entry> {
    let max = MirrorSettings::default().segment_max_bytes as usize;
    let mut out = Vec::new();
    let mut len = batch::BATCH_HEADER_LEN;
    let mut i = 0u64;
    loop {
        let e = Entry {
            what: What::Change,
            kind: Kind::Text,
            path: ResourcePath::new(format!("notes/{}", i % 97)).expect("path"),
            media_type: "text/plain".into(),
            seq: i as i64 + 1,
            version: Some(VersionId::new("k7f3q", i).unwrap()),
            parents: Version::one(VersionId::new("k7f3q", i.saturating_sub(1)).unwrap()),
            at_ms: 1_700_000_000_000 + i as i64,
            // Incompressible, as automerge's compressed columns are.
            data: Bytes::from(
                (0..CHANGE_BYTES)
                    .map(|j| (i as usize * 31 + j * 17) as u8 ^ 0x5a)
                    .collect::<Vec<u8>>(),
            ),
        };
        if len + e.encoded_len() > max {
            return out;
        }
        len += e.encoded_len();
        out.push(e);
        i += 1;
    }
}

fn benches(c: &mut Criterion) {
    let keys = Keypair::generate();
    let me = SealKey::generate();
    let to = [me.recipient()];
    let entries = changes();
    let plain = batch::encode(&entries);
    let seg = seal(&keys, &to, ChainHead::default(), &plain, 1).expect("seals");
    let plenty = Some(Allowance {
        quota: u64::MAX,
        used: 0,
    });

    let stored = (DESCRIPTOR_LEN + seg.ciphertext.len()) as f64;
    let change_bytes = (entries.len() * CHANGE_BYTES) as f64;
    println!(
        "segment: {} changes of {CHANGE_BYTES} B, batch plaintext {} B, ciphertext {} B, stored {} B",
        entries.len(),
        plain.len(),
        seg.ciphertext.len(),
        stored
    );
    println!(
        "overhead of sealing (age + descriptor) over the batch plaintext: {:.3} %",
        (stored / plain.len() as f64 - 1.0) * 100.0
    );
    println!(
        "overhead over the changes' own bytes (batch framing: path, version, parents, seq, time): {:.1} %",
        (stored / change_bytes - 1.0) * 100.0
    );
    let one = seal(&keys, &to, ChainHead::default(), &batch::encode(&entries[..1]), 1).expect("seals");
    println!(
        "one change per segment instead: stored {} B for {CHANGE_BYTES} B ({:.0} % overhead)",
        DESCRIPTOR_LEN + one.ciphertext.len(),
        ((DESCRIPTOR_LEN + one.ciphertext.len()) as f64 / CHANGE_BYTES as f64 - 1.0) * 100.0
    );

    let mut g = c.benchmark_group("mirror_bytes");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("seal_segment", |b| {
        b.iter(|| black_box(seal(&keys, &to, ChainHead::default(), black_box(&plain), 1).expect("seals")))
    });
    g.bench_function("encode_and_seal_segment", |b| {
        b.iter(|| {
            let p = batch::encode(black_box(&entries));
            black_box(seal(&keys, &to, ChainHead::default(), &p, 1).expect("seals"))
        })
    });
    g.bench_function("verify_segment", |b| {
        b.iter(|| {
            check(
                black_box(&seg.descriptor),
                black_box(&seg.ciphertext),
                ChainHead::default(),
                plenty,
            )
            .expect("verifies")
        })
    });
    g.bench_function("blake3_floor", |b| {
        b.iter(|| black_box(blake3::hash(black_box(&seg.ciphertext))))
    });
    g.bench_function("open_segment", |b| {
        b.iter(|| black_box(plait_bridge::mirror::open(&me, black_box(&seg.ciphertext)).expect("opens")))
    });
    g.finish();

    // Verification against its floor: one BLAKE3 pass over the same bytes, one core.
    let rate = |f: &mut dyn FnMut()| {
        let n = 200;
        f();
        let t = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        (n as f64 * seg.ciphertext.len() as f64) / t.elapsed().as_secs_f64() / 1e6
    };
    let verify_mbs = rate(&mut || {
        check(&seg.descriptor, &seg.ciphertext, ChainHead::default(), plenty).expect("verifies")
    });
    let floor_mbs = rate(&mut || {
        black_box(blake3::hash(black_box(&seg.ciphertext)));
    });
    println!(
        "verify {verify_mbs:.0} MB/s, BLAKE3 floor {floor_mbs:.0} MB/s (one core), verify/floor {:.3}",
        verify_mbs / floor_mbs
    );

    // A checkpoint: every resource's current state in one sealed snapshot.
    let snapshot: Vec<Entry> = (0..1000u64)
        .map(|i| Entry {
            what: What::Snapshot,
            kind: Kind::Json,
            path: ResourcePath::new(format!("app/items/{i}")).expect("path"),
            media_type: "application/json".into(),
            seq: 40,
            version: None,
            parents: Version::root(),
            at_ms: 0,
            data: Bytes::from(vec![(i % 251) as u8; 1000]),
        })
        .collect();
    let plain_snap = batch::encode(&snapshot);
    let ck = plait_bridge::mirror::seal_checkpoint(&keys, &to, ChainHead::default(), &plain_snap, 1)
        .expect("seals");
    println!(
        "checkpoint of 1,000 resources of 1,000 B: snapshot plaintext {} B, stored {} B ({:.3} % over the plaintext)",
        plain_snap.len(),
        plait_bridge::mirror::CHECKPOINT_LEN + ck.snapshot.len(),
        ((plait_bridge::mirror::CHECKPOINT_LEN + ck.snapshot.len()) as f64 / plain_snap.len() as f64 - 1.0)
            * 100.0
    );

    let mut g = c.benchmark_group("mirror_changes");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("encode_and_seal", |b| {
        b.iter(|| {
            let p = batch::encode(black_box(&entries));
            black_box(seal(&keys, &to, ChainHead::default(), &p, 1).expect("seals"))
        })
    });
    g.bench_function("verify", |b| {
        b.iter(|| check(&seg.descriptor, &seg.ciphertext, ChainHead::default(), plenty).expect("verifies"))
    });
    g.finish();
}

criterion_group!(mirror, benches);
criterion_main!(mirror);
