//! One record: `len: u32 LE` + `crc32: u32 LE` + rkyv bytes of [`LogRecord`] + zero
//! padding to a multiple of 8 (layout in the parent module).

use std::fmt;

use rkyv::util::AlignedVec;

use super::{RECORD_ALIGN_BYTES, RECORD_BYTES_MAX, RECORD_HEADER_BYTES};
use crate::entry::LogRecord;

/// Why bytes are not a record. Every variant carries the offending values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the frame needs: `needed` counts from the record's start.
    Truncated {
        needed: usize,
        available: usize,
    },
    /// `len` is zero or above [`RECORD_BYTES_MAX`].
    LengthOutOfRange {
        len: u32,
    },
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
    /// A padding byte after the rkyv bytes is not zero.
    PaddingNotZero {
        at: usize,
    },
    /// The bytes match their crc but are not a valid archived `LogRecord`.
    Invalid {
        reason: String,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(
                    f,
                    "record truncated: needs {needed} bytes, {available} available"
                )
            }
            Self::LengthOutOfRange { len } => {
                write!(f, "record length {len} outside 1..={RECORD_BYTES_MAX}")
            }
            Self::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "record crc32 {stored:#010x} != computed {computed:#010x}"
                )
            }
            Self::PaddingNotZero { at } => write!(f, "record padding byte {at} is not zero"),
            Self::Invalid { reason } => write!(f, "record bytes invalid: {reason}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Serializes `rec` to rkyv bytes. Serializing owned strings and integers into a
/// growable buffer cannot fail, so a failure is a bug worth a panic.
pub(super) fn serialize(rec: &LogRecord) -> AlignedVec {
    match rkyv::to_bytes::<rkyv::rancor::Error>(rec) {
        Ok(bytes) => bytes,
        Err(e) => panic!("rkyv serialization of a LogRecord failed: {e}"),
    }
}

/// Size of the whole frame (header, rkyv bytes, padding) for `rkyv_len` rkyv bytes.
pub(super) fn frame_bytes(rkyv_len: usize) -> usize {
    RECORD_HEADER_BYTES + rkyv_len.next_multiple_of(RECORD_ALIGN_BYTES)
}

/// Appends the frame of already serialized rkyv bytes to `out`.
pub(super) fn write_frame(rkyv_bytes: &[u8], out: &mut Vec<u8>) {
    assert!(
        !rkyv_bytes.is_empty() && rkyv_bytes.len() <= RECORD_BYTES_MAX,
        "record of {} rkyv bytes outside 1..={RECORD_BYTES_MAX}",
        rkyv_bytes.len()
    );
    let start = out.len();
    out.extend_from_slice(&(rkyv_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(rkyv_bytes).to_le_bytes());
    out.extend_from_slice(rkyv_bytes);
    out.resize(start + frame_bytes(rkyv_bytes.len()), 0);
}

/// Appends the frame of `rec` to `out`.
///
/// Panics if the record's rkyv encoding exceeds [`RECORD_BYTES_MAX`]: callers bound
/// request sizes well below it. [`super::BatchBuilder::push`] reports it as an error
/// instead. Debug builds decode the frame again and compare; release builds skip that
/// second pass because it would double the cost of every append.
pub fn encode_record(rec: &LogRecord, out: &mut Vec<u8>) {
    let start = out.len();
    write_frame(&serialize(rec), out);
    if cfg!(debug_assertions) {
        let (decoded, consumed) = decode_record(&out[start..]).expect("re-decode record");
        assert_eq!(consumed, out.len() - start);
        assert_eq!(&decoded, rec);
    }
}

/// The crc32 a record's frame carries: of its rkyv bytes. Two records with the same
/// crc32 are (but for a 2^-32 chance) the same bytes, which is how a copy fetched from
/// another replica is recognised as the original of a damaged record.
pub fn record_crc(rec: &LogRecord) -> u32 {
    crc32fast::hash(&serialize(rec))
}

/// Decodes the record at the start of `bytes` (more bytes may follow) and returns it with
/// the number of bytes its frame occupies, padding included.
pub fn decode_record(bytes: &[u8]) -> Result<(LogRecord, usize), DecodeError> {
    let len = record_frame_bytes(bytes)?;
    if bytes.len() < len {
        return Err(DecodeError::Truncated {
            needed: len,
            available: bytes.len(),
        });
    }
    let rkyv_len = read_u32(bytes, 0) as usize;
    let rkyv_end = RECORD_HEADER_BYTES + rkyv_len;
    let body = &bytes[RECORD_HEADER_BYTES..rkyv_end];
    let stored = read_u32(bytes, 4);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(DecodeError::CrcMismatch { stored, computed });
    }
    if let Some(i) = bytes[rkyv_end..len].iter().position(|&b| b != 0) {
        return Err(DecodeError::PaddingNotZero { at: rkyv_end + i });
    }
    Ok((deserialize(body)?, len))
}

/// Reads the record that starts at the first byte of `window`, a slice the shell read
/// from a segment at the record's absolute offset (as returned by
/// [`super::BatchBuilder::push`] plus the batch offset, or by the scan). The window may
/// be longer than the record; if it is shorter, the error says how many bytes to read.
pub fn read_record_at(window: &[u8]) -> Result<(LogRecord, usize), DecodeError> {
    decode_record(window)
}

/// The size of the frame starting at `bytes`, from its first
/// [`RECORD_HEADER_BYTES`] alone, so the shell can read a record in two steps.
pub fn record_frame_bytes(bytes: &[u8]) -> Result<usize, DecodeError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            needed: RECORD_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let len = read_u32(bytes, 0);
    if len == 0 || len as usize > RECORD_BYTES_MAX {
        return Err(DecodeError::LengthOutOfRange { len });
    }
    Ok(frame_bytes(len as usize))
}

/// Validates and deserializes rkyv bytes. They are copied into an aligned buffer first:
/// a window read from disk has no alignment guarantee, and rkyv refuses (rather than
/// misreads) unaligned data.
fn deserialize(body: &[u8]) -> Result<LogRecord, DecodeError> {
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<LogRecord, rkyv::rancor::Error>(&aligned).map_err(|e| DecodeError::Invalid {
        reason: e.to_string(),
    })
}

/// Reads a little-endian u32 at `at`; the caller has checked the bounds.
pub(super) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
