//! An in-process stub of the Starcite append API for the coordinated-omission self test.
//!
//! It answers `POST /v1/sessions` and `POST /v1/sessions/:id/append` with 201 at once,
//! except that, once, after a configured number of appends, it stalls ALL responses
//! (on every connection) for a configured time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct StubConfig {
    /// Start the stall when this many appends have been received (None: never stall).
    pub stall_after_appends: Option<u64>,
    pub stall_for: Duration,
}

#[derive(Default)]
struct StallState {
    appends: u64,
    stall_until: Option<Instant>,
}

struct Responses {
    append: Vec<u8>,
    create: Vec<u8>,
    not_found: Vec<u8>,
}

fn http_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Shared {
    config: StubConfig,
    responses: Responses,
    stall: Mutex<StallState>,
    stop: AtomicBool,
    conns: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicU64,
}

pub struct StubServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StubServer {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub fn start(config: StubConfig) -> io::Result<StubServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            responses: Responses {
                append: http_response(
                    "201 Created",
                    r#"{"seq":1,"last_seq":1,"deduped":false,"cursor":1,"archived_seq":0}"#,
                ),
                create: http_response("201 Created", r#"{"id":"stub","last_seq":0,"version":1}"#),
                not_found: http_response(
                    "404 Not Found",
                    r#"{"error":"not_found","message":"no such route"}"#,
                ),
            },
            stall: Mutex::new(StallState::default()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name("stub-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(StubServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Append requests received so far.
    pub fn appends(&self) -> u64 {
        self.shared.stall.lock().unwrap().appends
    }

    /// When the stall started, if it has.
    pub fn stall_started(&self) -> Option<Instant> {
        let st = self.shared.stall.lock().unwrap();
        st.stall_until.map(|u| u - self.shared.config.stall_for)
    }
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for h in conns {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        if let Ok(h) = thread::Builder::new()
            .name("stub-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = serve_conn(stream, &s);
            })
        {
            shared.conns.lock().unwrap().push(h);
        }
    }
}

fn serve_conn(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Short read timeout so the thread notices shutdown.
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Answer every complete request in the buffer.
        while let Some((consumed, is_append, is_create)) = parse_request(&buf)? {
            buf.drain(..consumed);
            shared.wait_for_stall(is_append);
            let response = if is_append {
                &shared.responses.append
            } else if is_create {
                &shared.responses.create
            } else {
                &shared.responses.not_found
            };
            stream.write_all(response)?;
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Returns (bytes consumed, is append, is session create) for one complete request.
fn parse_request(buf: &[u8]) -> io::Result<Option<(usize, bool, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let mut len = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "content-length"))?;
        }
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    let post = req.method == Some("POST");
    let path = req.path.unwrap_or("");
    let is_append = post && path.starts_with("/v1/sessions/") && path.ends_with("/append");
    let is_create = post && path == "/v1/sessions";
    Ok(Some((head + len, is_append, is_create)))
}

impl Shared {
    /// Counts appends, triggers the one-time stall when due, and blocks any response
    /// while the stall lasts.
    fn wait_for_stall(&self, is_append: bool) {
        let until = {
            let mut st = self.stall.lock().unwrap();
            st.appends += is_append as u64;
            if let Some(n) = self.config.stall_after_appends {
                if st.stall_until.is_none() && st.appends >= n {
                    st.stall_until = Some(Instant::now() + self.config.stall_for);
                }
            }
            st.stall_until
        };
        if let Some(until) = until {
            crate::schedule::sleep_until(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;

    #[test]
    fn answers_and_stalls_once() {
        let stub = StubServer::start(StubConfig {
            stall_after_appends: Some(2),
            stall_for: Duration::from_millis(300),
        })
        .unwrap();
        let mut c = Client::new(stub.addr(), "stub", Duration::from_secs(5));
        let r = c.post_json("/v1/sessions", b"{\"id\":\"a\"}").unwrap();
        assert_eq!(r.status, 201);
        let r = c.post_json("/v1/sessions/a/append", b"{}").unwrap();
        assert_eq!(r.status, 201);
        assert!(r.body.starts_with(b"{\"seq\":1"));
        assert!(r.service < Duration::from_millis(200));
        let r = c.post_json("/v1/sessions/a/append", b"{}").unwrap();
        assert!(r.service >= Duration::from_millis(250), "{:?}", r.service);
        let r = c.post_json("/v1/sessions/a/append", b"{}").unwrap();
        assert!(r.service < Duration::from_millis(200));
        assert!(stub.stall_started().is_some());
        assert_eq!(c.post_json("/nope", b"").unwrap().status, 404);
    }
}
