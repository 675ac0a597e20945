//! The write-ahead log format and recovery scan (DESIGN.md, "Log storage"): records
//! round-trip, damaged bytes are refused without panics, a torn last batch is dropped,
//! and a bad batch followed by a valid one is corruption.

use proptest::prelude::*;
use shards::codec::*;
use shards::entry::*;

const EPOCH: u64 = 7;
const SEGMENT_BYTES: usize = 64 * BLOCK_BYTES;

// ---------------------------------------------------------------- generators

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => any::<String>(),
        1 => (1usize..300_000).prop_map(|n| "é😀x".repeat(n / 7 + 1)),
    ]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(any::<String>())
}

fn append() -> impl Strategy<Value = Command> {
    let ids = (
        any::<String>(),
        any::<u64>(),
        any::<i64>(),
        any::<String>(),
        text(),
    );
    let who = (opt_text(), opt_text(), any::<String>(), any::<String>());
    let dedupe = (
        opt_text(),
        opt_text(),
        any::<Option<u64>>(),
        any::<[u8; 16]>(),
    );
    (ids, who, dedupe).prop_map(|((session_id, seq, at, event_type, payload), w, d)| {
        Command::Append(AppendEntry {
            session_id,
            seq,
            inserted_at_us: at,
            event_type,
            payload,
            actor: w.0,
            source: w.1,
            metadata: w.2,
            refs: w.3,
            idempotency_key: d.0,
            producer_id: d.1,
            producer_seq: d.2,
            digest: d.3,
        })
    })
}

fn command() -> impl Strategy<Value = Command> {
    let s = any::<String>;
    prop_oneof![
        Just(Command::Noop),
        (s(), opt_text(), text(), any::<i64>()).prop_map(|(session_id, title, metadata, at_us)| {
            Command::CreateSession(CreateSession {
                session_id,
                title,
                metadata,
                at_us,
            })
        }),
        (s(), opt_text(), s(), any::<u64>(), any::<i64>()).prop_map(|(id, title, m, v, at)| {
            Command::PatchSession(PatchSession {
                session_id: id,
                title,
                metadata: m,
                version: v,
                at_us: at,
            })
        }),
        (s(), any::<bool>(), any::<u64>(), any::<i64>()).prop_map(|(id, archived, v, at)| {
            Command::SetArchived(SetArchived {
                session_id: id,
                archived,
                version: v,
                at_us: at,
            })
        }),
        append(),
        proptest::collection::vec((s(), any::<u64>()), 0..4).prop_map(|reports| {
            Command::ArchiveProgress(ArchiveProgress {
                sessions: reports
                    .into_iter()
                    .map(|(session_id, archived_seq)| SessionProgress {
                        session_id,
                        archived_seq,
                    })
                    .collect(),
            })
        }),
    ]
}

fn log_record() -> impl Strategy<Value = LogRecord> {
    (any::<u16>(), any::<u64>(), any::<u64>(), command()).prop_map(
        |(group, term, index, command)| LogRecord {
            group,
            term,
            index,
            command,
        },
    )
}

// ---------------------------------------------------------------- helpers

fn append_record(index: u64, payload: &str) -> LogRecord {
    LogRecord {
        group: (index % 256) as u16,
        term: 3,
        index,
        command: Command::Append(AppendEntry {
            session_id: "ses_ü".into(),
            seq: index,
            inserted_at_us: 1_700_000_000_000_000,
            event_type: "message".into(),
            payload: payload.into(),
            actor: Some("agent:1".into()),
            source: None,
            metadata: "{}".into(),
            refs: "{}".into(),
            idempotency_key: Some(format!("k{index}")),
            producer_id: None,
            producer_seq: None,
            digest: [index as u8; 16],
        }),
    }
}

fn batch(epoch: u64, records: &[LogRecord]) -> Vec<u8> {
    let mut b = BatchBuilder::new(epoch);
    for r in records {
        b.push(r).unwrap();
    }
    b.finish()
}

/// A zeroed segment of SEGMENT_BYTES with `batches` written back to back. Returns
/// the segment and each batch's offset.
fn segment(batches: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
    let mut seg = vec![0u8; SEGMENT_BYTES];
    let mut offsets = Vec::new();
    let mut at = 0;
    for b in batches {
        seg[at..at + b.len()].copy_from_slice(b);
        offsets.push(at);
        at += b.len();
    }
    (seg, offsets)
}

/// Three batches of a few records each; record indexes 1..=9.
fn three_batches(epoch: u64) -> Vec<Vec<u8>> {
    (0..3)
        .map(|b| {
            let recs: Vec<_> = (1..=3)
                .map(|i| append_record(b * 3 + i, "{\"a\":1}"))
                .collect();
            batch(epoch, &recs)
        })
        .collect()
}

fn indexes(scan: &SegmentScan) -> Vec<u64> {
    scan.records.iter().map(|r| r.record.index).collect()
}

fn encode(rec: &LogRecord) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(rec, &mut out);
    out
}

/// Recomputes the records crc and header crc of the batch at the start of `b`, so a
/// mutation reaches the rkyv validator instead of stopping at a crc.
fn fix_crcs(b: &mut [u8]) {
    let len = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let crc = crc32fast::hash(&b[32..32 + len]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------- records

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn record_round_trips(rec in log_record(), prefix in 0usize..3, trailing in 0usize..20) {
        let mut out = vec![0xAA; prefix * 8];
        encode_record(&rec, &mut out);
        let frame_len = out.len() - prefix * 8;
        prop_assert_eq!(frame_len % 8, 0);
        out.extend(std::iter::repeat_n(0x55, trailing));
        let (decoded, used) = decode_record(&out[prefix * 8..]).unwrap();
        prop_assert_eq!(used, frame_len);
        prop_assert_eq!(record_frame_bytes(&out[prefix * 8..]).unwrap(), frame_len);
        prop_assert_eq!(decoded, rec);
    }

    #[test]
    fn batch_round_trips_and_push_offsets_read_back(recs in prop::collection::vec(log_record(), 1..8)) {
        let mut b = BatchBuilder::new(EPOCH);
        let offsets: Vec<u64> = recs.iter().map(|r| b.push(r).unwrap()).collect();
        prop_assert_eq!(b.len(), recs.len());
        let padded = b.padded_bytes_len();
        let bytes = b.finish();
        prop_assert_eq!(bytes.len(), padded);
        prop_assert_eq!(bytes.len() % BLOCK_BYTES, 0);
        for (off, rec) in offsets.iter().zip(&recs) {
            let (got, _) = read_record_at(&bytes[*off as usize..]).unwrap();
            prop_assert_eq!(&got, rec);
        }
        let BatchScan::Valid { records, len_padded } = scan_batch(&bytes, EPOCH) else {
            panic!("batch does not scan as valid");
        };
        prop_assert_eq!(len_padded, bytes.len());
        let got: Vec<_> = records.iter().map(|r| (r.offset, r.record.clone())).collect();
        let want: Vec<_> = offsets.into_iter().zip(recs).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_record(&bytes);
        let _ = scan_batch(&bytes, EPOCH);
        let _ = scan_segment(&bytes, EPOCH);
        let _ = find_valid_batch_after(&bytes, 0, EPOCH);
    }

    #[test]
    fn random_bytes_with_a_plausible_length_never_panic(len in 1u32..64, body in prop::collection::vec(any::<u8>(), 0..128)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(crc32fast::hash(&body[..body.len().min(len as usize)]).to_le_bytes());
        bytes.extend(&body);
        prop_assert!(decode_record(&bytes).is_err() || bytes.len() >= 8 + len as usize);
    }

    /// Mutations with recomputed crcs reach the rkyv validator, which must refuse bad
    /// archives with an error, never a panic or a wrong read.
    #[test]
    fn mutated_records_behind_good_crcs_never_panic(
        recs in prop::collection::vec(log_record(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = batch(EPOCH, &recs);
        let len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
        for (i, x) in flips {
            let at = 32 + i.index(len);
            bytes[at] ^= x.max(1);
        }
        fix_crcs(&mut bytes);
        let _ = scan_batch(&bytes, EPOCH);
        let _ = scan_segment(&bytes, EPOCH);
    }

    /// The shell may read a segment in windows of any size; the verdict is the same.
    #[test]
    fn windowed_scanner_agrees_with_whole_segment_scan(
        window in 1usize..(3 * BLOCK_BYTES),
        cut in 0usize..(3 * BLOCK_BYTES),
        garbage in any::<bool>(),
    ) {
        let (mut seg, offsets) = segment(&three_batches(EPOCH));
        let at = offsets[2] + cut.min(BLOCK_BYTES - 1);
        if garbage { seg[at] ^= 0xFF } else { seg[at..].fill(0) }
        let whole = scan_segment(&seg, EPOCH);
        let mut scanner = SegmentScanner::new(EPOCH, seg.len() as u64);
        let mut records = Vec::new();
        while let Some(r) = scanner.next_read() {
            let start = r.offset as usize;
            let end = (start + window.max(r.min_bytes)).min(seg.len());
            scanner.feed(&seg[start..end]);
            records.extend(scanner.take_records());
        }
        let mut windowed = scanner.finish();
        records.append(&mut windowed.records);
        windowed.records = records;
        prop_assert_eq!(windowed, whole);
    }
}

#[test]
fn every_command_variant_round_trips() {
    let commands = vec![
        Command::Noop,
        Command::CreateSession(CreateSession {
            session_id: "s".into(),
            title: Some("Tïtle 🚀".into()),
            metadata: "{\"k\":\"v\"}".into(),
            at_us: -1,
        }),
        Command::PatchSession(PatchSession {
            session_id: "s".into(),
            title: None,
            metadata: "{}".into(),
            version: 2,
            at_us: i64::MAX,
        }),
        Command::SetArchived(SetArchived {
            session_id: "s".into(),
            archived: true,
            version: 3,
            at_us: 0,
        }),
        append_record(1, "[1,2,3]").command,
        Command::ArchiveProgress(ArchiveProgress {
            sessions: vec![SessionProgress {
                session_id: "s".into(),
                archived_seq: 9,
            }],
        }),
    ];
    for command in commands {
        let rec = LogRecord {
            group: 255,
            term: u64::MAX,
            index: 1,
            command,
        };
        assert_eq!(decode_record(&encode(&rec)).unwrap().0, rec);
    }
}

#[test]
fn truncated_record_at_every_cut_point_is_an_error() {
    let frame = encode(&append_record(5, "{\"text\":\"héllo\"}"));
    for cut in 0..frame.len() {
        let err = decode_record(&frame[..cut]).unwrap_err();
        assert!(
            matches!(err, DecodeError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn every_flipped_bit_in_a_record_is_an_error() {
    let frame = encode(&append_record(5, "\"x\""));
    for bit in 0..frame.len() * 8 {
        let mut bad = frame.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(decode_record(&bad).is_err(), "flipped bit {bit} decoded");
    }
}

#[test]
fn record_length_limits_are_enforced() {
    let mut frame = encode(&append_record(1, "1"));
    frame[0..4].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        decode_record(&frame),
        Err(DecodeError::LengthOutOfRange { len: 0 })
    );
    let too_long = RECORD_BYTES_MAX as u32 + 1;
    frame[0..4].copy_from_slice(&too_long.to_le_bytes());
    assert_eq!(
        decode_record(&frame),
        Err(DecodeError::LengthOutOfRange { len: too_long })
    );
}

#[test]
fn crc_valid_garbage_is_refused_by_validation() {
    let body = [0xFFu8; 64];
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(crc32fast::hash(&body).to_le_bytes());
    frame.extend(body);
    assert!(matches!(
        decode_record(&frame),
        Err(DecodeError::Invalid { .. })
    ));
}

#[test]
fn big_payload_round_trips() {
    let rec = append_record(1, &"ü".repeat(3 * 1024 * 1024));
    assert_eq!(decode_record(&encode(&rec)).unwrap().0, rec);
}

#[test]
#[should_panic(expected = "outside 1..=")]
fn encoding_a_record_over_the_limit_panics() {
    encode(&append_record(1, &"x".repeat(RECORD_BYTES_MAX)));
}

// ---------------------------------------------------------------- batches

#[test]
fn builder_refuses_records_over_the_limit() {
    let mut b = BatchBuilder::new(EPOCH);
    let err = b
        .push(&append_record(1, &"x".repeat(RECORD_BYTES_MAX)))
        .unwrap_err();
    assert!(
        matches!(err, PushError::RecordTooLarge { record_bytes } if record_bytes > RECORD_BYTES_MAX)
    );
    assert!(b.is_empty());
}

#[test]
fn full_batch_refuses_and_the_record_fits_in_a_new_batch() {
    let six_mib = 6 * 1024 * 1024;
    let big = append_record(2, &"y".repeat(six_mib));
    let mut b = BatchBuilder::new(EPOCH);
    b.push(&append_record(0, &"z".repeat(six_mib))).unwrap();
    b.push(&append_record(1, &"z".repeat(six_mib))).unwrap();
    let before = b.bytes_len();
    assert!(matches!(b.push(&big), Err(PushError::BatchFull { .. })));
    assert_eq!(
        b.bytes_len(),
        before,
        "a refused push leaves the batch unchanged"
    );
    let first = b.finish();
    assert!(first.len() <= BATCH_BYTES_MAX);
    let mut next = BatchBuilder::new(EPOCH);
    assert_eq!(next.push(&big).unwrap(), BATCH_HEADER_BYTES as u64);
    assert!(next.finish().len() <= BATCH_BYTES_MAX);
}

#[test]
fn batch_header_layout_is_as_documented() {
    let b = batch(EPOCH, &[append_record(1, "1"), append_record(2, "2")]);
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(&b[0..4], b"SCWL");
    assert_eq!(u32_at(0), BATCH_MAGIC);
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), FORMAT_VERSION);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 0);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), EPOCH);
    let records_bytes = u32_at(16) as usize;
    assert_eq!(u32_at(20), 2);
    assert_eq!(u32_at(24), crc32fast::hash(&b[32..32 + records_bytes]));
    assert_eq!(u32_at(28), crc32fast::hash(&b[..28]));
    assert!(
        b[32 + records_bytes..].iter().all(|&x| x == 0),
        "padding is zeros"
    );
}

#[test]
fn every_flipped_bit_in_a_batch_header_is_invalid() {
    let b = batch(EPOCH, &[append_record(1, "1")]);
    for bit in 0..BATCH_HEADER_BYTES * 8 {
        let mut bad = b.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let got = scan_batch(&bad, EPOCH);
        assert!(
            matches!(got, BatchScan::Invalid { .. }),
            "bit {bit}: {got:?}"
        );
    }
}

#[test]
fn a_flipped_bit_in_the_records_area_is_invalid() {
    let b = batch(EPOCH, &[append_record(1, "1"), append_record(2, "2")]);
    let records_bytes = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    for at in (32..32 + records_bytes).step_by(7) {
        let mut bad = b.clone();
        bad[at] ^= 0x10;
        assert!(
            matches!(scan_batch(&bad, EPOCH), BatchScan::Invalid { .. }),
            "byte {at}"
        );
    }
}

#[test]
fn a_batch_of_another_epoch_is_stale() {
    let b = batch(EPOCH - 1, &[append_record(1, "1")]);
    let BatchScan::Invalid { reason } = scan_batch(&b, EPOCH) else {
        panic!()
    };
    assert!(reason.contains("stale"), "{reason}");
}

#[test]
fn a_short_slice_asks_for_more() {
    let b = batch(EPOCH, &[append_record(1, &"p".repeat(5000))]);
    assert_eq!(
        scan_batch(&b[..10], EPOCH),
        BatchScan::NeedMore {
            bytes: BATCH_HEADER_BYTES
        }
    );
    let BatchScan::NeedMore { bytes } = scan_batch(&b[..100], EPOCH) else {
        panic!()
    };
    assert!(bytes > 5000 && bytes <= b.len());
    assert!(matches!(
        scan_batch(&b[..bytes], EPOCH),
        BatchScan::Valid { .. }
    ));
    assert_eq!(scan_batch(&[0u8; 64], EPOCH), BatchScan::Zero);
}

#[test]
fn find_valid_batch_after_looks_at_block_boundaries_only() {
    let (seg, offsets) = segment(&three_batches(EPOCH));
    assert_eq!(find_valid_batch_after(&seg, 0, EPOCH), Some(0));
    assert_eq!(
        find_valid_batch_after(&seg, 1, EPOCH),
        Some(offsets[1] as u64)
    );
    assert_eq!(
        find_valid_batch_after(&seg, offsets[2] as u64 + 1, EPOCH),
        None
    );
    assert_eq!(find_valid_batch_after(&seg, 0, EPOCH + 1), None);
    assert_eq!(find_valid_batch_after(&seg, u64::MAX, EPOCH), None);
}

// ---------------------------------------------------------------- segment scan

#[test]
fn clean_segment_yields_every_record_and_the_next_write_offset() {
    let batches = three_batches(EPOCH);
    let written: usize = batches.iter().map(Vec::len).sum();
    let (seg, offsets) = segment(&batches);
    let scan = scan_segment(&seg, EPOCH);
    assert_eq!(scan.outcome, ScanOutcome::Clean);
    assert_eq!(scan.end, written as u64);
    assert_eq!(indexes(&scan), (1..=9).collect::<Vec<_>>());
    assert_eq!(
        scan.records[3].offset,
        offsets[1] as u64 + BATCH_HEADER_BYTES as u64
    );
    for r in &scan.records {
        assert_eq!(
            read_record_at(&seg[r.offset as usize..]).unwrap().0,
            r.record
        );
    }
}

#[test]
fn a_segment_filled_to_the_end_is_clean() {
    let rec = append_record(1, &"f".repeat(BLOCK_BYTES - 400));
    let batches: Vec<_> = (0..SEGMENT_BYTES / BLOCK_BYTES)
        .map(|_| batch(EPOCH, std::slice::from_ref(&rec)))
        .collect();
    assert!(batches.iter().all(|b| b.len() == BLOCK_BYTES));
    let (seg, _) = segment(&batches);
    let scan = scan_segment(&seg, EPOCH);
    assert_eq!(
        (scan.end, scan.outcome),
        (SEGMENT_BYTES as u64, ScanOutcome::Clean)
    );
    assert_eq!(scan.records.len(), SEGMENT_BYTES / BLOCK_BYTES);
}

#[test]
fn zero_length_and_tiny_segments_are_clean_and_empty() {
    for len in [
        0,
        1,
        BATCH_HEADER_BYTES - 1,
        BATCH_HEADER_BYTES,
        BLOCK_BYTES,
    ] {
        let scan = scan_segment(&vec![0u8; len], EPOCH);
        assert_eq!(
            scan,
            SegmentScan {
                records: vec![],
                end: 0,
                outcome: ScanOutcome::Clean
            }
        );
    }
}

#[test]
fn torn_last_batch_cut_mid_record_is_dropped_and_earlier_batches_kept() {
    let (mut seg, offsets) = segment(&three_batches(EPOCH));
    seg[offsets[2] + 100..].fill(0);
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(scan.outcome, ScanOutcome::TornTail { offset, .. } if offset == offsets[2] as u64)
    );
    assert_eq!(scan.end, offsets[2] as u64);
    assert_eq!(indexes(&scan), (1..=6).collect::<Vec<_>>());
}

#[test]
fn garbage_in_the_last_batch_is_a_torn_tail() {
    let (mut seg, offsets) = segment(&three_batches(EPOCH));
    for (i, x) in seg[offsets[2]..offsets[2] + 300].iter_mut().enumerate() {
        *x = (i * 31 + 7) as u8;
    }
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(scan.outcome, ScanOutcome::TornTail { offset, .. } if offset == offsets[2] as u64)
    );
    assert_eq!(indexes(&scan), (1..=6).collect::<Vec<_>>());
}

#[test]
fn a_last_batch_running_past_the_segment_end_is_a_torn_tail() {
    let big = batch(EPOCH, &[append_record(1, &"b".repeat(3 * BLOCK_BYTES))]);
    let mut seg = vec![0u8; 2 * BLOCK_BYTES];
    seg.copy_from_slice(&big[..2 * BLOCK_BYTES]);
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(scan.outcome, ScanOutcome::TornTail { offset: 0, .. }),
        "{scan:?}"
    );
}

#[test]
fn a_bad_batch_followed_by_a_valid_batch_is_corruption() {
    let (mut seg, offsets) = segment(&three_batches(EPOCH));
    seg[offsets[1] + 40] ^= 0x01;
    let scan = scan_segment(&seg, EPOCH);
    let ScanOutcome::Corrupt { offset, reason } = &scan.outcome else {
        panic!("{scan:?}")
    };
    assert_eq!(*offset, offsets[1] as u64);
    assert!(
        reason.contains(&format!("offset {}", offsets[2])),
        "{reason}"
    );
}

#[test]
fn a_zeroed_header_followed_by_a_valid_batch_is_corruption() {
    let (mut seg, offsets) = segment(&three_batches(EPOCH));
    seg[offsets[1]..offsets[1] + BATCH_HEADER_BYTES].fill(0);
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(scan.outcome, ScanOutcome::Corrupt { offset, .. } if offset == offsets[1] as u64)
    );
}

#[test]
fn stale_batches_of_a_recycled_segment_end_the_scan_as_garbage() {
    let stale = three_batches(EPOCH - 1);
    let fresh = three_batches(EPOCH);
    let (mut seg, offsets) = segment(&stale);
    seg[..fresh[0].len()].copy_from_slice(&fresh[0]);
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(&scan.outcome, ScanOutcome::TornTail { offset, reason }
        if *offset == offsets[1] as u64 && reason.contains("stale"))
    );
    assert_eq!(indexes(&scan), vec![1, 2, 3]);
    let all_stale = scan_segment(&segment(&stale).0, EPOCH);
    assert!(matches!(
        all_stale.outcome,
        ScanOutcome::TornTail { offset: 0, .. }
    ));
    assert!(all_stale.records.is_empty());
}

#[test]
fn a_stale_batch_after_garbage_does_not_count_as_valid() {
    let (mut seg, offsets) = segment(&three_batches(EPOCH - 1));
    let fresh = batch(EPOCH, &[append_record(1, "1")]);
    seg[..fresh.len()].copy_from_slice(&fresh);
    seg[offsets[1]] ^= 0xFF;
    let scan = scan_segment(&seg, EPOCH);
    assert!(
        matches!(scan.outcome, ScanOutcome::TornTail { .. }),
        "{scan:?}"
    );
}

// ---------------------------------------------------------------- whole log

fn summary(epoch: u64, end: u64, outcome: ScanOutcome) -> SegmentSummary {
    SegmentSummary {
        epoch,
        end,
        outcome,
    }
}

fn torn(offset: u64) -> ScanOutcome {
    ScanOutcome::TornTail {
        offset,
        reason: "bad".into(),
    }
}

#[test]
fn log_of_clean_segments_and_a_torn_last_segment_is_fine() {
    assert_eq!(classify_log(&[]), Ok(()));
    let log = [
        summary(1, 8192, ScanOutcome::Clean),
        summary(2, 4096, torn(4096)),
    ];
    assert_eq!(classify_log(&log), Ok(()));
}

#[test]
fn torn_tail_followed_only_by_empty_segments_is_fine() {
    let log = [
        summary(1, 4096, torn(4096)),
        summary(2, 0, ScanOutcome::Clean),
    ];
    assert_eq!(classify_log(&log), Ok(()));
}

#[test]
fn torn_tail_before_a_written_segment_is_corruption() {
    let log = [summary(4, 4096, torn(4096)), summary(5, 0, torn(0))];
    let err = classify_log(&log).unwrap_err();
    assert_eq!(
        err,
        LogError::TornTailBeforeEnd {
            epoch: 4,
            offset: 4096,
            reason: "bad".into(),
            later_epoch: 5
        }
    );
    assert!(err.to_string().contains("segment 4"));
}

#[test]
fn corrupt_segment_anywhere_names_epoch_and_offset() {
    let corrupt = ScanOutcome::Corrupt {
        offset: 12288,
        reason: "crc".into(),
    };
    let log = [
        summary(1, 0, ScanOutcome::Clean),
        summary(2, 12288, corrupt),
    ];
    let err = classify_log(&log).unwrap_err();
    assert_eq!(
        err,
        LogError::Corrupt {
            epoch: 2,
            offset: 12288,
            reason: "crc".into()
        }
    );
    assert!(err
        .to_string()
        .contains("segment 2 corrupt at offset 12288"));
}

#[test]
fn segments_out_of_epoch_order_are_refused() {
    let log = [
        summary(3, 0, ScanOutcome::Clean),
        summary(3, 0, ScanOutcome::Clean),
    ];
    assert_eq!(
        classify_log(&log),
        Err(LogError::EpochsNotIncreasing {
            previous: 3,
            next: 3
        })
    );
}

#[test]
fn scan_summary_feeds_classify_log() {
    let (seg, _) = segment(&three_batches(EPOCH));
    let scan = scan_segment(&seg, EPOCH);
    assert_eq!(classify_log(&[scan.summary(EPOCH)]), Ok(()));
}

/// A scan from a snapshot's resume position does not judge what lies before it (the
/// snapshot covers it; the scrubber verifies it), so old damage never blocks a start.
#[test]
fn a_scan_from_the_resume_position_ignores_damage_before_it() {
    let (mut seg, offsets) = segment(&three_batches(1));
    seg[offsets[0] + 40] ^= 0xFF;
    let whole = scan_segment(&seg, 1);
    assert!(matches!(whole.outcome, ScanOutcome::Corrupt { .. }));
    let from = scan_segment_from(&seg, 1, offsets[1] as u64);
    assert_eq!(from.outcome, ScanOutcome::Clean);
    assert_eq!(indexes(&from), (4..=9).collect::<Vec<_>>());
    let written: usize = three_batches(1).iter().map(Vec::len).sum();
    assert_eq!(from.end, written as u64);
}
