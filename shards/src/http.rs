//! What the HTTP/1.1 server decides from the bytes a client sends, before any socket or
//! timer is involved: the request head, the body framing, chunked decoding
//! ([`parse`]) and query strings ([`query`]). The connection loop that reads, writes
//! and times out is the shell's (`src/http/`).
//!
//! These are here rather than in the shell so that the fuzz targets of `shards/fuzz`
//! (`http_request`, `query_string`) build without the shell's dependencies (glommio,
//! postgres): that instrumented build is most of what fuzzing costs CI.

pub mod parse;
pub mod query;

/// A request method. Methods are case-sensitive tokens (RFC 9110 §9.1), so `get` is
/// `Other("get")`, not `Get`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Patch,
    Put,
    Delete,
    Head,
    Options,
    Other(String),
}

impl Method {
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PATCH" => Method::Patch,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Other(token) => token,
        }
    }
}

/// A request whose framing, size and media type have already been checked.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The raw path of the request target, still percent-encoded, without the query.
    pub path: String,
    /// The raw query string, without the leading `?` (empty when there is none).
    pub query: String,
    /// Header names are lowercased; values are the raw bytes, in received order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The decoded body (chunked framing removed), at most `max_body_bytes`.
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}
