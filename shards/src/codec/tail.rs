//! Why the last batch of a log failed its checks.
//!
//! A batch is acknowledged only once its write returned (O_DSYNC), so a batch whose
//! write a crash interrupted was never acknowledged, and dropping it breaks no promise.
//! But a last batch can also fail because its bytes changed after they were written
//! (a bit flip, a device that lost a written sector): then it may hold entries this
//! replica acknowledged and a vote it cast, and dropping it loses them. The two look
//! alike to the scan; the sectors tell them apart. Disks write whole sectors, so an
//! interrupted write leaves some sector of the batch as it was before: all zeros
//! (segments are pre-written with zeros, and a block is never written twice). A written
//! record never holds a sector's worth of zero bytes (its JSON fields cannot hold a
//! NUL byte, and the rest is a few small integers), so a records sector of zeros means
//! "never written". Every sector written and the batch still bad means damage.
//!
//! When in doubt (a device that tears inside a sector), the answer is `Damaged`: the
//! safe side, which costs only a catch-up before the replica votes again.

use super::batch::header_records_bytes;
use super::BATCH_HEADER_BYTES;

/// The unit a disk writes whole.
pub const SECTOR_BYTES: usize = 512;
/// Zero bytes at the end of the records, in their last (partly used) sector, that
/// count as "never written": a record ends with at most 7 bytes of zero padding.
const LAST_SECTOR_ZERO_BYTES_MIN: usize = 256;

/// What the failed last batch of a log was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornTail {
    /// Some sector of it was never written: a crash interrupted its write, so nothing
    /// in it was acknowledged.
    Interrupted,
    /// Every sector of it was written, yet it fails its checks: its bytes changed
    /// after they were written, and what it held may have been acknowledged.
    Damaged,
}

/// Classifies the failed batch at the start of `batch` (the bytes from its offset, a
/// block boundary, to the segment's end) of a segment with epoch `epoch`.
pub fn classify_torn_tail(batch: &[u8], epoch: u64) -> TornTail {
    let first_sector = &batch[..batch.len().min(SECTOR_BYTES)];
    let Some(records_bytes) = header_records_bytes(batch, epoch) else {
        // The header is in the first sector: zeros mean it was never written.
        return if is_zero(first_sector) {
            TornTail::Interrupted
        } else {
            TornTail::Damaged
        };
    };
    let end = BATCH_HEADER_BYTES + records_bytes;
    if end > batch.len() {
        // A header that passes its crc was written, and it never announces more than
        // the segment holds.
        return TornTail::Damaged;
    }
    // The header's sector was written (its crc holds): look at the records' others.
    let mut sector = SECTOR_BYTES;
    while sector < end {
        let upto = (sector + SECTOR_BYTES).min(end);
        let whole = upto - sector == SECTOR_BYTES;
        if (whole || upto - sector >= LAST_SECTOR_ZERO_BYTES_MIN) && is_zero(&batch[sector..upto]) {
            return TornTail::Interrupted;
        }
        sector += SECTOR_BYTES;
    }
    TornTail::Damaged
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BatchBuilder;
    use crate::entry::{Command, LogRecord, MetaRecord};

    const EPOCH: u64 = 3;

    /// A batch of `n` hard-state records, padded like the log writes it, followed by
    /// zeros as in a pre-written segment.
    fn batch(n: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new(EPOCH);
        for i in 0..n {
            b.push(&LogRecord {
                group: 1,
                term: 2,
                index: 0,
                command: Command::Meta(MetaRecord::HardState {
                    term: 2 + i,
                    vote: 1,
                    commit: i,
                }),
            })
            .unwrap();
        }
        let mut bytes = b.finish();
        bytes.resize(bytes.len() + 8192, 0);
        bytes
    }

    #[test]
    fn a_write_cut_after_its_first_sectors_was_interrupted() {
        let whole = batch(200);
        let records_end = BATCH_HEADER_BYTES + header_records_bytes(&whole, EPOCH).unwrap();
        assert!(records_end > 4 * SECTOR_BYTES, "spans several sectors");
        for written in 1..records_end / SECTOR_BYTES {
            let mut torn = whole.clone();
            torn[written * SECTOR_BYTES..].fill(0);
            assert_eq!(
                classify_torn_tail(&torn, EPOCH),
                TornTail::Interrupted,
                "{written} sectors written"
            );
        }
    }

    #[test]
    fn a_write_whose_middle_sector_is_missing_was_interrupted() {
        let mut torn = batch(200);
        torn[2 * SECTOR_BYTES..3 * SECTOR_BYTES].fill(0);
        assert_eq!(classify_torn_tail(&torn, EPOCH), TornTail::Interrupted);
    }

    #[test]
    fn a_flipped_byte_in_a_written_batch_is_damage() {
        let whole = batch(200);
        let records_end = BATCH_HEADER_BYTES + header_records_bytes(&whole, EPOCH).unwrap();
        for at in [40, SECTOR_BYTES + 7, records_end - 9] {
            let mut flipped = whole.clone();
            flipped[at] ^= 0x10;
            assert_eq!(
                classify_torn_tail(&flipped, EPOCH),
                TornTail::Damaged,
                "at {at}"
            );
        }
    }

    #[test]
    fn a_damaged_header_is_damage_and_a_missing_one_an_interrupted_write() {
        let mut flipped = batch(3);
        flipped[5] ^= 1;
        assert_eq!(classify_torn_tail(&flipped, EPOCH), TornTail::Damaged);
        let mut missing = batch(3);
        missing[..SECTOR_BYTES].fill(0);
        assert_eq!(classify_torn_tail(&missing, EPOCH), TornTail::Interrupted);
    }

    #[test]
    fn a_small_batch_in_one_sector_that_fails_is_damage() {
        let mut flipped = batch(2);
        assert!(header_records_bytes(&flipped, EPOCH).unwrap() + BATCH_HEADER_BYTES < SECTOR_BYTES);
        flipped[BATCH_HEADER_BYTES + 12] ^= 0x80;
        assert_eq!(classify_torn_tail(&flipped, EPOCH), TornTail::Damaged);
    }
}
