//! The write-ahead log's on-disk format (`shards/src/codec/`): segments built from
//! valid batches of arbitrary records, zero blocks and garbage, then damaged the ways
//! disks do, through the recovery scan (whole and windowed), the scrubber's verifier
//! (whole and windowed), the torn-tail classifier, `classify_log`,
//! `find_valid_batch_after` and the record decoder at arbitrary offsets.
//!
//! Input: byte 0 even = a recipe (see `build`), odd = the rest of the input is the
//! segment as it is on disk. The fuzzer's bytes then also choose the read windows.
#![no_main]

use arbitrary::{Result, Unstructured};
use fuzz_support::{damage, log_record};
use libfuzzer_sys::fuzz_target;
use shards::codec::{
    classify_log, classify_torn_tail, decode_record, find_valid_batch_after, record_frame_bytes,
    scan_segment, scan_segment_from, verify_segment, BatchBuilder, ScanOutcome, SegmentScan,
    SegmentScanner, SegmentSummary, SegmentVerifier, BLOCK_BYTES,
};
use shards::entry::LogRecord;

const SEGMENT_BLOCKS_MAX: usize = 6;

fuzz_target!(|data: &[u8]| {
    let [mode, ref rest @ ..] = *data else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let epoch = u64::from(mode >> 1 & 3);
    let (segment, pristine) = if mode & 1 == 1 {
        (rest.to_vec(), None)
    } else {
        match build(&mut u, epoch) {
            Ok(built) => built,
            Err(_) => return,
        }
    };
    let _ = check(&mut u, &segment, epoch, pristine);
});

/// A segment of whole blocks: valid batches (of this epoch or a stale one), zero
/// blocks and garbage, then damaged. Returns the records a scan must find when the
/// segment is undamaged valid batches from offset 0 (then zeros), else None.
fn build(u: &mut Unstructured, epoch: u64) -> Result<(Vec<u8>, Option<Vec<LogRecord>>)> {
    let blocks = u.int_in_range(1..=SEGMENT_BLOCKS_MAX)?;
    let mut segment = Vec::new();
    let mut written = Vec::new();
    let mut pristine = true;
    while segment.len() < blocks * BLOCK_BYTES && !u.is_empty() {
        match u.int_in_range(0..=9)? {
            0 => {
                segment.resize(segment.len() + BLOCK_BYTES, 0);
                pristine = false;
            }
            1 => {
                let garbage = fuzz_support::bytes(u)?;
                segment.extend_from_slice(&garbage);
                segment.resize(segment.len().next_multiple_of(BLOCK_BYTES), 0);
                pristine &= garbage.is_empty();
            }
            kind => {
                let batch_epoch = if kind == 2 { epoch + 1 } else { epoch };
                let mut batch = BatchBuilder::new(batch_epoch);
                let mut records = Vec::new();
                for _ in 0..u.int_in_range(1..=8)? {
                    let record = log_record(u)?;
                    batch.push(&record).expect("small records fit");
                    records.push(record);
                }
                segment.extend_from_slice(&batch.finish());
                pristine &= batch_epoch == epoch;
                written.extend(records);
            }
        }
    }
    let len = segment.len().max(blocks * BLOCK_BYTES);
    segment.resize(len, 0);
    pristine &= !damage(u, &mut segment, 0..len)?;
    Ok((segment, pristine.then_some(written)))
}

fn check(
    u: &mut Unstructured,
    segment: &[u8],
    epoch: u64,
    pristine: Option<Vec<LogRecord>>,
) -> Result<()> {
    let len = segment.len() as u64;
    let scan = scan_segment(segment, epoch);
    assert!(scan.end <= len);
    assert!(scan.records.windows(2).all(|w| w[0].offset < w[1].offset));
    assert!(scan.records.iter().all(|r| r.offset < scan.end));
    if let ScanOutcome::TornTail { offset, .. } | ScanOutcome::Corrupt { offset, .. } = scan.outcome
    {
        assert_eq!(offset, scan.end);
        let _ = classify_torn_tail(&segment[offset as usize..], epoch);
    }
    if let Some(records) = pristine {
        assert_eq!(scan.outcome, ScanOutcome::Clean);
        let found: Vec<&LogRecord> = scan.records.iter().map(|r| &r.record).collect();
        assert_eq!(found, records.iter().collect::<Vec<_>>());
    }
    assert_eq!(scan_windowed(u, segment, epoch)?, scan);

    let (records, spans) = verify_segment(segment, epoch);
    assert_eq!(
        verify_windowed(u, segment, epoch)?,
        (records.clone(), spans.clone())
    );
    assert!(spans.windows(2).all(|w| w[0].end <= w[1].start));
    assert!(spans.iter().all(|s| s.start < s.end && s.end <= len));
    for r in &records {
        assert!(
            !spans.iter().any(|s| s.contains(r.offset)),
            "{r:?} in {spans:?}"
        );
    }
    // The batches the recovery scan trusts are the verifier's too.
    for r in &scan.records {
        assert!(records
            .iter()
            .any(|v| v.offset == r.offset && v.record == r.record));
    }

    let from = u.int_in_range(0..=segment.len() / BLOCK_BYTES)? * BLOCK_BYTES;
    let partial = scan_segment_from(segment, epoch, from as u64);
    assert!(partial.records.iter().all(|r| r.offset >= from as u64));
    if let Some(at) = find_valid_batch_after(segment, from as u64, epoch) {
        assert!(at >= from as u64 && at % BLOCK_BYTES as u64 == 0 && at < len);
    }
    let later = SegmentSummary {
        epoch: epoch + 1,
        end: u.arbitrary::<u16>()?.into(),
        outcome: ScanOutcome::Clean,
    };
    let _ = classify_log(&[scan.summary(epoch), later]);
    let at = u.int_in_range(0..=segment.len())?;
    let window = &segment[at..];
    if let Ok((_, used)) = decode_record(window) {
        assert_eq!(Ok(used), record_frame_bytes(window));
    }
    Ok(())
}

/// The recovery scan fed windows of sizes the fuzzer picks, records drained midway.
fn scan_windowed(u: &mut Unstructured, segment: &[u8], epoch: u64) -> Result<SegmentScan> {
    let mut scanner = SegmentScanner::new(epoch, segment.len() as u64);
    let mut records = Vec::new();
    while let Some(read) = scanner.next_read() {
        let window = window(u, segment, read.offset as usize, read.min_bytes)?;
        scanner.feed(window);
        if u.arbitrary()? {
            records.extend(scanner.take_records());
        }
    }
    let mut scan = scanner.finish();
    records.append(&mut scan.records);
    scan.records = records;
    Ok(scan)
}

type Verified = (
    Vec<shards::codec::VerifiedRecord>,
    Vec<shards::codec::DamagedSpan>,
);

fn verify_windowed(u: &mut Unstructured, segment: &[u8], epoch: u64) -> Result<Verified> {
    let mut verifier = SegmentVerifier::new(epoch, segment.len() as u64);
    while let Some(read) = verifier.next_read() {
        let window = window(u, segment, read.offset as usize, read.min_bytes)?;
        verifier.feed(window);
    }
    Ok((verifier.take_records(), verifier.take_spans()))
}

/// A read of at least `min` bytes at `offset`, not past the end.
fn window<'a>(
    u: &mut Unstructured,
    segment: &'a [u8],
    offset: usize,
    min: usize,
) -> Result<&'a [u8]> {
    let len = u.int_in_range(min..=segment.len() - offset)?;
    Ok(&segment[offset..offset + len])
}
