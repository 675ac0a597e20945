//! Verifying a sealed segment end to end (the background scrubber).
//!
//! The recovery scan stops at the first bad batch, because after a crash only "torn
//! tail or corruption" matters. A scrubber must say *what* is damaged, so this walk goes
//! on: a batch whose header holds but whose records fail their crc32 is walked record
//! by record (each record frame carries its own crc32), and after a batch whose header
//! is bad the walk looks for the next valid header block by block. It reports every
//! record it can trust and every span of bytes it cannot.
//!
//! A sealed segment holds valid batches back to back from offset 0, then zeros to its
//! end (it was pre-written with zeros; a torn tail is zeroed at start-up before a
//! segment can ever be sealed). So a zero block followed by a valid batch, and non-zero
//! bytes after the last batch, are damage too.

use super::batch::{decode_records, header_is_valid, is_zero, parse_header};
use super::record::{decode_record, read_u32, record_frame_bytes};
use super::scan::ReadRequest;
use super::{BATCH_HEADER_BYTES, BLOCK_BYTES};
use crate::entry::LogRecord;

/// A record whose frame crc32 holds, at its absolute offset in the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub offset: u64,
    /// The crc32 of its rkyv bytes (the frame's crc field, which they match).
    pub crc: u32,
    pub record: LogRecord,
}

/// Bytes `start..end` of the segment that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSpan {
    pub start: u64,
    pub end: u64,
    /// Set when the span is one record frame whose length field led to a frame that
    /// fits its batch but whose bytes fail the frame's crc32: that stored crc32. If the
    /// damage is in the record's bytes (not in its frame header), a copy whose encoding
    /// has this crc32 is the original record. Only a hint: the header may be what broke.
    pub frame_crc: Option<u32>,
    pub reason: String,
}

impl DamagedSpan {
    pub fn contains(&self, offset: u64) -> bool {
        (self.start..self.end).contains(&offset)
    }
}

#[derive(Debug)]
enum Phase {
    /// Walking batches at block boundaries.
    Batches,
    /// After a bad header (or a zero block) at `bad`: looking for the next valid header.
    /// `written` is set once a non-zero byte was seen since `bad`.
    Searching {
        bad: u64,
        reason: String,
        written: bool,
    },
    Done,
}

/// The verification of one sealed segment, fed windows of its bytes (so the shell never
/// holds a whole segment): loop `next_read()`, read at least that much, `feed` it; drain
/// `take_records` / `take_spans` as it goes.
#[derive(Debug)]
pub struct SegmentVerifier {
    epoch: u64,
    segment_bytes: u64,
    at: u64,
    need: usize,
    phase: Phase,
    records: Vec<VerifiedRecord>,
    spans: Vec<DamagedSpan>,
}

impl SegmentVerifier {
    pub fn new(epoch: u64, segment_bytes: u64) -> Self {
        let mut verifier = Self {
            epoch,
            segment_bytes,
            at: 0,
            need: BATCH_HEADER_BYTES,
            phase: Phase::Batches,
            records: Vec::new(),
            spans: Vec::new(),
        };
        verifier.stop_at_segment_end();
        verifier
    }

    /// What to read next, or None when the whole segment is verified.
    pub fn next_read(&self) -> Option<ReadRequest> {
        match self.phase {
            Phase::Done => None,
            _ => Some(ReadRequest {
                offset: self.at,
                min_bytes: self.need.min(self.remaining() as usize),
            }),
        }
    }

    /// Consumes a window starting at `next_read().offset`, at least `min_bytes` long and
    /// not past the segment's end.
    pub fn feed(&mut self, window: &[u8]) {
        let request = self
            .next_read()
            .expect("feed after the verification is done");
        assert!(
            window.len() >= request.min_bytes,
            "window shorter than requested"
        );
        assert!(
            window.len() as u64 <= self.remaining(),
            "window past the segment end"
        );
        let start = request.offset;
        loop {
            self.stop_at_segment_end();
            if matches!(self.phase, Phase::Done) {
                return;
            }
            let Some(rest) = window.get((self.at - start) as usize..) else {
                return;
            };
            let moved = match self.phase {
                Phase::Batches => self.step_batch(rest),
                Phase::Searching { .. } => self.step_search(rest),
                Phase::Done => unreachable!(),
            };
            if !moved {
                return;
            }
            self.need = BATCH_HEADER_BYTES;
        }
    }

    /// Records verified so far, in offset order.
    pub fn take_records(&mut self) -> Vec<VerifiedRecord> {
        std::mem::take(&mut self.records)
    }

    /// Damaged spans found so far, in offset order.
    pub fn take_spans(&mut self) -> Vec<DamagedSpan> {
        std::mem::take(&mut self.spans)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn remaining(&self) -> u64 {
        self.segment_bytes.saturating_sub(self.at)
    }

    /// One batch at `at`; false if `rest` is too short to decide.
    fn step_batch(&mut self, rest: &[u8]) -> bool {
        if rest.len() < BATCH_HEADER_BYTES {
            return false;
        }
        let h = &rest[..BATCH_HEADER_BYTES];
        if is_zero(h) {
            // Where the written part should end; the search tells whether it does.
            self.search_from("an all-zero block".into(), false);
            return true;
        }
        let header = match parse_header(h, self.epoch) {
            Ok(header) => header,
            Err(reason) => {
                self.search_from(format!("bad batch header: {reason}"), true);
                return true;
            }
        };
        let end = BATCH_HEADER_BYTES + header.records_bytes;
        if end as u64 > self.remaining() {
            let reason = format!("a batch of {end} bytes runs past the segment end");
            self.search_from(reason, true);
            return true;
        }
        if rest.len() < end {
            self.need = end;
            return false;
        }
        let area = &rest[BATCH_HEADER_BYTES..end];
        let base = self.at;
        if crc32fast::hash(area) == header.records_crc {
            match decode_records(area, header.record_count) {
                Ok(records) => {
                    for r in records {
                        let crc = read_u32(rest, r.offset as usize + 4);
                        self.records.push(VerifiedRecord {
                            offset: base + r.offset,
                            crc,
                            record: r.record,
                        });
                    }
                }
                Err(reason) => self.spans.push(DamagedSpan {
                    start: base,
                    end: base + end as u64,
                    frame_crc: None,
                    reason: format!("records pass their crc32 but do not decode: {reason}"),
                }),
            }
        } else {
            self.walk_frames(rest, end);
        }
        self.at += end.next_multiple_of(BLOCK_BYTES) as u64;
        true
    }

    /// The records of a batch whose header holds but whose records area fails its
    /// crc32: each frame is checked on its own, so intact records are kept and the
    /// damage is narrowed to frames.
    fn walk_frames(&mut self, rest: &[u8], end: usize) {
        let base = self.at;
        let spans_before = self.spans.len();
        let mut pos = BATCH_HEADER_BYTES;
        while pos < end {
            let frame = match record_frame_bytes(&rest[pos..end]) {
                Ok(len) if pos + len <= end => len,
                Ok(len) => {
                    self.spans.push(DamagedSpan {
                        start: base + pos as u64,
                        end: base + end as u64,
                        frame_crc: None,
                        reason: format!("a record frame of {len} bytes runs past its batch"),
                    });
                    break;
                }
                Err(e) => {
                    self.spans.push(DamagedSpan {
                        start: base + pos as u64,
                        end: base + end as u64,
                        frame_crc: None,
                        reason: format!("unreadable record frame: {e}"),
                    });
                    break;
                }
            };
            match decode_record(&rest[pos..pos + frame]) {
                Ok((record, _)) => self.records.push(VerifiedRecord {
                    offset: base + pos as u64,
                    crc: read_u32(rest, pos + 4),
                    record,
                }),
                Err(e) => self.spans.push(DamagedSpan {
                    start: base + pos as u64,
                    end: base + (pos + frame) as u64,
                    frame_crc: Some(read_u32(rest, pos + 4)),
                    reason: e.to_string(),
                }),
            }
            pos += frame;
        }
        if self.spans.len() == spans_before {
            // Every frame holds: the records area's crc32 in the header is what changed.
            self.spans.push(DamagedSpan {
                start: base,
                end: base + BATCH_HEADER_BYTES as u64,
                frame_crc: None,
                reason: "batch records crc32 mismatch although every record checks".into(),
            });
        }
    }

    fn search_from(&mut self, reason: String, written: bool) {
        self.phase = Phase::Searching {
            bad: self.at,
            reason,
            written,
        };
    }

    /// One block while searching; false if `rest` is too short.
    fn step_search(&mut self, rest: &[u8]) -> bool {
        let block = (BLOCK_BYTES as u64).min(self.remaining()) as usize;
        if rest.len() < block {
            self.need = block;
            return false;
        }
        let Phase::Searching {
            bad,
            reason,
            written,
        } = &mut self.phase
        else {
            unreachable!()
        };
        let first = self.at == *bad;
        if !first && header_is_valid(rest, self.epoch) {
            self.spans.push(DamagedSpan {
                start: *bad,
                end: self.at,
                frame_crc: None,
                reason: format!("{reason}; a valid batch follows at offset {}", self.at),
            });
            self.phase = Phase::Batches;
            return true;
        }
        if !is_zero(&rest[..block]) {
            *written = true;
        }
        self.at += block as u64;
        true
    }

    /// Ends the walk when no header fits before the segment's end.
    fn stop_at_segment_end(&mut self) {
        if self.remaining() >= BATCH_HEADER_BYTES as u64 {
            return;
        }
        if let Phase::Searching {
            bad,
            reason,
            written,
        } = &mut self.phase
        {
            if *written {
                self.spans.push(DamagedSpan {
                    start: *bad,
                    end: self.segment_bytes,
                    frame_crc: None,
                    reason: format!("{reason}; no valid batch follows"),
                });
            }
        }
        self.phase = Phase::Done;
    }
}

/// Verifies a whole segment held in memory (its length is the segment's size).
pub fn verify_segment(bytes: &[u8], epoch: u64) -> (Vec<VerifiedRecord>, Vec<DamagedSpan>) {
    let mut verifier = SegmentVerifier::new(epoch, bytes.len() as u64);
    while let Some(request) = verifier.next_read() {
        verifier.feed(&bytes[request.offset as usize..]);
    }
    (verifier.take_records(), verifier.take_spans())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BatchBuilder;
    use crate::entry::{AppendEntry, Command};

    fn event(seq: u64) -> LogRecord {
        LogRecord {
            group: 3,
            term: 2,
            index: seq + 10,
            command: Command::Append(AppendEntry {
                session_id: "s".into(),
                seq,
                inserted_at_us: 1,
                event_type: "t".into(),
                payload: format!("{{\"n\":\"{}\"}}", "x".repeat(200)),
                actor: None,
                source: None,
                metadata: "{}".into(),
                refs: "{}".into(),
                idempotency_key: None,
                producer_id: None,
                producer_seq: None,
                digest: [0; 16],
            }),
        }
    }

    /// A 64 KiB segment of epoch 7 with batches of `per_batch` events (seqs from 1), and
    /// where each batch starts.
    fn segment(batches: usize, per_batch: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        let mut seq = 1;
        for _ in 0..batches {
            let mut b = BatchBuilder::new(7);
            for _ in 0..per_batch {
                b.push(&event(seq)).unwrap();
                seq += 1;
            }
            starts.push(bytes.len());
            bytes.extend(b.finish());
        }
        bytes.resize(64 << 10, 0);
        (bytes, starts)
    }

    fn seqs(records: &[VerifiedRecord]) -> Vec<u64> {
        records
            .iter()
            .map(|r| match &r.record.command {
                Command::Append(e) => e.seq,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn an_intact_segment_has_every_record_and_no_damage() {
        let (bytes, _) = segment(3, 4);
        let (records, spans) = verify_segment(&bytes, 7);
        assert_eq!(seqs(&records), (1..=12).collect::<Vec<_>>());
        assert!(spans.is_empty(), "{spans:?}");
        assert_eq!(records[0].crc, crate::codec::record_crc(&event(1)));
    }

    #[test]
    fn a_flipped_byte_in_a_record_names_that_frame_and_keeps_the_others() {
        let (mut bytes, starts) = segment(3, 4);
        let (records, _) = verify_segment(&bytes, 7);
        let victim = records[5].clone(); // seq 6, second record of batch 2
        bytes[victim.offset as usize + 40] ^= 0x20;
        let (after, spans) = verify_segment(&bytes, 7);
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].start, victim.offset);
        assert_eq!(spans[0].frame_crc, Some(victim.crc));
        assert!(spans[0].end > victim.offset && spans[0].end < starts[2] as u64);
        let mut want: Vec<u64> = (1..=12).collect();
        want.retain(|&s| s != 6);
        assert_eq!(seqs(&after), want);
    }

    #[test]
    fn a_bad_batch_header_spans_to_the_next_valid_batch() {
        let (mut bytes, starts) = segment(3, 4);
        bytes[starts[1] + 9] ^= 1; // the epoch field of batch 2's header
        let (records, spans) = verify_segment(&bytes, 7);
        assert_eq!(seqs(&records), vec![1, 2, 3, 4, 9, 10, 11, 12]);
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(
            (spans[0].start, spans[0].end),
            (starts[1] as u64, starts[2] as u64)
        );
        assert!(spans[0].reason.contains("header"), "{}", spans[0].reason);
    }

    #[test]
    fn a_zeroed_batch_is_damage_but_trailing_zeros_are_not() {
        let (mut bytes, starts) = segment(3, 4);
        bytes[starts[1]..starts[2]].fill(0);
        let (records, spans) = verify_segment(&bytes, 7);
        assert_eq!(records.len(), 8);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].start, starts[1] as u64);
        // The last batch zeroed: nothing follows it, so this is where the log ends.
        let (mut bytes, starts) = segment(3, 4);
        bytes[starts[2]..].fill(0);
        let (records, spans) = verify_segment(&bytes, 7);
        assert_eq!(records.len(), 8);
        assert!(spans.is_empty());
    }

    #[test]
    fn garbage_after_the_last_batch_is_damage() {
        let (mut bytes, _) = segment(2, 2);
        let at = bytes.len() - 5000;
        bytes[at] = 0xAA;
        let (records, spans) = verify_segment(&bytes, 7);
        assert_eq!(records.len(), 4);
        assert_eq!(spans.len(), 1);
        assert!(spans[0].contains(at as u64));
        assert_eq!(spans[0].end, bytes.len() as u64);
    }

    #[test]
    fn every_flipped_byte_is_found_or_harmless_and_never_panics() {
        let (bytes, starts) = segment(2, 3);
        let (intact, _) = verify_segment(&bytes, 7);
        let written = starts[1] + 4096;
        for at in (0..written).step_by(7) {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x41;
            let (records, spans) = verify_segment(&flipped, 7);
            let found = spans.iter().any(|s| s.contains(at as u64));
            // A flip in a batch's zero padding changes no record and no checksum.
            assert!(found || records == intact, "flip at {at}: {spans:?}");
            // What is reported as intact is exactly what was written there.
            for r in &records {
                assert!(intact.contains(r), "flip at {at}: wrong record {r:?}");
            }
        }
    }

    #[test]
    fn windows_of_any_size_give_the_same_answer() {
        let (mut bytes, _) = segment(4, 3);
        bytes[5000] ^= 0xFF;
        let whole = verify_segment(&bytes, 7);
        for window in [4096usize, 5000, 65536] {
            let mut v = SegmentVerifier::new(7, bytes.len() as u64);
            let mut records = Vec::new();
            let mut spans = Vec::new();
            while let Some(r) = v.next_read() {
                let from = r.offset as usize;
                let len = r.min_bytes.max(window).min(bytes.len() - from);
                v.feed(&bytes[from..from + len]);
                records.extend(v.take_records());
                spans.extend(v.take_spans());
            }
            assert_eq!((records, spans), whole, "window {window}");
        }
    }
}
