//! The HTTP/1.1 request parser (`shards::http::parse`) on raw bytes, as a client sends
//! them: the request line alone (routing of unparseable heads), the whole head, the
//! body framing it implies, and the chunked decoder fed in pieces of every size.
//!
//! Input: byte 0 picks the head limit, byte 1 the size of the reads the chunked
//! decoder is fed; the rest is what arrived on the socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shards::http::parse::{
    parse_head, parse_request_line, ChunkError, ChunkedDecoder, Framing, HeadParse,
    HEADER_FIELDS_MAX,
};

const BODY_BYTES_MAX: usize = 4096;
const TRAILER_BYTES_MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let [limit, step, ref wire @ ..] = *data else {
        return;
    };
    let head_bytes_max = 16 + usize::from(limit) * 16;
    let step = 1 + usize::from(step % 32);
    if let Some((_, path)) = parse_request_line(wire) {
        assert!(path.starts_with('/') || path == "*", "{path:?}");
    }
    if let HeadParse::Complete(head) = parse_head(wire, head_bytes_max) {
        assert!(head.len <= wire.len() && head.len <= head_bytes_max);
        assert!(head.headers.len() <= HEADER_FIELDS_MAX);
        assert!(
            head.path.starts_with('/') || head.path == "*",
            "{:?}",
            head.path
        );
        assert!(head
            .headers
            .iter()
            .all(|(name, _)| !name.bytes().any(|b| b.is_ascii_uppercase())));
        let _ = (head.keep_alive(), head.expects_continue());
        let _ = head.has_json_content_type();
        let body = &wire[head.len..];
        match head.framing(BODY_BYTES_MAX) {
            Ok(Framing::Chunked) => check_chunked(body, step),
            Ok(Framing::Length(n)) => assert!(0 < n && n <= BODY_BYTES_MAX),
            Ok(Framing::Empty) | Err(_) => {}
        }
        let request = head.into_request(body.to_vec());
        assert_eq!(request.body, body);
    }
    check_chunked(wire, step);
});

#[derive(Debug, PartialEq)]
enum Chunked {
    /// The body ended after `consumed` bytes of input.
    Done {
        body: Vec<u8>,
        consumed: usize,
    },
    /// Every byte was consumed and the body has not ended.
    Incomplete {
        body: Vec<u8>,
    },
    Failed(ChunkError),
}

/// Decoding must not depend on how the bytes were split into reads, nor on whether
/// the data is kept (a body being discarded is decoded with `out: None`).
fn check_chunked(input: &[u8], step: usize) {
    let whole = decode_in_reads(input, input.len().max(1), true);
    let pieces = decode_in_reads(input, step, true);
    assert_eq!(whole, pieces, "one read vs reads of {step} bytes");
    let dropped = decode_in_reads(input, step, false);
    match (&whole, &dropped) {
        (Chunked::Done { consumed: a, .. }, Chunked::Done { consumed: b, .. }) => {
            assert_eq!(a, b)
        }
        (Chunked::Incomplete { .. }, Chunked::Incomplete { .. }) => {}
        (Chunked::Failed(a), Chunked::Failed(b)) => assert_eq!(a, b),
        _ => panic!("kept {whole:?} but discarded {dropped:?}"),
    }
    if let Chunked::Done { body, .. } | Chunked::Incomplete { body } = &whole {
        assert!(body.len() <= BODY_BYTES_MAX);
    }
}

fn decode_in_reads(input: &[u8], step: usize, keep: bool) -> Chunked {
    let mut decoder = ChunkedDecoder::new(BODY_BYTES_MAX, TRAILER_BYTES_MAX);
    let mut body = Vec::new();
    let mut offset = 0;
    while offset < input.len() {
        let end = (offset + step).min(input.len());
        let out = keep.then_some(&mut body);
        match decoder.decode(&input[offset..end], out) {
            Err(e) => return Chunked::Failed(e),
            Ok((used, true)) => {
                return Chunked::Done {
                    body,
                    consumed: offset + used,
                }
            }
            Ok((used, false)) => {
                assert_eq!(used, end - offset, "an unfinished body consumes every byte");
                offset = end;
            }
        }
    }
    Chunked::Incomplete { body }
}
