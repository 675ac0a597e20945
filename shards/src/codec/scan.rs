//! The recovery scan: which batches of a segment to trust after a crash, and whether
//! the segments together form a log that may be served.

use std::fmt;

use super::batch::{header_is_valid, scan_batch, BatchScan};
use super::{BATCH_HEADER_BYTES, BLOCK_BYTES};
use crate::entry::LogRecord;

/// A record found by a scan, with the offset of its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Absolute offset in the segment, except in [`BatchScan::Valid`] where it is
    /// relative to the batch.
    pub offset: u64,
    pub record: LogRecord,
}

/// How the scan of one segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// Stopped at an all-zero header (or the segment's end) with nothing valid after it.
    /// A write torn before any of it reached the disk also looks like this, which is
    /// fine: it was never acknowledged.
    Clean,
    /// The batch at `offset` is bad and no valid batch follows: the last write was torn
    /// by a crash. That whole batch is dropped; it was never acknowledged.
    TornTail { offset: u64, reason: String },
    /// The batch (or zero header) at `offset` is bad but a valid batch follows it, so
    /// bytes that were fsynced have changed: start-up must stop.
    Corrupt { offset: u64, reason: String },
}

/// The result of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// Records of every valid batch before `end`, in log order.
    pub records: Vec<ScannedRecord>,
    /// Where the next batch is written: after the last valid batch.
    pub end: u64,
    pub outcome: ScanOutcome,
}

impl SegmentScan {
    pub fn summary(&self, epoch: u64) -> SegmentSummary {
        SegmentSummary {
            epoch,
            end: self.end,
            outcome: self.outcome.clone(),
        }
    }
}

/// Bytes the shell must read next: starting at `offset`, at least `min_bytes` (more is
/// welcome, up to the segment's end; 1–8 MiB windows keep the scan fast).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub offset: u64,
    pub min_bytes: usize,
}

#[derive(Debug)]
enum Phase {
    /// Walking valid batches.
    Batches,
    /// Found a bad batch at `bad` (`fault` is None for a zero header); looking for a
    /// valid header after it to tell a torn tail from corruption.
    Searching {
        bad: u64,
        fault: Option<String>,
    },
    Done {
        end: u64,
        outcome: ScanOutcome,
    },
}

/// The scan of one segment, fed windows of bytes so the shell never holds a whole
/// segment in memory. Loop: `next_read()`, read those bytes, `feed` them; drain records
/// with `take_records` whenever convenient; `finish` once `next_read` returns None.
/// After a bad batch the scanner reads on to the segment's end looking for a valid
/// header, because that is the only way to tell a torn tail from corruption.
#[derive(Debug)]
pub struct SegmentScanner {
    epoch: u64,
    segment_bytes: u64,
    /// The block boundary the scan is at.
    at: u64,
    /// Bytes needed at `at` before the scan can move on.
    need: usize,
    phase: Phase,
    records: Vec<ScannedRecord>,
}

impl SegmentScanner {
    pub fn new(epoch: u64, segment_bytes: u64) -> Self {
        Self::starting_at(epoch, segment_bytes, 0)
    }

    /// A scan that starts at block boundary `at` (a snapshot's resume position): what
    /// lies before it is covered by the snapshot and not judged here (the scrubber
    /// verifies it).
    pub fn starting_at(epoch: u64, segment_bytes: u64, at: u64) -> Self {
        assert!(
            at.is_multiple_of(BLOCK_BYTES as u64),
            "a scan starts at a block boundary, not {at}"
        );
        let mut scanner = Self {
            epoch,
            segment_bytes,
            at,
            need: BATCH_HEADER_BYTES,
            phase: Phase::Batches,
            records: Vec::new(),
        };
        scanner.stop_at_segment_end();
        scanner
    }

    /// What to read next, or None when the scan is done.
    pub fn next_read(&self) -> Option<ReadRequest> {
        match self.phase {
            Phase::Done { .. } => None,
            _ => Some(ReadRequest {
                offset: self.at,
                min_bytes: self.need.min(self.remaining() as usize),
            }),
        }
    }

    /// Consumes a window of the segment starting at `next_read().offset`, at least
    /// `min_bytes` long and not past the segment's end.
    pub fn feed(&mut self, window: &[u8]) {
        let request = self.next_read().expect("feed after the scan is done");
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
            let rest = match window.get((self.at - start) as usize..) {
                Some(rest) if !matches!(self.phase, Phase::Done { .. }) => rest,
                _ => return,
            };
            let moved = match self.phase {
                Phase::Batches => self.step_batch(rest),
                Phase::Searching { .. } => self.step_search(rest),
                Phase::Done { .. } => unreachable!(),
            };
            if !moved {
                return;
            }
            self.need = BATCH_HEADER_BYTES;
        }
    }

    /// Records found so far (each from a whole valid batch, so they are final).
    pub fn take_records(&mut self) -> Vec<ScannedRecord> {
        std::mem::take(&mut self.records)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// The result; records already taken are not repeated. Panics before the end.
    pub fn finish(self) -> SegmentScan {
        match self.phase {
            Phase::Done { end, outcome } => SegmentScan {
                records: self.records,
                end,
                outcome,
            },
            _ => panic!("segment scan finished at offset {} before its end", self.at),
        }
    }

    fn remaining(&self) -> u64 {
        self.segment_bytes.saturating_sub(self.at)
    }

    /// Handles one batch at `at`; false if `rest` is too short to decide.
    fn step_batch(&mut self, rest: &[u8]) -> bool {
        match scan_batch(rest, self.epoch) {
            BatchScan::Zero => self.found_bad(None),
            BatchScan::Invalid { reason } => self.found_bad(Some(reason)),
            BatchScan::Valid {
                records,
                len_padded,
            } => {
                let base = self.at;
                let absolute = records.into_iter().map(|r| ScannedRecord {
                    offset: base + r.offset,
                    record: r.record,
                });
                self.records.extend(absolute);
                self.at += len_padded as u64;
            }
            BatchScan::NeedMore { bytes } if bytes as u64 > self.remaining() => {
                let left = self.remaining();
                self.found_bad(Some(format!(
                    "batch of {bytes} bytes runs past the segment end ({left} bytes left)"
                )));
            }
            BatchScan::NeedMore { bytes } => {
                debug_assert!(bytes > rest.len());
                self.need = bytes;
                return false;
            }
        }
        true
    }

    fn found_bad(&mut self, fault: Option<String>) {
        self.phase = Phase::Searching {
            bad: self.at,
            fault,
        };
        self.at += BLOCK_BYTES as u64;
    }

    /// Checks the header at `at` while searching; false if `rest` is too short.
    fn step_search(&mut self, rest: &[u8]) -> bool {
        if rest.len() < BATCH_HEADER_BYTES {
            return false;
        }
        if !header_is_valid(rest, self.epoch) {
            self.at += BLOCK_BYTES as u64;
            return true;
        }
        let Phase::Searching { bad, fault } = &self.phase else {
            unreachable!()
        };
        let what = fault.as_deref().unwrap_or("zero header");
        let reason = format!("{what}; a valid batch follows at offset {}", self.at);
        let offset = *bad;
        self.phase = Phase::Done {
            end: offset,
            outcome: ScanOutcome::Corrupt { offset, reason },
        };
        true
    }

    /// Ends the scan when no header fits before the segment's end.
    fn stop_at_segment_end(&mut self) {
        if self.remaining() >= BATCH_HEADER_BYTES as u64 {
            return;
        }
        let (end, outcome) = match &mut self.phase {
            Phase::Done { .. } => return,
            Phase::Batches => (self.at.min(self.segment_bytes), ScanOutcome::Clean),
            Phase::Searching { bad, fault: None } => (*bad, ScanOutcome::Clean),
            Phase::Searching {
                bad,
                fault: Some(reason),
            } => {
                let reason = std::mem::take(reason);
                (
                    *bad,
                    ScanOutcome::TornTail {
                        offset: *bad,
                        reason,
                    },
                )
            }
        };
        self.phase = Phase::Done { end, outcome };
    }
}

/// Scans a whole segment held in memory (its length is the segment's size).
pub fn scan_segment(bytes: &[u8], epoch: u64) -> SegmentScan {
    scan_segment_from(bytes, epoch, 0)
}

/// Scans a segment held in memory from block boundary `from` on (see
/// [`SegmentScanner::starting_at`]).
pub fn scan_segment_from(bytes: &[u8], epoch: u64, from: u64) -> SegmentScan {
    let mut scanner = SegmentScanner::starting_at(epoch, bytes.len() as u64, from);
    while let Some(request) = scanner.next_read() {
        scanner.feed(&bytes[request.offset as usize..]);
    }
    scanner.finish()
}

/// What [`classify_log`] needs of each segment's scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub epoch: u64,
    pub end: u64,
    pub outcome: ScanOutcome,
}

impl SegmentSummary {
    /// Nothing was ever written to it (a torn first write counts as written).
    fn is_empty(&self) -> bool {
        self.end == 0 && self.outcome == ScanOutcome::Clean
    }
}

/// Why the log must not be served. The shell adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// A bad batch followed by a valid one in the same segment.
    Corrupt {
        epoch: u64,
        offset: u64,
        reason: String,
    },
    /// A torn tail in a segment that a later, non-empty segment follows. Segments are
    /// rolled only once everything in them is fsynced, so this tail was acknowledged.
    TornTailBeforeEnd {
        epoch: u64,
        offset: u64,
        reason: String,
        later_epoch: u64,
    },
    /// Segments must be given in strictly increasing epoch order.
    EpochsNotIncreasing { previous: u64, next: u64 },
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Corrupt {
                epoch,
                offset,
                reason,
            } => {
                write!(f, "segment {epoch} corrupt at offset {offset}: {reason}")
            }
            Self::TornTailBeforeEnd {
                epoch,
                offset,
                reason,
                later_epoch,
            } => write!(
                f,
                "segment {epoch} has a torn tail at offset {offset} ({reason}) although \
                 segment {later_epoch} was written after it"
            ),
            Self::EpochsNotIncreasing { previous, next } => {
                write!(f, "segment epochs out of order: {next} after {previous}")
            }
        }
    }
}

impl std::error::Error for LogError {}

/// Decides whether the scanned segments (oldest first) form a log that may be served:
/// corruption anywhere is an error, and a torn tail is allowed only in the last
/// non-empty segment.
pub fn classify_log(segments: &[SegmentSummary]) -> Result<(), LogError> {
    if let Some(w) = segments.windows(2).find(|w| w[1].epoch <= w[0].epoch) {
        return Err(LogError::EpochsNotIncreasing {
            previous: w[0].epoch,
            next: w[1].epoch,
        });
    }
    let last_written = segments.iter().rposition(|s| !s.is_empty());
    for (i, s) in segments.iter().enumerate() {
        match &s.outcome {
            ScanOutcome::Clean => {}
            ScanOutcome::Corrupt { offset, reason } => {
                let reason = reason.clone();
                return Err(LogError::Corrupt {
                    epoch: s.epoch,
                    offset: *offset,
                    reason,
                });
            }
            ScanOutcome::TornTail { offset, reason } => {
                let last = last_written.expect("a torn segment is non-empty");
                if i != last {
                    return Err(LogError::TornTailBeforeEnd {
                        epoch: s.epoch,
                        offset: *offset,
                        reason: reason.clone(),
                        later_epoch: segments[last].epoch,
                    });
                }
            }
        }
    }
    Ok(())
}
