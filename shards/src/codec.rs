//! The on-disk format of a shard's write-ahead log and the pure recovery scan
//! (DESIGN.md, "Log storage").
//!
//! One segmented log per shard holds the entries of all its Raft groups, so one fsync
//! covers them all. A segment is a fixed-size file, pre-written with zeros, named by its
//! epoch (the segment number). The shell appends *batches* to it; this module decides
//! what the bytes mean and, after a crash, which of them to trust.
//!
//! # Record
//!
//! ```text
//! offset  size  field
//!      0     4  len: u32 LE      exact length of the rkyv bytes (1..=RECORD_BYTES_MAX)
//!      4     4  crc32: u32 LE    crc32fast of the rkyv bytes
//!      8   len  rkyv bytes of LogRecord
//!        0..7  zero padding to the next multiple of 8
//! ```
//!
//! The padding keeps every record's rkyv bytes 8-aligned within the file (batches start
//! on block boundaries and the batch header is 32 bytes), so a reader holding an aligned
//! window may find them aligned. Decoding still copies them into an aligned buffer
//! because a read window from disk carries no alignment guarantee, and it always
//! validates them (bytecheck): bytes from disk are never trusted.
//!
//! # Batch
//!
//! ```text
//! offset  size  field
//!      0     4  magic: u32 LE          BATCH_MAGIC ("SCWL")
//!      4     2  version: u16 LE        FORMAT_VERSION
//!      6     2  flags: u16 LE          0 (no flags are defined; others are refused)
//!      8     8  epoch: u64 LE          the segment's epoch; guards against stale data
//!     16     4  records_bytes: u32 LE  length of the records area
//!     20     4  record_count: u32 LE
//!     24     4  records_crc32: u32 LE  crc32fast of the records area
//!     28     4  header_crc32: u32 LE   crc32fast of bytes 0..28
//!     32     …  records, back to back
//!              zero padding to the next multiple of BLOCK_BYTES
//! ```
//!
//! The shell writes a batch in ONE write at a block-aligned offset, so a block holding
//! acknowledged records is never rewritten, and the next batch starts at the next block.
//!
//! # Recovery
//!
//! [`scan_segment`] (or the windowed [`SegmentScanner`]) walks the batches of one
//! segment; [`classify_log`] decides across segments. A bad batch with nothing valid
//! after it is a torn tail and is dropped; a bad batch followed by a valid one is
//! corruption and start-up must stop. This relies on one rule the shell must keep:
//! **the write of batch k+1 is issued only after the fdatasync covering batch k has
//! returned**, and a segment is rolled only after everything in it is fsynced.
//! Otherwise a crash could persist a later batch without an earlier one, and the scan
//! would (rightly, from what it can see) report corruption.
//!
//! # Verification
//!
//! [`SegmentVerifier`] (the scrubber's) walks a sealed segment to its end and, unlike
//! the recovery scan, goes on after damage: it reports every record whose crc32 holds
//! and every span of bytes that cannot be trusted, so the shell can tell which events
//! need repair.

mod batch;
mod bounds;
mod record;
mod scan;
mod tail;
mod verify;

pub use batch::{
    find_valid_batch_after, scan_batch, BatchBuilder, BatchScan, PushError, BATCH_MAGIC,
    FORMAT_VERSION,
};
pub use bounds::{
    append_body_bytes_max, append_record_bytes_max, record_bytes_max_in, single_record_batch_bytes,
    BATCH_EVENTS_MAX,
};
pub use record::{
    decode_record, encode_record, read_record_at, record_crc, record_frame_bytes, DecodeError,
};
pub use scan::{
    classify_log, scan_segment, scan_segment_from, LogError, ReadRequest, ScanOutcome,
    ScannedRecord, SegmentScan, SegmentScanner, SegmentSummary,
};
pub use tail::{classify_torn_tail, TornTail, SECTOR_BYTES};
pub use verify::{verify_segment, DamagedSpan, SegmentVerifier, VerifiedRecord};

/// Batches start at multiples of this and are padded with zeros to a multiple of it.
pub const BLOCK_BYTES: usize = 4096;

/// Size of a batch header.
pub const BATCH_HEADER_BYTES: usize = 32;

/// Size of a record's frame header (`len` + `crc32`).
pub const RECORD_HEADER_BYTES: usize = 8;

/// Largest rkyv encoding of one record. Requests are limited far below this (API.md:
/// 1 MiB bodies by default); the limit bounds what a reader allocates for a length
/// read from disk.
pub const RECORD_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Largest batch (header + records, before block padding). A multiple of
/// [`BLOCK_BYTES`], so padding never takes a batch past it either.
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Record bytes (and so records) are padded to multiples of this.
const RECORD_ALIGN_BYTES: usize = 8;

// A single record of the largest size must fit in an empty batch, so a shell that
// starts a new batch after `PushError::BatchFull` can always place the record.
const _: () =
    assert!(BATCH_HEADER_BYTES + RECORD_HEADER_BYTES + RECORD_BYTES_MAX <= BATCH_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(BATCH_HEADER_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
const _: () = assert!(RECORD_BYTES_MAX.is_multiple_of(RECORD_ALIGN_BYTES));
