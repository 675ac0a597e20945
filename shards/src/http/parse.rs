//! Request heads, body framing and chunked decoding: pure functions over bytes, so
//! every framing rule is testable without a socket (and fuzzed: `shards/fuzz`, target
//! `http_request`).

use super::{Method, Request};

/// More header fields than this is treated like an oversized head (431): httparse
/// needs a fixed slot array, and no client of this API sends anywhere near as many.
pub const HEADER_FIELDS_MAX: usize = 100;

/// A chunk-size line (size plus extensions) longer than this is malformed. It bounds
/// the work a client can cause with endless leading zeros or extensions.
const CHUNK_LINE_BYTES_MAX: usize = 4096;

/// A parsed request head. The body has not been looked at.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head in the buffer, including the empty line.
    pub len: usize,
}

#[derive(Debug)]
pub enum HeadParse {
    Complete(Head),
    Partial,
    Invalid(&'static str),
    TooLarge,
}

/// Parses the head at the start of `buf`. A head longer than `max_bytes`, or with more
/// than [`HEADER_FIELDS_MAX`] fields, is `TooLarge` whether or not it is complete.
pub fn parse_head(buf: &[u8], max_bytes: usize) -> HeadParse {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_FIELDS_MAX];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
        Ok(httparse::Status::Complete(_)) => return HeadParse::TooLarge,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => return HeadParse::TooLarge,
        Ok(httparse::Status::Partial) => return HeadParse::Partial,
        Err(httparse::Error::TooManyHeaders) => return HeadParse::TooLarge,
        Err(_) => return HeadParse::Invalid("malformed request head"),
    };
    // httparse fills every field of a complete request.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return HeadParse::Invalid("malformed request line");
    };
    let Some((path, query)) = split_target(target) else {
        return HeadParse::Invalid("unsupported request target");
    };
    let headers = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    HeadParse::Complete(Head {
        method: Method::from_token(method),
        path: path.to_owned(),
        query: query.to_owned(),
        minor_version,
        headers,
        len,
    })
}

/// Reads only the request line, for heads that cannot be parsed whole (too large or
/// malformed further down): routing decides first, so such a request to an unknown
/// path still gets 404. Returns the method and the raw path.
pub fn parse_request_line(buf: &[u8]) -> Option<(Method, String)> {
    // Like httparse, skip the empty lines a client may send before a request.
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = &buf[start..];
    let end = rest.iter().position(|&b| b == b'\n')?;
    let line = rest[..end].strip_suffix(b"\r")?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if parts.next().is_some() || !token(method) || !version.starts_with("HTTP/1.") {
        return None;
    }
    let (path, _) = split_target(target)?;
    Some((Method::from_token(method), path.to_owned()))
}

/// Splits a request target into raw path and raw query. Accepts origin-form
/// (`/p?q`), absolute-form (`http://host/p?q`, which RFC 9112 §3.2.2 requires servers
/// to accept) and asterisk-form (`*`, meaningful only for OPTIONS).
fn split_target(target: &str) -> Option<(&str, &str)> {
    let target = target.split('#').next().unwrap_or(target);
    let origin = if target.starts_with('/') || target == "*" {
        target
    } else {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let scheme_len = if lower.starts_with("http://") {
            7
        } else if lower.starts_with("https://") {
            8
        } else {
            return None;
        };
        let rest = &target[scheme_len..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        &rest[authority_end..]
    };
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    Some((if path.is_empty() { "/" } else { path }, query))
}

/// How the body of a request is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// 400 `bad_request` with this message.
    Bad(&'static str),
    /// 413 `payload_too_large`.
    TooLarge,
}

impl Head {
    /// The first header called `name` (a lowercase name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// All comma-separated tokens of every `name` header, trimmed, in order.
    fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
    }

    /// HTTP/1.1 keeps the connection unless the client says `close`; HTTP/1.0 closes
    /// unless it says `keep-alive` (RFC 9112 §9.3).
    pub fn keep_alive(&self) -> bool {
        let has = |token: &str| {
            self.tokens("connection")
                .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
        };
        if has("close") {
            return false;
        }
        self.minor_version >= 1 || has("keep-alive")
    }

    /// RFC 9110 §10.1.1: a 100 response is never sent to an HTTP/1.0 client.
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1
            && self
                .header("expect")
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
    }

    /// `application/json`, any case, parameters such as `charset` allowed.
    pub fn has_json_content_type(&self) -> bool {
        let Some(value) = self.header("content-type") else {
            return false;
        };
        let media_type = value.split(|&b| b == b';').next().unwrap_or(value);
        media_type
            .trim_ascii()
            .eq_ignore_ascii_case(b"application/json")
    }

    /// No `Content-Encoding`, or only `identity` (any case): the body is as sent.
    pub fn has_identity_content_encoding(&self) -> bool {
        self.tokens("content-encoding")
            .all(|coding| coding.eq_ignore_ascii_case(b"identity"))
    }

    /// Decides the body framing from the headers alone, before reading any of it, so
    /// an oversized Content-Length is refused without receiving the body.
    pub fn framing(&self, body_bytes_max: usize) -> Result<Framing, FramingError> {
        let has_te = self.headers.iter().any(|(n, _)| n == "transfer-encoding");
        let has_cl = self.headers.iter().any(|(n, _)| n == "content-length");
        if has_te && has_cl {
            // RFC 9112 §6.1: a classic request-smuggling vector; refuse it outright.
            return Err(FramingError::Bad(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if has_te {
            let mut codings = self.tokens("transfer-encoding");
            return match (codings.next(), codings.next()) {
                (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
                _ => Err(FramingError::Bad("unsupported transfer coding")),
            };
        }
        let mut length = None;
        for (_, value) in self.headers.iter().filter(|(n, _)| n == "content-length") {
            let parsed = parse_content_length(value)?;
            // Repeated fields are fine only when they agree (RFC 9112 §6.3 item 5).
            if length.is_some_and(|l| l != parsed) {
                return Err(FramingError::Bad("conflicting Content-Length"));
            }
            length = Some(parsed);
        }
        match length {
            None | Some(0) => Ok(Framing::Empty),
            Some(n) if n > body_bytes_max as u64 => Err(FramingError::TooLarge),
            Some(n) => Ok(Framing::Length(n as usize)),
        }
    }

    pub fn into_request(self, body: Vec<u8>) -> Request {
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            headers: self.headers,
            body,
        }
    }
}

/// `1*DIGIT` and nothing else. A value too big for u64 saturates: it is a well-formed
/// length that is simply too large (413), not a syntax error.
fn parse_content_length(value: &[u8]) -> Result<u64, FramingError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(FramingError::Bad("invalid Content-Length"));
    }
    Ok(digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// 400 `bad_request` with this message.
    Bad(&'static str),
    /// 413: the chunks add up to more than the body limit.
    TooLarge,
    /// 431: the trailer section is larger than the header limit.
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size; `digits` counts them, the value is in `chunk_size`.
    Size {
        digits: usize,
    },
    /// Whitespace after the size, before `;` or CRLF.
    SizeSpace,
    /// Inside chunk extensions, which are ignored.
    Extension,
    SizeLf,
    Data {
        remaining: usize,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1). It is fed
/// whatever bytes have arrived and keeps its place between calls, so the connection
/// buffer never has to hold more than one read. Line endings must be CRLF.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// The size of the chunk whose size line is being read.
    chunk_size: usize,
    body_bytes: usize,
    body_bytes_max: usize,
    /// Bytes of the current chunk-size line.
    line_bytes: usize,
    trailer_bytes: usize,
    trailer_bytes_max: usize,
}

impl ChunkedDecoder {
    pub fn new(body_bytes_max: usize, trailer_bytes_max: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::Size { digits: 0 },
            chunk_size: 0,
            body_bytes: 0,
            body_bytes_max,
            line_bytes: 0,
            trailer_bytes: 0,
            trailer_bytes_max,
        }
    }

    /// Consumes bytes of `input` and appends chunk data to `out` (or drops it when
    /// `out` is None). Returns how many bytes were consumed and whether the body is
    /// complete; until it is, every byte of `input` is consumed.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<(usize, bool), ChunkError> {
        let mut pos = 0;
        while pos < input.len() && self.state != ChunkState::Done {
            if let ChunkState::Data { remaining } = self.state {
                let take = remaining.min(input.len() - pos);
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&input[pos..pos + take]);
                }
                pos += take;
                self.state = match remaining - take {
                    0 => ChunkState::DataCr,
                    remaining => ChunkState::Data { remaining },
                };
                continue;
            }
            self.state = self.step(input[pos])?;
            pos += 1;
        }
        Ok((pos, self.state == ChunkState::Done))
    }

    /// One byte outside chunk data.
    fn step(&mut self, byte: u8) -> Result<ChunkState, ChunkError> {
        use ChunkState::*;
        let bad = |why| Err(ChunkError::Bad(why));
        match self.state {
            Size { .. } | SizeSpace | Extension | SizeLf => self.count_line_byte()?,
            TrailerStart | TrailerLine | TrailerLf | FinalLf => self.count_trailer_byte()?,
            Data { .. } | DataCr | DataLf | Done => {}
        }
        match (self.state, byte) {
            (Size { digits }, b) if b.is_ascii_hexdigit() => self.size_digit(digits, b),
            (Size { digits: 0, .. }, _) => bad("invalid chunk size"),
            (Size { .. } | SizeSpace, b' ' | b'\t') => Ok(SizeSpace),
            (Size { .. } | SizeSpace, b';') => Ok(Extension),
            (Size { .. } | SizeSpace | Extension, b'\r') => Ok(SizeLf),
            (Size { .. } | SizeSpace, _) => bad("invalid chunk size"),
            (Extension, b'\n') => bad("bare LF in chunk extension"),
            (Extension, _) => Ok(Extension),
            (SizeLf, b'\n') => Ok(self.end_size_line()),
            (DataCr, b'\r') => Ok(DataLf),
            (DataLf, b'\n') => Ok(Size { digits: 0 }),
            (TrailerStart, b'\r') => Ok(FinalLf),
            (TrailerStart | TrailerLine, b'\n') => bad("bare LF in trailer"),
            (TrailerLine, b'\r') => Ok(TrailerLf),
            (TrailerStart | TrailerLine, _) => Ok(TrailerLine),
            (TrailerLf, b'\n') => Ok(TrailerStart),
            (FinalLf, b'\n') => Ok(Done),
            (SizeLf | DataCr | DataLf | TrailerLf | FinalLf, _) => {
                bad("chunk line must end in CRLF")
            }
            (Data { .. } | Done, _) => unreachable!("decode handles data and stops when done"),
        }
    }

    fn size_digit(&mut self, digits: usize, b: u8) -> Result<ChunkState, ChunkError> {
        let digit = (b as char)
            .to_digit(16)
            .expect("caller checked is_ascii_hexdigit") as usize;
        let size = if digits == 0 { 0 } else { self.chunk_size };
        self.chunk_size = size.saturating_mul(16).saturating_add(digit);
        // Refuse as soon as the declared size passes the limit, before any data.
        if self.body_bytes.saturating_add(self.chunk_size) > self.body_bytes_max {
            return Err(ChunkError::TooLarge);
        }
        Ok(ChunkState::Size { digits: digits + 1 })
    }

    fn end_size_line(&mut self) -> ChunkState {
        self.line_bytes = 0;
        let size = self.chunk_size;
        if size == 0 {
            return ChunkState::TrailerStart;
        }
        self.body_bytes += size;
        ChunkState::Data { remaining: size }
    }

    fn count_line_byte(&mut self) -> Result<(), ChunkError> {
        self.line_bytes += 1;
        if self.line_bytes > CHUNK_LINE_BYTES_MAX {
            return Err(ChunkError::Bad("chunk size line too long"));
        }
        Ok(())
    }

    fn count_trailer_byte(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > self.trailer_bytes_max {
            return Err(ChunkError::TrailersTooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn head(text: &str) -> Head {
        match parse_head(text.as_bytes(), 16 * 1024) {
            HeadParse::Complete(head) => head,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn head_splits_path_and_query_and_lowercases_names() {
        let h = head("GET /v1/sessions?limit=2&x=%20 HTTP/1.1\r\nX-Thing: A b\r\n\r\n");
        assert_eq!(
            (h.method, h.path.as_str(), h.query.as_str()),
            (Method::Get, "/v1/sessions", "limit=2&x=%20")
        );
        assert_eq!(h.headers, vec![("x-thing".to_owned(), b"A b".to_vec())]);
        assert_eq!(h.minor_version, 1);
    }

    #[test]
    fn absolute_form_target_is_reduced_to_path_and_query() {
        assert_eq!(
            split_target("http://example.com:4000/a/b?c=d"),
            Some(("/a/b", "c=d"))
        );
        assert_eq!(split_target("HTTPS://example.com"), Some(("/", "")));
        assert_eq!(split_target("http://h?q"), Some(("/", "q")));
        assert_eq!(split_target("*"), Some(("*", "")));
        assert_eq!(split_target("relative/path"), None);
    }

    #[test]
    fn head_limits_give_too_large() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert!(matches!(
            parse_head(big.as_bytes(), 64),
            HeadParse::TooLarge
        ));
        assert!(matches!(
            parse_head(&big.as_bytes()[..80], 64),
            HeadParse::TooLarge
        ));
        assert!(matches!(
            parse_head(&big.as_bytes()[..40], 64),
            HeadParse::Partial
        ));
        let many: String = (0..=HEADER_FIELDS_MAX)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_head(many.as_bytes(), 1 << 20),
            HeadParse::TooLarge
        ));
    }

    #[test]
    fn request_line_alone_can_be_routed() {
        let line = b"\r\nPOST /v1/x?y HTTP/1.1\r\nX: ";
        assert_eq!(
            parse_request_line(line),
            Some((Method::Post, "/v1/x".to_owned()))
        );
        assert_eq!(
            parse_request_line(b"POST /v1/x HTTP/1.1"),
            None,
            "line not complete"
        );
        assert_eq!(parse_request_line(b"\x16\x03 / HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"GET  / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn framing_rules() {
        let f = |extra: &str| head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")).framing(100);
        assert_eq!(f(""), Ok(Framing::Empty));
        assert_eq!(f("Content-Length: 0\r\n"), Ok(Framing::Empty));
        assert_eq!(f("Content-Length: 100\r\n"), Ok(Framing::Length(100)));
        assert_eq!(f("Content-Length: 101\r\n"), Err(FramingError::TooLarge));
        assert_eq!(
            f("Content-Length: 99999999999999999999999\r\n"),
            Err(FramingError::TooLarge)
        );
        assert_eq!(
            f("Content-Length: 7\r\ncontent-length: 7\r\n"),
            Ok(Framing::Length(7))
        );
        assert!(matches!(
            f("Content-Length: 7\r\nContent-Length: 8\r\n"),
            Err(FramingError::Bad(_))
        ));
        assert!(matches!(
            f("Content-Length: +7\r\n"),
            Err(FramingError::Bad(_))
        ));
        assert!(matches!(
            f("Content-Length: \r\n"),
            Err(FramingError::Bad(_))
        ));
        assert_eq!(f("Transfer-Encoding: Chunked\r\n"), Ok(Framing::Chunked));
        assert!(matches!(
            f("Transfer-Encoding: chunked, chunked\r\n"),
            Err(FramingError::Bad(_))
        ));
        assert!(matches!(
            f("Transfer-Encoding: identity\r\n"),
            Err(FramingError::Bad(_))
        ));
        assert!(matches!(
            f("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            Err(FramingError::Bad(_))
        ));
    }

    #[test]
    fn connection_and_expect_rules() {
        assert!(head("GET / HTTP/1.1\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
        assert!(head("POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").expects_continue());
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expects_continue());
    }

    #[test]
    fn json_content_type_rules() {
        let ct = |v: &str| {
            head(&format!("POST / HTTP/1.1\r\nContent-Type: {v}\r\n\r\n")).has_json_content_type()
        };
        assert!(ct("application/json"));
        assert!(ct("APPLICATION/Json ; charset=UTF-8"));
        assert!(!ct("application/jsonx"));
        assert!(!ct("text/plain"));
        assert!(!head("POST / HTTP/1.1\r\n\r\n").has_json_content_type());
    }

    #[test]
    fn content_encoding_rules() {
        let identity = |extra: &str| {
            head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")).has_identity_content_encoding()
        };
        assert!(identity(""));
        assert!(identity("Content-Encoding: Identity\r\n"));
        assert!(identity("Content-Encoding: \r\n"));
        assert!(!identity("Content-Encoding: gzip\r\n"));
        assert!(!identity("Content-Encoding: identity, br\r\n"));
        assert!(!identity(
            "Content-Encoding: identity\r\nContent-Encoding: deflate\r\n"
        ));
    }

    /// Feeds `input` in pieces of `step` bytes, as reads would deliver it.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
        max: usize,
    ) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::new(max, 64);
        let mut body = Vec::new();
        let mut offset = 0;
        while offset < input.len() {
            let end = (offset + step).min(input.len());
            let (used, done) = decoder.decode(&input[offset..end], Some(&mut body))?;
            offset += used;
            if done {
                return Ok((body, offset));
            }
            assert_eq!(offset, end, "everything is consumed until the body ends");
        }
        Err(ChunkError::Bad("incomplete"))
    }

    #[test]
    fn chunked_decoding_is_independent_of_read_boundaries() {
        let input =
            b"5;a=b\r\nhello\r\n1 \r\n \r\nA\r\n0123456789\r\n0\r\nT: 1\r\nU: 2\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (body, used) = decode_in_steps(input, step, 1000).unwrap();
            assert_eq!(body, b"hello 0123456789");
            assert_eq!(&input[used..], b"NEXT", "step {step}");
        }
    }

    #[test]
    fn chunked_decoding_rejects_bad_syntax() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"2\r\nabc\r\n",
            b"1;\n",
            b"0\r\nT\n",
        ] {
            assert!(
                matches!(decode_in_steps(bad, 3, 100), Err(ChunkError::Bad(_))),
                "{bad:?}"
            );
        }
        let long_line = format!("1{}\r\n", " ".repeat(CHUNK_LINE_BYTES_MAX));
        assert!(matches!(
            decode_in_steps(long_line.as_bytes(), 512, 100),
            Err(ChunkError::Bad(_))
        ));
    }

    #[test]
    fn chunked_limits() {
        assert_eq!(
            decode_in_steps(b"65\r\n", 10, 100),
            Err(ChunkError::TooLarge)
        );
        assert_eq!(
            decode_in_steps(b"ffffffffffffffffffffff\r\n", 10, 100),
            Err(ChunkError::TooLarge)
        );
        assert_eq!(
            decode_in_steps(b"32\r\n", 10, 100).unwrap_err(),
            ChunkError::Bad("incomplete")
        );
        let two = format!("32\r\n{}\r\n33\r\n", "x".repeat(50));
        assert_eq!(
            decode_in_steps(two.as_bytes(), 7, 100),
            Err(ChunkError::TooLarge)
        );
        let trailers = format!("0\r\nT: {}\r\n\r\n", "x".repeat(100));
        assert_eq!(
            decode_in_steps(trailers.as_bytes(), 7, 100),
            Err(ChunkError::TrailersTooLarge)
        );
    }

    /// Mutated copies of valid requests: whatever the bytes, parsing returns a verdict.
    #[test]
    fn malformed_input_never_panics() {
        let seeds: [&[u8]; 2] = [
            b"POST /v1/sessions?x=1 HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
            b"5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut bytes = seeds[round % 2].to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if let HeadParse::Complete(h) = parse_head(&bytes, 1024) {
                let _ = (h.framing(100), h.keep_alive(), h.has_json_content_type());
            }
            let _ = parse_request_line(&bytes);
            let _ = decode_in_steps(&bytes, 1 + (next() as usize) % 8, 100);
        }
    }
}
