//! One connection: reads requests, applies the limits, timeouts and the order of checks
//! of `API.md`, calls the service and writes the answers in request order.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future::{or, pending};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;

use super::response::{encode, encode_head, sends_body, Wire};
use super::{HttpConfig, Method, Outcome, Response, RouteMatch, Service, Shutdown, UpgradeFn};
use shards::http::parse::{
    parse_head, parse_request_line, ChunkError, ChunkedDecoder, Framing, FramingError, Head,
    HeadParse,
};

/// One socket read. The connection buffer holds at most one head (`max_header_bytes`)
/// plus one read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A body at least this large is written after its head rather than copied behind it:
/// the response is the connection's only unsent output and should exist once in memory.
const COPIED_BODY_BYTES_MAX: usize = 64 * 1024;

/// How long a closing connection drains what the client still sends; see `close`.
const LINGER: Duration = Duration::from_secs(2);

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Serves requests on `stream` until the client leaves, an error closes it, the
/// connection idles out, `shutdown` fires, or a handler upgrades it (then the stream
/// goes to the handler's `then` and this returns). Run it as its own task: it never
/// blocks other connections, but it lives as long as its client allows.
pub async fn serve_connection<S: Service>(
    stream: TcpStream,
    service: Rc<S>,
    cfg: Rc<HttpConfig>,
    shutdown: Rc<Shutdown>,
) {
    // Every response goes out in one write; Nagle would only delay it.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(READ_CHUNK_BYTES),
        cfg,
        shutdown,
    };
    loop {
        match conn.serve_request(&*service).await {
            Next::Continue => {}
            Next::Close { linger } => return conn.close(linger).await,
            Next::Upgrade(then) => return then(conn.stream, conn.buf).await,
        }
    }
}

enum Next {
    Continue,
    /// `linger`: a response was just sent and unread request bytes may remain.
    Close {
        linger: bool,
    },
    Upgrade(UpgradeFn),
}

enum ReadEvent {
    Data,
    Eof,
    TimedOut,
    Shutdown,
    Failed,
}

enum HeadError {
    /// The client went away or the socket failed: nobody to answer.
    Closed,
    TimedOut,
    Malformed(&'static str),
    TooLarge,
}

enum BodyError {
    Closed,
    TimedOut,
    Chunk(ChunkError),
}

/// What the answer to a request must honour after its head has moved into the
/// `Request` given to the service.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    keep_alive: bool,
    http10: bool,
    head_request: bool,
}

impl Exchange {
    /// For answers sent before any head could be read.
    const UNREAD: Exchange = Exchange {
        keep_alive: false,
        http10: false,
        head_request: false,
    };

    fn of(head: &Head) -> Exchange {
        Exchange {
            keep_alive: head.keep_alive(),
            http10: head.minor_version == 0,
            head_request: head.method == Method::Head,
        }
    }

    fn closing(self) -> Exchange {
        Exchange {
            keep_alive: false,
            ..self
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Received bytes not yet consumed: the rest of a head, a body, pipelined requests.
    buf: Vec<u8>,
    cfg: Rc<HttpConfig>,
    shutdown: Rc<Shutdown>,
}

impl Conn {
    /// Serves one request. Routing comes first, even for a head that cannot be read
    /// whole, because `API.md` ranks 404 and 405 above every framing error.
    async fn serve_request<S: Service>(&mut self, service: &S) -> Next {
        let Some(first_byte_at) = self.await_request().await else {
            return Next::Close { linger: false };
        };
        let head = match self.read_head(first_byte_at).await {
            Ok(head) => head,
            Err(HeadError::Closed) => return Next::Close { linger: false },
            Err(HeadError::TimedOut) => {
                return self.finish(Exchange::UNREAD, request_timeout()).await;
            }
            Err(error) => {
                let routed = parse_request_line(&self.buf).map(|(m, p)| service.route(&m, &p));
                let response = match (routed, error) {
                    (Some(RouteMatch::NotFound), _) => not_found(),
                    (Some(RouteMatch::MethodNotAllowed { allow }), _) => method_not_allowed(allow),
                    (_, HeadError::Malformed(why)) => bad_request(why),
                    (_, _) => headers_too_large(),
                };
                return self.finish(Exchange::UNREAD, response).await;
            }
        };
        match service.route(&head.method, &head.path) {
            RouteMatch::NotFound => self.answer_early(&head, not_found()).await,
            // A preflight for any path that exists, whatever methods it takes.
            _ if head.method == Method::Options => self.answer_early(&head, preflight(&head)).await,
            RouteMatch::MethodNotAllowed { allow } => {
                self.answer_early(&head, method_not_allowed(allow)).await
            }
            RouteMatch::Found(route) => self.serve_found(service, route, head).await,
        }
    }

    /// Waits for the first byte of the next request. `None`: close silently (client
    /// gone, idle too long, or shutting down, which stops even pipelined requests).
    async fn await_request(&mut self) -> Option<Instant> {
        if self.shutdown.is_triggered() {
            return None;
        }
        // Some clients send a CRLF after a body; it is not the start of a request
        // and must not start the header timer (RFC 9112 §2.2).
        let blank = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        self.buf.drain(..blank);
        while self.buf.is_empty() {
            let deadline = Instant::now() + self.cfg.keepalive_idle;
            match self.read_more(deadline, true).await {
                ReadEvent::Data => {
                    let blank = self
                        .buf
                        .iter()
                        .take_while(|&&b| b == b'\r' || b == b'\n')
                        .count();
                    self.buf.drain(..blank);
                }
                _ => return None,
            }
        }
        Some(Instant::now())
    }

    /// Reads until the head is complete, within `header_timeout` of its first byte.
    /// On error the unparsed bytes stay in `buf` so the request line can be routed.
    async fn read_head(&mut self, first_byte_at: Instant) -> Result<Head, HeadError> {
        let deadline = first_byte_at + self.cfg.header_timeout;
        let max = self.cfg.max_header_bytes;
        // Bytes already parsed as an incomplete head: parsing again only pays off once
        // an empty line arrives or the limit is passed, which keeps a client that
        // trickles bytes from costing quadratic parsing time.
        let mut parsed_len = None;
        loop {
            let worth_parsing = match parsed_len {
                None => true,
                Some(from) => self.buf.len() > max || may_end_head(&self.buf, from),
            };
            if worth_parsing {
                match parse_head(&self.buf, max) {
                    HeadParse::Complete(head) => {
                        self.buf.drain(..head.len);
                        return Ok(head);
                    }
                    HeadParse::Partial => parsed_len = Some(self.buf.len()),
                    HeadParse::Invalid(why) => return Err(HeadError::Malformed(why)),
                    HeadParse::TooLarge => return Err(HeadError::TooLarge),
                }
            }
            match self.read_more(deadline, false).await {
                ReadEvent::Data => {}
                ReadEvent::TimedOut => return Err(HeadError::TimedOut),
                _ => return Err(HeadError::Closed),
            }
        }
    }

    /// A route was found: check framing and media type, read the body, call the service.
    async fn serve_found<S: Service>(&mut self, service: &S, route: S::Route, head: Head) -> Next {
        let exchange = Exchange::of(&head);
        let framing = match head.framing(self.cfg.max_body_bytes) {
            Ok(framing) => framing,
            Err(error) => return self.finish(exchange.closing(), framing_error(error)).await,
        };
        // A coded body cannot be read as JSON (the server decodes none): the same rank
        // as a wrong media type. A chunked body may still break the framing rules, which
        // rank above, so that case is decided once it is read.
        let coded = !head.has_identity_content_encoding();
        if coded && framing != Framing::Chunked {
            return self
                .answer_early(&head, unsupported_content_encoding())
                .await;
        }
        // With a known length the media type can be judged before the body arrives.
        if matches!(framing, Framing::Length(_)) && !head.has_json_content_type() {
            return self.answer_early(&head, unsupported_media_type()).await;
        }
        // The checks that could refuse the body have passed: ask for it, unless the
        // client has already started sending it.
        if framing != Framing::Empty && head.expects_continue() && self.buf.is_empty() {
            if let Err(e) = self.write_all(CONTINUE).await {
                tracing::debug!(error = %e, "writing 100 Continue failed");
                return Next::Close { linger: false };
            }
        }
        let body = match self.read_body(framing, true).await {
            Ok(body) => body,
            Err(error) => return self.body_failed(exchange, error).await,
        };
        // A chunked body's emptiness is known only now (framing errors rank above 415).
        if coded {
            return self.finish(exchange, unsupported_content_encoding()).await;
        }
        if !body.is_empty() && !head.has_json_content_type() {
            return self.finish(exchange, unsupported_media_type()).await;
        }
        match service.handle(route, head.into_request(body)).await {
            Outcome::Respond(response) => self.finish(exchange, response).await,
            Outcome::Upgrade { response, then } => self.upgrade(response, then).await,
        }
    }

    /// Answers without giving the request to the service. A body within the limits is
    /// read and dropped so the connection can serve the next request; otherwise the
    /// framing of what follows is unknown and the connection closes.
    async fn answer_early(&mut self, head: &Head, response: Response) -> Next {
        let exchange = Exchange::of(head);
        let framing = match head.framing(self.cfg.max_body_bytes) {
            Ok(framing) => framing,
            Err(_) => return self.finish(exchange.closing(), response).await,
        };
        if framing == Framing::Empty {
            return self.finish(exchange, response).await;
        }
        // The client holds its body back until 100 Continue, which this final answer
        // replaces (RFC 9110 §10.1.1); the body may or may not follow, so close.
        if head.expects_continue() && self.buf.is_empty() {
            return self.finish(exchange.closing(), response).await;
        }
        match self.read_body(framing, false).await {
            Ok(_) => self.finish(exchange, response).await,
            Err(BodyError::Closed) => Next::Close { linger: false },
            Err(_) => self.finish(exchange.closing(), response).await,
        }
    }

    async fn body_failed(&mut self, exchange: Exchange, error: BodyError) -> Next {
        let response = match error {
            BodyError::Closed => return Next::Close { linger: false },
            BodyError::TimedOut => request_timeout(),
            BodyError::Chunk(ChunkError::Bad(why)) => bad_request(why),
            BodyError::Chunk(ChunkError::TooLarge) => payload_too_large(),
            BodyError::Chunk(ChunkError::TrailersTooLarge) => headers_too_large(),
        };
        self.finish(exchange.closing(), response).await
    }

    /// Reads the body, all of it within `body_timeout` from now (the head has just been
    /// read); with `keep` false it is checked and dropped, not stored.
    async fn read_body(&mut self, framing: Framing, keep: bool) -> Result<Vec<u8>, BodyError> {
        let deadline = Instant::now() + self.cfg.body_timeout;
        match framing {
            Framing::Empty => Ok(Vec::new()),
            Framing::Length(len) => self.read_sized_body(len, keep, deadline).await,
            Framing::Chunked => self.read_chunked_body(keep, deadline).await,
        }
    }

    async fn read_sized_body(
        &mut self,
        len: usize,
        keep: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, BodyError> {
        // `len` was checked against max_body_bytes before this is called.
        let mut body = Vec::with_capacity(if keep { len } else { 0 });
        let mut remaining = len;
        loop {
            let take = remaining.min(self.buf.len());
            if keep {
                body.extend_from_slice(&self.buf[..take]);
            }
            self.buf.drain(..take);
            remaining -= take;
            if remaining == 0 {
                return Ok(body);
            }
            self.read_body_bytes(deadline).await?;
        }
    }

    async fn read_chunked_body(
        &mut self,
        keep: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, BodyError> {
        let mut decoder = ChunkedDecoder::new(self.cfg.max_body_bytes, self.cfg.max_header_bytes);
        let mut body = Vec::new();
        loop {
            let out = if keep { Some(&mut body) } else { None };
            let (used, done) = decoder.decode(&self.buf, out).map_err(BodyError::Chunk)?;
            self.buf.drain(..used);
            if done {
                return Ok(body);
            }
            self.read_body_bytes(deadline).await?;
        }
    }

    /// One read inside a body: silence longer than `body_idle_timeout`, or a body still
    /// incomplete at `body_deadline`, is a 408.
    async fn read_body_bytes(&mut self, body_deadline: Instant) -> Result<(), BodyError> {
        let deadline = body_deadline.min(Instant::now() + self.cfg.body_idle_timeout);
        match self.read_more(deadline, false).await {
            ReadEvent::Data => Ok(()),
            ReadEvent::TimedOut => Err(BodyError::TimedOut),
            _ => Err(BodyError::Closed),
        }
    }

    /// Appends one read to `buf`, unless `deadline` passes first or, when
    /// `stop_on_shutdown`, the shutdown fires. Dropping a pending glommio read loses
    /// no data (it waits for readiness, then reads synchronously), so racing is safe.
    async fn read_more(&mut self, deadline: Instant, stop_on_shutdown: bool) -> ReadEvent {
        let Conn {
            stream,
            buf,
            shutdown,
            ..
        } = self;
        let filled = buf.len();
        buf.resize(filled + READ_CHUNK_BYTES, 0);
        let read = async {
            match stream.read(&mut buf[filled..]).await {
                Ok(0) => (ReadEvent::Eof, 0),
                Ok(n) => (ReadEvent::Data, n),
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    (ReadEvent::Failed, 0)
                }
            }
        };
        let expire = async {
            Timer::new(deadline.saturating_duration_since(Instant::now())).await;
            (ReadEvent::TimedOut, 0)
        };
        let stop = async {
            if stop_on_shutdown {
                shutdown.wait().await;
            } else {
                pending::<()>().await;
            }
            (ReadEvent::Shutdown, 0)
        };
        // `or` polls in order: data that is already there wins over a timer that fired.
        let (event, read_len) = or(read, or(expire, stop)).await;
        buf.truncate(filled + read_len);
        event
    }

    /// Writes the response. It closes after it when the client or a framing error
    /// asked for that, or when the server is shutting down.
    ///
    /// Only then does the connection read its next request: a client that pipelines
    /// requests and never reads makes the server stop reading its requests as soon as
    /// one answer does not fit in the socket buffer, so a connection holds at most one
    /// unsent response, and responses are bounded (API.md: listing pages and `/events`
    /// pages ≤ 4 MiB; "a connection's unsent responses are bounded (4 MiB)").
    async fn finish(&mut self, exchange: Exchange, response: Response) -> Next {
        let close = !exchange.keep_alive || self.shutdown.is_triggered();
        let wire = Wire {
            close,
            confirm_keep_alive: !close && exchange.http10,
            head_request: exchange.head_request,
            upgrade: false,
        };
        let written = if response.body.len() > COPIED_BODY_BYTES_MAX {
            let head = encode_head(&response, wire, 0);
            match self.write_all(&head).await {
                Ok(()) if sends_body(&response, wire) => self.write_all(&response.body).await,
                other => other,
            }
        } else {
            self.write_all(&encode(&response, wire)).await
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "writing response failed");
            return Next::Close { linger: false };
        }
        if close {
            Next::Close { linger: true }
        } else {
            Next::Continue
        }
    }

    async fn upgrade(&mut self, response: Response, then: UpgradeFn) -> Next {
        let wire = Wire {
            upgrade: true,
            ..Wire::default()
        };
        if let Err(e) = self.write_all(&encode(&response, wire)).await {
            tracing::debug!(error = %e, "writing upgrade response failed");
            return Next::Close { linger: false };
        }
        Next::Upgrade(then)
    }

    /// Writes everything, giving up when the client accepts nothing for
    /// `body_idle_timeout`: a peer that never reads must not hold the task forever.
    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let stall_limit = self.cfg.body_idle_timeout;
        while !bytes.is_empty() {
            let write = async { Some(self.stream.write(bytes).await) };
            let stall = async {
                Timer::new(stall_limit).await;
                None
            };
            match or(write, stall).await {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(Ok(written)) => bytes = &bytes[written..],
                Some(Err(e)) => return Err(e),
                None => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        self.stream.flush().await
    }

    /// Closing a socket that still has unread input makes the kernel send RST, and an
    /// RST can destroy the response the client has not read yet. After a response,
    /// half-close and drain for a bounded time instead (RFC 9112 §9.6).
    async fn close(mut self, linger: bool) {
        if !linger {
            return;
        }
        if self
            .stream
            .shutdown(std::net::Shutdown::Write)
            .await
            .is_err()
        {
            return;
        }
        let deadline = Instant::now() + LINGER;
        loop {
            self.buf.clear();
            if !matches!(self.read_more(deadline, false).await, ReadEvent::Data) {
                return;
            }
        }
    }
}

/// Whether the bytes after `from` (those not yet parsed) may hold the empty line that
/// ends a head. httparse accepts both CRLF and bare LF line endings.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(3).min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Every method the API answers on some path (API.md: HEAD is answered on every GET
/// route, v1.1), so a preflight never refuses what the server would serve.
const PREFLIGHT_ALLOW_METHODS: &str = "GET, HEAD, POST, PATCH, OPTIONS";

fn preflight(head: &Head) -> Response {
    let requested = head
        .header("access-control-request-headers")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("content-type");
    Response::empty(204)
        .with_header("Access-Control-Allow-Methods", PREFLIGHT_ALLOW_METHODS)
        .with_header("Access-Control-Allow-Headers", requested)
        .with_header("Access-Control-Expose-Headers", "Retry-After")
        .with_header("Access-Control-Max-Age", "86400")
}

fn framing_error(error: FramingError) -> Response {
    match error {
        FramingError::Bad(why) => bad_request(why),
        FramingError::TooLarge => payload_too_large(),
    }
}

fn not_found() -> Response {
    Response::error(404, "not_found", "no such route")
}

fn method_not_allowed(allow: &'static str) -> Response {
    Response::error(
        405,
        "method_not_allowed",
        "method not allowed on this route",
    )
    .with_header("Allow", allow)
}

fn bad_request(why: &str) -> Response {
    Response::error(400, "bad_request", why)
}

fn headers_too_large() -> Response {
    Response::error(431, "headers_too_large", "request header section too large")
}

fn payload_too_large() -> Response {
    Response::error(413, "payload_too_large", "request body too large")
}

fn unsupported_media_type() -> Response {
    Response::error(
        415,
        "unsupported_media_type",
        "request body must be application/json",
    )
}

fn unsupported_content_encoding() -> Response {
    Response::error(
        415,
        "unsupported_media_type",
        "request bodies must not be content-coded (Content-Encoding other than identity)",
    )
}

fn request_timeout() -> Response {
    Response::error(408, "request_timeout", "request not received in time")
}
