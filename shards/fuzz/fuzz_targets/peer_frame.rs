//! Node-to-node traffic: the frames of the wire (`shards/src/wire.rs`: length, crc32,
//! payload; the handshake) and the peer payloads inside them (`shards/src/peer.rs`:
//! Raft messages, coalesced heartbeats, forwarded requests and replies).
//!
//! Input: byte 0 picks the mode.
//! - 0: a recipe: a valid frame is encoded, must decode to itself, then its rkyv bytes
//!   are damaged (the trailer is kept right, so the damage reaches validation).
//! - 1: the rest is a payload whose trailer (length, format) is appended by the target.
//! - otherwise: the rest is a byte stream from a peer: frames are cut from it as the
//!   connection does, and each payload is decoded, the first also as a handshake.
#![no_main]

use arbitrary::{Result, Unstructured};
use fuzz_support::{damage, peer_frame};
use libfuzzer_sys::fuzz_target;
use shards::peer::{self, PeerFrame, PEER_FORMAT, PEER_TRAILER_BYTES};
use shards::wire::{decode_frame, Handshake};

fuzz_target!(|data: &[u8]| {
    let [mode, ref rest @ ..] = *data else {
        return;
    };
    match mode {
        0 => {
            let _ = recipe(&mut Unstructured::new(rest));
        }
        1 => {
            decode_payload(&with_trailer(rest.to_vec()));
        }
        _ => stream(rest),
    }
});

fn with_trailer(mut archive: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(archive.len()).expect("fuzz inputs are small");
    archive.extend_from_slice(&len.to_le_bytes());
    archive.push(PEER_FORMAT);
    archive
}

/// A payload that decodes re-encodes to one that decodes to the same frame.
fn decode_payload(payload: &[u8]) -> Option<PeerFrame> {
    let frame = peer::decode(payload).ok()?;
    assert_eq!(peer::decode(&peer::encode(&frame)).as_ref(), Ok(&frame));
    Some(frame)
}

fn recipe(u: &mut Unstructured) -> Result<()> {
    let frame = peer_frame(u)?;
    let payload = peer::encode(&frame);
    assert_eq!(peer::decode(&payload).as_ref(), Ok(&frame));
    let mut archive = payload[..payload.len() - PEER_TRAILER_BYTES].to_vec();
    let len = archive.len();
    if damage(u, &mut archive, 0..len)? {
        decode_payload(&with_trailer(archive));
    }
    Ok(())
}

fn stream(mut bytes: &[u8]) {
    let mut first = true;
    while let Ok(Some((payload, used))) = decode_frame(bytes) {
        assert!(used > payload.len() && used <= bytes.len());
        if first {
            if let Ok(handshake) = Handshake::decode(payload) {
                assert_eq!(Handshake::decode(&handshake.encode()), Ok(handshake));
            }
            first = false;
        }
        decode_payload(payload);
        bytes = &bytes[used..];
    }
}
