//! Writes the committed seed corpora, `corpus/<target>/seed-*`: a few valid inputs per
//! target, encoded by the real encoders, so the fuzzer starts past the magic numbers,
//! crc32s and rkyv validation. Run from the repository root after a format change:
//!
//! ```sh
//! cargo run --release --manifest-path shards/fuzz/Cargo.toml --example write_seeds
//! ```
//!
//! The input layouts (the mode byte in front) are described in each target.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use shards::codec::{BatchBuilder, BLOCK_BYTES};
use shards::forward::{encode_op, encode_reply};
use shards::ops::{ApiError, ArchivedFilter, Op};
use shards::peer::{self, PEER_TRAILER_BYTES};
use shards::validate::{FieldError, NewEvent, PatchRequest};
use shards::wire::{encode_frame, ClusterSettings, Handshake, WIRE_VERSION};

/// Forwarded replies never carry the per-node statistics, so any payload type will do.
type Reply = shards::ops::Reply<()>;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    };
    for (name, bytes) in http_request() {
        write("http_request", name, &bytes);
    }
    for (name, bytes) in json_body() {
        write("json_body", name, bytes);
    }
    for (i, bytes) in noise(3, 64).iter().enumerate() {
        write("tail_frames", &format!("steps-{i}"), bytes);
    }
    for (name, bytes) in log_segment() {
        write("log_segment", name, &bytes);
    }
    for (name, bytes) in snapshot_file() {
        write("snapshot_file", name, &bytes);
    }
    for (name, bytes) in peer_frame() {
        write("peer_frame", name, &bytes);
    }
    for (name, bytes) in query_string() {
        write("query_string", &name, &bytes);
    }
    for (name, bytes) in forward_codec() {
        write("forward_codec", name, &bytes);
    }
}

/// Deterministic pseudo-random bytes (xorshift), as builder recipes.
fn noise(count: usize, len: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
        .collect()
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

fn http_request() -> Vec<(&'static str, Vec<u8>)> {
    let requests: [(&str, &[u8]); 4] = [
        (
            "get",
            b"GET /v1/sessions?metadata.user=42&limit=2 HTTP/1.1\r\nHost: x\r\n\
              Connection: keep-alive\r\n\r\n",
        ),
        (
            "post-length",
            b"POST /v1/sessions/demo/append HTTP/1.1\r\nContent-Type: application/json; \
              charset=utf-8\r\nContent-Length: 35\r\nExpect: 100-continue\r\n\r\n\
              {\"type\":\"m\",\"payload\":{\"t\":\"hi\"}}",
        ),
        (
            "post-chunked",
            b"POST http://h:4000/v1/sessions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\n{\"id\"\r\nA\r\n:\"demo\"}  \r\n0\r\nX-Trailer: v\r\n\r\n",
        ),
        (
            "pipelined",
            b"\r\nGET /health/ready HTTP/1.0\r\n\r\nPATCH /v1/sessions/a HTTP/1.1\r\n\
              Content-Length: 2\r\n\r\n{}",
        ),
    ];
    requests
        .into_iter()
        .map(|(name, wire)| {
            let mut input = vec![255, 2];
            input.extend_from_slice(wire);
            (name, input)
        })
        .collect()
}

/// Raw query strings (mode 0) as clients send them, well-formed and not, and pair
/// recipes (mode 1).
fn query_string() -> Vec<(String, Vec<u8>)> {
    let raw: [(&str, &[u8]); 3] = [
        (
            "listing",
            b"limit=2&archived=all&metadata.user=42&cursor=s-1",
        ),
        (
            "escapes",
            b"metadata.k=a%20b+c&metadata.%C3%A9=%e2%82%AC&&x=%2B",
        ),
        (
            "malformed",
            b"cursor=%zz&limit=%4&metadata.k=%ff&batch_size=%",
        ),
    ];
    let mut seeds: Vec<_> = raw
        .into_iter()
        .map(|(name, query)| (format!("raw-{name}"), with_mode(0, query)))
        .collect();
    for (i, bytes) in noise(2, 96).iter().enumerate() {
        seeds.push((format!("recipe-{i}"), with_mode(1, bytes)));
    }
    seeds
}

fn json_body() -> Vec<(&'static str, &'static [u8])> {
    vec![
        (
            "append",
            br#"{"type":"message","payload":{"text":"h\u00e9llo","n":[1,1.0,-0,1e2]},
               "actor":"user:42","source":"web","metadata":{"a":{"b":null}},"refs":{},
               "idempotency_key":"m1","expected_seq":0,"producer_id":"p","producer_seq":1}"#,
        ),
        (
            "create",
            br#"{"id":"ses_abc-1.2:3","title":"Demo","metadata":{"user":"42","n":12.50}}"#,
        ),
        (
            "patch",
            br#" {"title":null,"metadata":{"k":[true,false]},"expected_version":3} "#,
        ),
        ("nested", br#"[[[[{"a":[[[[1]]]]}]]]]"#),
    ]
}

fn log_segment() -> Vec<(&'static str, Vec<u8>)> {
    const EPOCH: u64 = 1;
    let recipes = noise(2, 2000);
    let mut segment = Vec::new();
    for recipe in &recipes {
        let mut u = Unstructured::new(recipe);
        let mut batch = BatchBuilder::new(EPOCH);
        for _ in 0..3 {
            let record = fuzz_support::log_record(&mut u).expect("a record");
            batch.push(&record).expect("small records fit");
        }
        segment.extend_from_slice(&batch.finish());
    }
    segment.resize(segment.len() + BLOCK_BYTES, 0);
    // Mode byte: odd = raw segment, bits 1..2 = the epoch.
    let raw_mode = 1 | (EPOCH as u8) << 1;
    let mut torn = segment.clone();
    torn[BLOCK_BYTES + 600..BLOCK_BYTES + 1112].fill(0);
    vec![
        ("segment", with_mode(raw_mode, &segment)),
        ("torn", with_mode(raw_mode, &torn)),
        ("recipe", with_mode(0, &recipes[0][..256])),
    ]
}

fn snapshot_file() -> Vec<(&'static str, Vec<u8>)> {
    let recipes = noise(2, 1500);
    let snapshot =
        fuzz_support::shard_snapshot(&mut Unstructured::new(&recipes[0])).expect("a snapshot");
    let transfer =
        fuzz_support::group_transfer(&mut Unstructured::new(&recipes[1])).expect("a transfer");
    let sidecar = shards::snapshot::encode_sidecar(0, &[0, 4096, 8192], 64);
    // Mode byte: odd = raw, bit 2 = 64-byte blocks; even = recipe, bits 3..4 = kind.
    vec![
        ("file", with_mode(1 | 4, &snapshot.encode_file(64))),
        ("transfer", with_mode(1, &transfer.encode())),
        ("sidecar", with_mode(1 | 4, &sidecar)),
        ("recipe-file", with_mode(2, &recipes[0][..400])),
        ("recipe-sidecar", with_mode(3 << 3, &recipes[1][..64])),
    ]
}

fn peer_frame() -> Vec<(&'static str, Vec<u8>)> {
    let recipes = noise(4, 800);
    let mut seeds = Vec::new();
    let mut stream = Vec::new();
    let handshake = Handshake {
        wire_version: WIRE_VERSION,
        cluster_id: "c1".into(),
        node_id: 1,
        shards: 2,
        shard: 0,
        incarnation: 7,
        settings: ClusterSettings {
            members: vec![1, 2, 3],
            dedupe_keys_max: 1000,
            producers_max: 100,
            max_body_bytes: 1 << 20,
            retention_bytes: 0,
            retention_age_ms: 0,
        },
        data_incarnation: 9,
    };
    encode_frame(&handshake.encode(), &mut stream);
    let names = ["archive-0", "archive-1", "archive-2", "archive-3"];
    for (name, recipe) in names.into_iter().zip(&recipes) {
        let frame = fuzz_support::peer_frame(&mut Unstructured::new(recipe)).expect("a frame");
        let payload = peer::encode(&frame);
        encode_frame(&payload, &mut stream);
        // Mode 1: the target appends the trailer itself.
        seeds.push((
            name,
            with_mode(1, &payload[..payload.len() - PEER_TRAILER_BYTES]),
        ));
    }
    seeds.push(("stream", with_mode(2, &stream)));
    seeds.push(("recipe", with_mode(0, &recipes[0][..200])));
    seeds
}

fn forward_codec() -> Vec<(&'static str, Vec<u8>)> {
    let event = NewEvent {
        event_type: "message".into(),
        payload: r#"{"text":"hi","n":1E2}"#.into(),
        actor: Some("user:42".into()),
        source: None,
        metadata: "{}".into(),
        refs: r#"{"r":[1]}"#.into(),
        idempotency_key: Some("m1".into()),
        expected_seq: Some(0),
        producer: Some(("p".into(), 3)),
        digest: [7; 16],
    };
    let patch = PatchRequest {
        title: Some(None),
        metadata: serde_json::from_str(r#"{"k":"v","n":1.50}"#).ok(),
        expected_version: Some(2),
    };
    let ops = [
        (
            "op-append",
            Op::Append {
                id: "demo".into(),
                event,
            },
        ),
        (
            "op-patch",
            Op::Patch {
                id: "demo".into(),
                patch,
            },
        ),
        (
            "op-read",
            Op::Read {
                id: "demo".into(),
                after: 5,
                max_events: 1000,
                max_bytes: 1 << 20,
                wait: Some(Duration::from_millis(5)),
            },
        ),
        (
            "op-list",
            Op::List {
                after: Some("a".into()),
                limit: 10,
                archived: ArchivedFilter::All,
                filters: vec![("user".into(), "42".into())],
            },
        ),
    ];
    let record =
        fuzz_support::log_record(&mut Unstructured::new(&noise(1, 300)[0])).expect("a record");
    let replies = [
        (
            "reply-events",
            Reply::Events {
                events: vec![(1, Arc::from(r#"{"seq":1}"#)), (2, Arc::from("{}"))],
                last_seq: 2,
            },
        ),
        ("reply-records", Reply::Records(vec![record])),
        (
            "reply-error",
            Reply::Error(ApiError::Invalid(FieldError::new(
                "invalid_event",
                Some("type"),
                "`type` is required",
            ))),
        ),
    ];
    let mut seeds = Vec::new();
    for (name, op) in ops {
        let bytes = encode_op(&op).expect("a forwarded op");
        seeds.push((name, with_mode(0, &bytes)));
    }
    for (name, reply) in replies {
        let bytes = encode_reply(&reply).expect("a forwarded reply");
        seeds.push((name, with_mode(1, &bytes)));
    }
    seeds
}
