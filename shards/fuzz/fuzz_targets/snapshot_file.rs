//! Snapshots (`shards/src/snapshot.rs`): the shard snapshot file as start-up reads it
//! (trailer, length copy, padding, checksum, rkyv body), the bare framed snapshot, the
//! group transfer a follower receives, and the segment index sidecars.
//!
//! Input: byte 0 picks the mode. Recipes (even) build valid values, check that they
//! decode to what was encoded, then damage the bytes; with bit 1 set the checksum is
//! recomputed after the damage, so the damaged body reaches rkyv's validation. Odd:
//! the rest of the input is the file as it is on disk.
#![no_main]

use arbitrary::{Result, Unstructured};
use fuzz_support::{damage, group_transfer, shard_snapshot};
use libfuzzer_sys::fuzz_target;
use shards::snapshot::{
    decode_sidecar, decode_snapshot_file, encode_sidecar, sidecar_count, GroupTransfer,
    ShardSnapshot, SIDECAR_HEADER_BYTES,
};

/// The block size start-up uses (`shards::codec::BLOCK_BYTES`) and a smaller one, so
/// that the search for the length's copy crosses block boundaries often.
const BLOCKS: [usize; 2] = [shards::codec::BLOCK_BYTES, 64];
/// Where a framed body's crc32 sits, and where the bytes it covers start.
const CRC_AT: usize = 8;
const BODY_AT: usize = 12;

fuzz_target!(|data: &[u8]| {
    let [mode, ref rest @ ..] = *data else {
        return;
    };
    let block_bytes = BLOCKS[usize::from(mode >> 2 & 1)];
    if mode & 1 == 1 {
        raw(rest, block_bytes);
        return;
    }
    let fix_crc = mode & 2 != 0;
    let mut u = Unstructured::new(rest);
    let _ = match mode >> 3 & 3 {
        0 | 1 => snapshot_file(&mut u, block_bytes, fix_crc),
        2 => transfer(&mut u, fix_crc),
        _ => sidecar(&mut u, block_bytes),
    };
});

fn raw(bytes: &[u8], block_bytes: usize) {
    if let Ok(file) = decode_snapshot_file(bytes, block_bytes) {
        // What decodes re-encodes to a file that decodes to the same snapshot.
        let again = file.snapshot.encode_file(block_bytes);
        let reread = decode_snapshot_file(&again, block_bytes).expect("re-encoded file");
        assert_eq!(reread.snapshot, file.snapshot);
        assert!(reread.notes.is_empty());
    }
    if let Ok(snapshot) = ShardSnapshot::decode(bytes) {
        assert_eq!(ShardSnapshot::decode(&snapshot.encode()), Ok(snapshot));
    }
    if let Ok(transfer) = GroupTransfer::decode(bytes) {
        assert_eq!(GroupTransfer::decode(&transfer.encode()), Ok(transfer));
    }
    let epoch = bytes
        .get(8..16)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if let Ok(offsets) = decode_sidecar(bytes, epoch) {
        assert_eq!(sidecar_count(bytes, epoch), Ok(offsets.len()));
    }
}

fn fix_checksum(bytes: &mut [u8], body_end: usize) {
    if body_end >= BODY_AT && body_end <= bytes.len() {
        let crc = crc32fast::hash(&bytes[BODY_AT..body_end]);
        bytes[CRC_AT..BODY_AT].copy_from_slice(&crc.to_le_bytes());
    }
}

fn snapshot_file(u: &mut Unstructured, block_bytes: usize, fix_crc: bool) -> Result<()> {
    let snapshot = shard_snapshot(u)?;
    let body_end = snapshot.encode().len();
    let mut file = snapshot.encode_file(block_bytes);
    let read = decode_snapshot_file(&file, block_bytes).expect("a file just written");
    assert_eq!(read.snapshot, snapshot);
    assert!(read.notes.is_empty(), "{:?}", read.notes);
    let len = file.len();
    if !damage(u, &mut file, 0..len)? {
        return Ok(());
    }
    if fix_crc {
        fix_checksum(&mut file, body_end);
    }
    if let Ok(read) = decode_snapshot_file(&file, block_bytes) {
        let again = read.snapshot.encode_file(block_bytes);
        assert_eq!(
            decode_snapshot_file(&again, block_bytes).map(|f| f.snapshot),
            Ok(read.snapshot)
        );
    }
    Ok(())
}

fn transfer(u: &mut Unstructured, fix_crc: bool) -> Result<()> {
    let transfer = group_transfer(u)?;
    let mut bytes = transfer.encode();
    assert_eq!(GroupTransfer::decode(&bytes).as_ref(), Ok(&transfer));
    let len = bytes.len();
    if !damage(u, &mut bytes, 0..len)? {
        return Ok(());
    }
    if fix_crc {
        let end = bytes.len();
        fix_checksum(&mut bytes, end);
    }
    if let Ok(decoded) = GroupTransfer::decode(&bytes) {
        assert_eq!(GroupTransfer::decode(&decoded.encode()), Ok(decoded));
    }
    Ok(())
}

fn sidecar(u: &mut Unstructured, block_bytes: usize) -> Result<()> {
    let epoch: u64 = u.arbitrary()?;
    let offsets: Vec<u32> = u.arbitrary()?;
    let mut bytes = encode_sidecar(epoch, &offsets, block_bytes);
    assert_eq!(bytes.len() % block_bytes, 0);
    assert_eq!(decode_sidecar(&bytes, epoch).as_ref(), Ok(&offsets));
    let len = bytes.len();
    if damage(u, &mut bytes, 0..len)? {
        if let Ok(decoded) = decode_sidecar(&bytes, epoch) {
            assert!(SIDECAR_HEADER_BYTES + decoded.len() * 4 <= bytes.len());
        }
    }
    Ok(())
}
