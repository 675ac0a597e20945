//! One batch: a 32-byte header, records back to back, zero padding to the next block
//! (layout in the parent module).

use std::fmt;

use super::record::{decode_record, frame_bytes, read_u32, serialize, write_frame};
use super::{
    ScannedRecord, BATCH_BYTES_MAX, BATCH_HEADER_BYTES, BLOCK_BYTES, RECORD_ALIGN_BYTES,
    RECORD_BYTES_MAX, RECORD_HEADER_BYTES,
};
use crate::entry::LogRecord;

/// `"SCWL"` (Starcite write-ahead log) read as a little-endian u32.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SCWL");

/// Version of this batch and record layout. A reader refuses other versions.
pub const FORMAT_VERSION: u16 = 1;

/// Smallest possible record frame; bounds how many records a records area can hold.
const RECORD_FRAME_BYTES_MIN: usize = RECORD_HEADER_BYTES + RECORD_ALIGN_BYTES;

/// The fields of a batch header after the checks that need no records.
pub(super) struct BatchHeader {
    pub(super) records_bytes: usize,
    pub(super) record_count: u32,
    pub(super) records_crc: u32,
}

fn encode_header(epoch: u64, records: &[u8], record_count: u32) -> [u8; BATCH_HEADER_BYTES] {
    let mut h = [0u8; BATCH_HEADER_BYTES];
    h[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // h[6..8]: flags, none defined.
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..20].copy_from_slice(&(records.len() as u32).to_le_bytes());
    h[20..24].copy_from_slice(&record_count.to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(records).to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a non-zero header. The crc is checked right after the magic so that a
/// failure of a later check names a field that was really written that way.
pub(super) fn parse_header(h: &[u8], epoch: u64) -> Result<BatchHeader, String> {
    let magic = read_u32(h, 0);
    if magic != BATCH_MAGIC {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let (stored, computed) = (read_u32(h, 28), crc32fast::hash(&h[..28]));
    if stored != computed {
        return Err(format!(
            "header crc32 {stored:#010x} != computed {computed:#010x}"
        ));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(format!("unknown flags {flags:#06x}"));
    }
    let found = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if found != epoch {
        return Err(format!("stale batch: epoch {found}, segment epoch {epoch}"));
    }
    let records_bytes = read_u32(h, 16) as usize;
    if records_bytes > BATCH_BYTES_MAX - BATCH_HEADER_BYTES
        || !records_bytes.is_multiple_of(RECORD_ALIGN_BYTES)
    {
        return Err(format!("records length {records_bytes} impossible"));
    }
    Ok(BatchHeader {
        records_bytes,
        record_count: read_u32(h, 20),
        records_crc: read_u32(h, 24),
    })
}

pub(super) fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// True if `h` (at least [`BATCH_HEADER_BYTES`]) is a header this segment wrote:
/// right magic, header crc, version, flags and epoch. Records are not checked: this is
/// the test for "a valid batch follows", and a header that passes its crc was written.
pub(super) fn header_is_valid(h: &[u8], epoch: u64) -> bool {
    let h = &h[..BATCH_HEADER_BYTES];
    !is_zero(h) && parse_header(h, epoch).is_ok()
}

/// The records length a non-zero header `h` announces, if the header checks out.
pub(super) fn header_records_bytes(h: &[u8], epoch: u64) -> Option<usize> {
    let h = h.get(..BATCH_HEADER_BYTES)?;
    if is_zero(h) {
        return None;
    }
    parse_header(h, epoch)
        .ok()
        .map(|header| header.records_bytes)
}

/// What is at a block boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchScan {
    /// The header is all zeros: nothing was written here (or the write was torn before
    /// its first sector reached the disk).
    Zero,
    /// A whole valid batch. Record offsets are relative to the start of the slice; add
    /// the batch's offset. `len_padded` is where the next batch starts, relative too.
    Valid {
        records: Vec<ScannedRecord>,
        len_padded: usize,
    },
    /// Garbage, a torn write or a stale batch of another epoch.
    Invalid { reason: String },
    /// The slice is too short: `bytes` counts from its start. (May exceed what the
    /// segment holds, which makes the batch invalid; the caller knows the segment end.)
    NeedMore { bytes: usize },
}

/// Parses the batch at the start of `bytes`, which must start at a block boundary of a
/// segment with epoch `epoch`.
pub fn scan_batch(bytes: &[u8], epoch: u64) -> BatchScan {
    if bytes.len() < BATCH_HEADER_BYTES {
        return BatchScan::NeedMore {
            bytes: BATCH_HEADER_BYTES,
        };
    }
    let h = &bytes[..BATCH_HEADER_BYTES];
    if is_zero(h) {
        return BatchScan::Zero;
    }
    let header = match parse_header(h, epoch) {
        Ok(header) => header,
        Err(reason) => return BatchScan::Invalid { reason },
    };
    let end = BATCH_HEADER_BYTES + header.records_bytes;
    if bytes.len() < end {
        return BatchScan::NeedMore { bytes: end };
    }
    let area = &bytes[BATCH_HEADER_BYTES..end];
    let computed = crc32fast::hash(area);
    if computed != header.records_crc {
        let stored = header.records_crc;
        let reason = format!("records crc32 {stored:#010x} != computed {computed:#010x}");
        return BatchScan::Invalid { reason };
    }
    match decode_records(area, header.record_count) {
        Ok(records) => BatchScan::Valid {
            records,
            len_padded: end.next_multiple_of(BLOCK_BYTES),
        },
        Err(reason) => BatchScan::Invalid { reason },
    }
}

/// Decodes a records area whose crc matched. A failure here means the writer and
/// reader disagree about the format, which is still reported, never trusted.
pub(super) fn decode_records(area: &[u8], count: u32) -> Result<Vec<ScannedRecord>, String> {
    let count = count as usize;
    if count > area.len() / RECORD_FRAME_BYTES_MIN {
        return Err(format!(
            "{count} records cannot fit in {} bytes",
            area.len()
        ));
    }
    let mut records = Vec::with_capacity(count);
    let mut at = 0;
    while at < area.len() {
        let offset = BATCH_HEADER_BYTES + at;
        let (record, used) = decode_record(&area[at..])
            .map_err(|e| format!("record {} at batch offset {offset}: {e}", records.len()))?;
        records.push(ScannedRecord {
            offset: offset as u64,
            record,
        });
        at += used;
    }
    if records.len() != count {
        return Err(format!(
            "header says {count} records, area holds {}",
            records.len()
        ));
    }
    Ok(records)
}

/// The first block boundary at or after `from` in `segment` (a whole segment, or any
/// slice starting at offset 0) that holds a valid header of epoch `epoch`.
pub fn find_valid_batch_after(segment: &[u8], from: u64, epoch: u64) -> Option<u64> {
    let from = usize::try_from(from)
        .ok()?
        .checked_next_multiple_of(BLOCK_BYTES)?;
    (from..segment.len())
        .step_by(BLOCK_BYTES)
        .take_while(|at| at + BATCH_HEADER_BYTES <= segment.len())
        .find(|&at| header_is_valid(&segment[at..], epoch))
        .map(|at| at as u64)
}

/// Why [`BatchBuilder::push`] refused a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushError {
    /// The record's rkyv encoding exceeds [`RECORD_BYTES_MAX`]; no batch can hold it.
    RecordTooLarge { record_bytes: usize },
    /// The record would take the batch past [`BATCH_BYTES_MAX`]: finish this batch and
    /// push the record into a new one, where it always fits.
    BatchFull {
        batch_bytes: usize,
        record_frame_bytes: usize,
    },
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RecordTooLarge { record_bytes } => {
                write!(
                    f,
                    "record of {record_bytes} bytes exceeds {RECORD_BYTES_MAX}"
                )
            }
            Self::BatchFull {
                batch_bytes,
                record_frame_bytes,
            } => write!(
                f,
                "batch of {batch_bytes} bytes cannot take a {record_frame_bytes}-byte record \
                 (limit {BATCH_BYTES_MAX})"
            ),
        }
    }
}

impl std::error::Error for PushError {}

/// Builds one batch in memory; the shell writes [`BatchBuilder::finish`]'s bytes in one
/// write at a block-aligned offset.
///
/// Splitting: push records until `push` returns [`PushError::BatchFull`], finish and
/// write that batch, then push the refused record into a new builder (at the next
/// offset, `offset + padded_bytes_len()`). If the finished batch would not fit in the
/// rest of the segment, roll to a new segment first and call
/// [`BatchBuilder::set_epoch`]; offsets returned by `push` are relative to the batch, so
/// they stay right.
#[derive(Debug)]
pub struct BatchBuilder {
    epoch: u64,
    /// Header placeholder followed by the record frames.
    buf: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            buf: vec![0; BATCH_HEADER_BYTES],
            count: 0,
        }
    }

    /// Adds a record and returns its offset from the start of the batch.
    pub fn push(&mut self, rec: &LogRecord) -> Result<u64, PushError> {
        let bytes = serialize(rec);
        if bytes.len() > RECORD_BYTES_MAX {
            return Err(PushError::RecordTooLarge {
                record_bytes: bytes.len(),
            });
        }
        let record_frame_bytes = frame_bytes(bytes.len());
        if self.buf.len() + record_frame_bytes > BATCH_BYTES_MAX {
            let batch_bytes = self.buf.len();
            return Err(PushError::BatchFull {
                batch_bytes,
                record_frame_bytes,
            });
        }
        let offset = self.buf.len();
        write_frame(&bytes, &mut self.buf);
        self.count += 1;
        Ok(offset as u64)
    }

    /// Number of records pushed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Header plus records, before block padding.
    pub fn bytes_len(&self) -> usize {
        self.buf.len()
    }

    /// What `finish` will return: the space the batch takes in the segment.
    pub fn padded_bytes_len(&self) -> usize {
        self.buf.len().next_multiple_of(BLOCK_BYTES)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Retargets the batch to another segment (the shell rolled before writing it).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The batch bytes, padded with zeros to a multiple of [`BLOCK_BYTES`]. Panics if
    /// empty: an empty batch is a shell bug that would only waste a block.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(!self.is_empty(), "finishing an empty batch");
        let header = encode_header(self.epoch, &self.buf[BATCH_HEADER_BYTES..], self.count);
        self.buf[..BATCH_HEADER_BYTES].copy_from_slice(&header);
        let padded = self.padded_bytes_len();
        self.buf.resize(padded, 0);
        assert!(self.buf.len() <= BATCH_BYTES_MAX && self.buf.len().is_multiple_of(BLOCK_BYTES));
        // Decoding every record again would double the cost of each write, so only
        // debug builds (tests, simulator) pay for this check.
        if cfg!(debug_assertions) {
            self.check_decodes();
        }
        self.buf
    }

    fn check_decodes(&self) {
        match scan_batch(&self.buf, self.epoch) {
            BatchScan::Valid {
                records,
                len_padded,
            } => {
                assert_eq!(records.len(), self.len());
                assert_eq!(len_padded, self.buf.len());
            }
            other => panic!("a batch just built does not scan as valid: {other:?}"),
        }
    }
}
