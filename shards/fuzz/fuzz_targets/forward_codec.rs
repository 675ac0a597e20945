//! The forwarded request codec (`shards::forward`): the bytes of a forwarded `Op` and of
//! its `Reply`, as a peer sends them inside a `PeerFrame::Request` / `Response`.
//!
//! Input: byte 0 even = decode the rest as an op, odd = as a reply. Whatever decodes
//! must encode again, and decode from that to the same value (compared through
//! `Debug`: the ops carry no `PartialEq`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shards::forward::{decode_op, decode_reply, encode_op, encode_reply};

/// Forwarded replies never carry the per-node statistics, so any payload type will do.
type Reply = shards::ops::Reply<()>;

fuzz_target!(|data: &[u8]| {
    let [mode, ref bytes @ ..] = *data else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(op) = decode_op(bytes) {
            let again = encode_op(&op).expect("a decoded op encodes");
            let reread = decode_op(&again).expect("a re-encoded op decodes");
            assert_eq!(format!("{reread:?}"), format!("{op:?}"));
        }
    } else if let Ok(reply) = decode_reply::<()>(bytes) {
        let again = encode_reply(&reply).expect("a decoded reply encodes");
        let reread: Reply = decode_reply(&again).expect("a re-encoded reply decodes");
        assert_eq!(format!("{reread:?}"), format!("{reply:?}"));
    }
});
