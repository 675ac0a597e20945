//! A minimal blocking HTTP/1.1 keep-alive client: one request at a time per connection,
//! responses framed by Content-Length (chunked and read-until-close are accepted too).
//! Every buffer is bounded; every request has a deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest header block accepted from the server.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest response body accepted from the server.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
const MAX_HEADERS: usize = 64;
const READ_CHUNK: usize = 16 * 1024;

/// Why a request did not produce a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// TCP connect failed.
    Connect,
    /// The deadline passed before the complete response arrived.
    Timeout,
    /// The server closed the connection before a complete response.
    Closed,
    /// Any other socket error.
    Io,
    /// The response could not be parsed or broke a limit.
    Protocol,
}

impl ClientError {
    pub fn label(&self) -> &'static str {
        match self {
            ClientError::Connect => "connect",
            ClientError::Timeout => "timeout",
            ClientError::Closed => "closed",
            ClientError::Io => "io",
            ClientError::Protocol => "protocol",
        }
    }

    fn from_io(e: &io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io,
        }
    }
}

/// A complete response. The body borrows the client's buffer until the next request.
#[derive(Debug)]
pub struct Response<'a> {
    pub status: u16,
    pub body: &'a [u8],
    /// Time from just before the request bytes were written until the response was complete.
    pub service: Duration,
}

/// One keep-alive connection to a fixed address, reconnected on demand.
pub struct Client {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    /// Received bytes not yet consumed (bounded by the header/body limits).
    inbuf: Vec<u8>,
    body: Vec<u8>,
}

/// How the body of a response is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

impl Client {
    pub fn new(addr: SocketAddr, host: &str, timeout: Duration) -> Client {
        Client {
            addr,
            host: host.to_string(),
            timeout,
            stream: None,
            request: Vec::with_capacity(4096),
            inbuf: Vec::with_capacity(READ_CHUNK),
            body: Vec::with_capacity(1024),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// Opens the connection now (otherwise it is opened lazily by the first request).
    pub fn connect(&mut self) -> Result<(), ClientError> {
        self.ensure_connected(Instant::now() + self.timeout)
    }

    fn ensure_connected(&mut self, deadline: Instant) -> Result<(), ClientError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let remaining = remaining(deadline).ok_or(ClientError::Timeout)?;
        let stream =
            TcpStream::connect_timeout(&self.addr, remaining).map_err(|_| ClientError::Connect)?;
        stream.set_nodelay(true).map_err(|_| ClientError::Connect)?;
        self.inbuf.clear();
        self.stream = Some(stream);
        Ok(())
    }

    /// Sends `POST path` with a JSON body and waits for the complete response.
    /// On any error the connection is dropped, so the next request starts fresh.
    pub fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Response<'_>, ClientError> {
        let deadline = Instant::now() + self.timeout;
        self.ensure_connected(deadline)?;
        self.request.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.request.extend_from_slice(body);

        let sent_at = Instant::now();
        match self.exchange(deadline) {
            Ok((status, keep_alive)) => {
                let service = sent_at.elapsed();
                if !keep_alive {
                    self.stream = None;
                }
                Ok(Response {
                    status,
                    body: &self.body,
                    service,
                })
            }
            Err(e) => {
                self.stream = None;
                self.inbuf.clear();
                Err(e)
            }
        }
    }

    /// Writes the prepared request and reads one response. Returns (status, keep-alive).
    fn exchange(&mut self, deadline: Instant) -> Result<(u16, bool), ClientError> {
        let stream = self.stream.as_mut().ok_or(ClientError::Io)?;
        let t = remaining(deadline).ok_or(ClientError::Timeout)?;
        stream
            .set_write_timeout(Some(t))
            .map_err(|e| ClientError::from_io(&e))?;
        stream
            .write_all(&self.request)
            .map_err(|e| ClientError::from_io(&e))?;

        loop {
            // Parse what we have; read more only when the response is incomplete.
            if let Some((status, keep_alive, consumed)) = self.try_parse()? {
                self.inbuf.drain(..consumed);
                if (100..200).contains(&status) {
                    continue; // interim response (e.g. 100 Continue): wait for the final one
                }
                return Ok((status, keep_alive));
            }
            if !self.fill(deadline)? {
                // EOF: only a read-until-close body is complete at this point.
                return match self.parse_head()? {
                    Some((status, _, head_len, Framing::UntilClose)) => {
                        self.body.clear();
                        self.body.extend_from_slice(&self.inbuf[head_len..]);
                        self.inbuf.clear();
                        Ok((status, false))
                    }
                    _ => Err(ClientError::Closed),
                };
            }
        }
    }

    /// Reads more bytes into `inbuf`. Returns false on EOF.
    fn fill(&mut self, deadline: Instant) -> Result<bool, ClientError> {
        if self.inbuf.len() >= MAX_HEADER_BYTES + MAX_BODY_BYTES {
            return Err(ClientError::Protocol);
        }
        let stream = self.stream.as_mut().ok_or(ClientError::Io)?;
        let t = remaining(deadline).ok_or(ClientError::Timeout)?;
        stream
            .set_read_timeout(Some(t))
            .map_err(|e| ClientError::from_io(&e))?;
        let start = self.inbuf.len();
        self.inbuf.resize(start + READ_CHUNK, 0);
        let result = stream.read(&mut self.inbuf[start..]);
        let n = *result.as_ref().unwrap_or(&0);
        self.inbuf.truncate(start + n);
        match result {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(ClientError::from_io(&e)),
        }
    }

    /// Parses the status line and headers: (status, keep_alive, header length, framing).
    fn parse_head(&self) -> Result<Option<(u16, bool, usize, Framing)>, ClientError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&self.inbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.inbuf.len() > MAX_HEADER_BYTES => {
                return Err(ClientError::Protocol)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ClientError::Protocol),
        };
        let status = resp.code.ok_or(ClientError::Protocol)?;
        let mut keep_alive = resp.version == Some(1);
        let mut length = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).map_err(|_| ClientError::Protocol)?;
                let n: usize = v.trim().parse().map_err(|_| ClientError::Protocol)?;
                if n > MAX_BODY_BYTES {
                    return Err(ClientError::Protocol);
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        Ok(Some((status, keep_alive, head_len, framing)))
    }

    /// Returns (status, keep_alive, bytes consumed) once a whole response is buffered;
    /// the body is copied into `self.body`.
    fn try_parse(&mut self) -> Result<Option<(u16, bool, usize)>, ClientError> {
        let Some((status, keep_alive, head_len, framing)) = self.parse_head()? else {
            return Ok(None);
        };
        let rest = &self.inbuf[head_len..];
        match framing {
            Framing::Length(n) => {
                if rest.len() < n {
                    return Ok(None);
                }
                self.body.clear();
                self.body.extend_from_slice(&rest[..n]);
                Ok(Some((status, keep_alive, head_len + n)))
            }
            Framing::Chunked => match decode_chunked(rest, &mut self.body)? {
                Some(used) => Ok(Some((status, keep_alive, head_len + used))),
                None => Ok(None),
            },
            Framing::UntilClose => {
                if rest.len() > MAX_BODY_BYTES {
                    return Err(ClientError::Protocol);
                }
                Ok(None)
            }
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (deadline > now).then(|| deadline - now)
}

/// Decodes a complete chunked body from `data` into `out`; returns the bytes consumed,
/// or None if `data` does not yet hold the whole body (including trailers).
fn decode_chunked(data: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ClientError> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&data[pos..]) else {
            return Ok(None);
        };
        let line = &data[pos..pos + line_end];
        let size_hex = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or(line)
            .trim_ascii();
        let size_str = std::str::from_utf8(size_hex).map_err(|_| ClientError::Protocol)?;
        let size = usize::from_str_radix(size_str, 16).map_err(|_| ClientError::Protocol)?;
        pos += line_end + 2;
        if size == 0 {
            // Trailer lines until an empty line.
            loop {
                let Some(end) = find_crlf(&data[pos..]) else {
                    return Ok(None);
                };
                pos += end + 2;
                if end == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if out.len() + size > MAX_BODY_BYTES {
            return Err(ClientError::Protocol);
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[pos..pos + size]);
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return Err(ClientError::Protocol);
        }
        pos += size + 2;
    }
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// Serves the given raw responses, one per request, on one connection.
    fn serve(responses: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 8192];
            for r in responses {
                // Read one request (small enough for one read in these tests).
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(r).unwrap();
            }
        });
        addr
    }

    #[test]
    fn content_length_chunked_and_close() {
        let addr = serve(vec![
            b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n{\"seq\":1}\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        ]);
        let mut c = Client::new(addr, "test", Duration::from_secs(5));
        let r = c.post_json("/a", b"{}").unwrap();
        assert_eq!((r.status, r.body), (201, &b"{\"seq\":1}\n"[..]));
        let r = c.post_json("/b", b"{}").unwrap();
        assert_eq!((r.status, r.body), (404, &b"abcde"[..]));
        let r = c.post_json("/c", b"{}").unwrap();
        assert_eq!((r.status, r.body), (200, &b"ok"[..]));
        assert!(!c.is_connected());
    }

    #[test]
    fn timeout_and_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            // First connection: never answer. Second: close immediately.
            let (_silent, _) = listener.accept().unwrap();
            let (closed, _) = listener.accept().unwrap();
            drop(closed);
            thread::sleep(Duration::from_secs(2));
        });
        let mut c = Client::new(addr, "test", Duration::from_millis(200));
        assert_eq!(c.post_json("/", b"{}").unwrap_err(), ClientError::Timeout);
        let err = c.post_json("/", b"{}").unwrap_err();
        assert!(
            matches!(err, ClientError::Closed | ClientError::Io),
            "{err:?}"
        );
    }
}
