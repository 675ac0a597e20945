//! HTTP/1.1 server for the public API, written for this project on `httparse`.
//!
//! One connection is one local task on one glommio executor: no `Send`, no locks.
//! The module is split so that the decisions stay testable without sockets:
//!
//! - `shards::http::parse`: request heads, body framing, chunked decoding. Pure
//!   functions over bytes, in the core crate with the query-string decoding
//!   (`shards::http::query`).
//! - `response`: the [`Response`] type and its encoding onto the wire.
//! - `shutdown`: the [`Shutdown`] signal shared by every connection of a shard.
//! - `conn`: [`serve_connection`], the shell that moves bytes, applies the timeouts and
//!   enforces the order of checks of `API.md` ("General HTTP behaviour"):
//!   unknown route 404 → 405 → framing (400 / 431 / 413) → 415 → [`Service::handle`],
//!   and bounds what a connection holds: one request's head and body, one unsent
//!   response.
//!
//! The [`Service`] owns everything after that: JSON parsing, field rules, the domain.

mod conn;
mod response;
mod shutdown;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use conn::serve_connection;

/// The bytes of `response` as the last one of its connection (`Connection: close`),
/// for an answer written outside a connection's task (one refused at accept).
pub fn encode_last(response: &Response) -> Vec<u8> {
    let wire = response::Wire {
        close: true,
        ..Default::default()
    };
    response::encode(response, wire)
}
pub use response::Response;
pub use shards::http::{Method, Request};
pub use shutdown::Shutdown;

/// The answer of [`Service::route`]: routing happens before the body is read, so that
/// 404 and 405 win over every framing error as `API.md` demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch<R> {
    Found(R),
    NotFound,
    /// The path exists under other methods; `allow` becomes the `Allow` header.
    MethodNotAllowed {
        allow: &'static str,
    },
}

/// Takes over a connection after a `101 Switching Protocols` answer. The bytes are
/// those the client sent after the request head (already read from the socket).
pub type UpgradeFn =
    Box<dyn FnOnce(glommio::net::TcpStream, Vec<u8>) -> Pin<Box<dyn Future<Output = ()>>>>;

pub enum Outcome {
    Respond(Response),
    /// `response` is written as is (plus CORS and Date), without `Content-Length`; it
    /// should be a 101 carrying `Connection: Upgrade` and `Upgrade`.
    Upgrade {
        response: Response,
        then: UpgradeFn,
    },
}

/// What the API layer plugs into the connection loop.
pub trait Service: 'static {
    type Route;
    /// Decides from method and raw path alone, before any body byte is read.
    fn route(&self, method: &Method, path: &str) -> RouteMatch<Self::Route>;
    fn handle(&self, route: Self::Route, req: Request) -> impl Future<Output = Outcome>;
}

/// Limits and timeouts of one connection; see `API.md` "General HTTP behaviour".
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Request line plus header fields plus the empty line; more → 431.
    pub max_header_bytes: usize,
    /// Decoded request body; more → 413.
    pub max_body_bytes: usize,
    /// From the first byte of a request until its head is complete; else 408.
    pub header_timeout: Duration,
    /// Longest silence inside a body (else 408); also the longest a response write may
    /// make no progress before the connection is dropped.
    pub body_idle_timeout: Duration,
    /// From the end of the head until the whole body is in (else 408), however steadily
    /// it trickles: a byte every 29 s must not hold a connection and its buffers forever.
    pub body_timeout: Duration,
    /// A connection waiting for its next request closes silently after this long.
    pub keepalive_idle: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            keepalive_idle: Duration::from_secs(60),
        }
    }
}
