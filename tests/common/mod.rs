//! Shared helpers of the black-box tests: start the real `starcite` binary on a fresh
//! data dir, talk HTTP/1.1 to it over plain `TcpStream`s, and tail it over WebSocket.
//!
//! Every test starts its own server (`Server::start`). The child is killed when the
//! `Server` is dropped; the data dir and the stderr log are removed unless the test is
//! panicking, in which case the tail of the server's stderr is printed.
#![allow(dead_code)]

pub mod cluster;
pub mod postgres;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_starcite");
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `target/test-data` of the workspace.
pub fn test_data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("test-data")
}

/// A fresh, unused path `target/test-data/<name>-<pid>-<counter>` (not created).
pub fn unique_path(name: &str) -> PathBuf {
    let root = test_data_root();
    fs::create_dir_all(&root).expect("create target/test-data");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    root.join(format!("{name}-{}-{n}", std::process::id()))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// How to start a server.
#[derive(Clone, Debug)]
pub struct Opts {
    pub name: String,
    pub shards: usize,
    pub segment_bytes: u64,
    /// Extra `serve` flags, e.g. `["--hot-bytes-per-shard", "4096"]`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Pass `--data-dir` relative to the workspace root (the child's working dir).
    pub relative_data_dir: bool,
}

impl Opts {
    pub fn new(name: &str) -> Opts {
        Opts {
            name: name.to_string(),
            shards: 2,
            segment_bytes: 4 << 20,
            args: Vec::new(),
            env: Vec::new(),
            relative_data_dir: false,
        }
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Opts {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Opts {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn shards(mut self, n: usize) -> Opts {
        self.shards = n;
        self
    }
}

/// A running (or stopped) `starcite serve` child on its own data dir.
pub struct Server {
    pub opts: Opts,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    /// Extra paths removed with the data dir when the test passes.
    pub cleanup: Vec<PathBuf>,
}

impl Server {
    /// Starts a server on a fresh data dir and waits until `/health/ready` answers 200.
    pub fn start(opts: Opts) -> Server {
        let data_dir = unique_path(&opts.name);
        let log_path = data_dir.with_extension("stderr.log");
        let mut server = Server {
            opts,
            port: 0,
            data_dir,
            log_path,
            child: None,
            cleanup: Vec::new(),
        };
        // A port picked by bind(0) may be taken again by a parallel test before the child
        // binds it: retry with another port when the child dies at start.
        let mut last_err = String::new();
        for _ in 0..3 {
            server.port = free_port();
            server.spawn();
            match server.try_wait_ready(READY_TIMEOUT) {
                Ok(()) => return server,
                Err(e) => {
                    last_err = e;
                    server.kill9();
                    if !server.stderr().to_lowercase().contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!(
            "server {} did not become ready: {last_err}\n--- stderr ---\n{}",
            server.opts.name,
            server.stderr_tail(8000)
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The `--data-dir` argument as passed to the child.
    pub fn data_dir_arg(&self) -> String {
        if self.opts.relative_data_dir {
            self.data_dir
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .expect("data dir under the workspace")
                .display()
                .to_string()
        } else {
            self.data_dir.display().to_string()
        }
    }

    /// `serve` arguments of this server (port, data dir, shards, segment size, extras).
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "serve".to_string(),
            "--http-addr".to_string(),
            format!("127.0.0.1:{}", self.port),
            "--data-dir".to_string(),
            self.data_dir_arg(),
            "--shards".to_string(),
            self.opts.shards.to_string(),
            "--segment-bytes".to_string(),
            self.opts.segment_bytes.to_string(),
        ];
        args.extend(self.opts.args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open stderr log");
        let _ = writeln!(&log, "=== spawn {:?}", self.serve_args());
        let mut cmd = base_command(&self.opts.env);
        cmd.args(self.serve_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn starcite"));
    }

    fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("server exited during start: {status}"));
                }
            } else {
                return Err("server not running".into());
            }
            if let Ok(resp) = try_request(self.addr(), "GET", "/health/ready", &[], b"") {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for readiness, panicking with the server's stderr on failure.
    pub fn wait_ready(&mut self) {
        if let Err(e) = self.try_wait_ready(READY_TIMEOUT) {
            panic!(
                "server {} not ready: {e}\n--- stderr ---\n{}",
                self.opts.name,
                self.stderr_tail(8000)
            );
        }
    }

    /// Stops the server gracefully if it runs (asserting a clean exit), then starts it
    /// again on the same data dir and port and waits until it is ready.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.terminate();
            assert!(
                status.success(),
                "graceful stop before restart failed: {status}\n{}",
                self.stderr_tail(4000)
            );
        }
        self.spawn();
        self.wait_ready();
    }

    /// Starts a stopped server again (same data dir and port) and waits until ready.
    pub fn start_again(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let child = self.child.as_ref().expect("server not running");
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Waits for the child to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("server not running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait (at most 30 s, then kill -9 and panic).
    pub fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        match self.wait_exit(Duration::from_secs(30)) {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "server did not exit within 30 s of SIGTERM\n{}",
                    self.stderr_tail(4000)
                );
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().ok().flatten().is_none(),
        }
    }

    /// VmRSS of the running server process in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("server not running").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    pub fn stderr(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn stderr_tail(&self, bytes: usize) -> String {
        let text = self.stderr();
        let mut start = text.len().saturating_sub(bytes);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    // ---- HTTP conveniences (one fresh connection per request) ----

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr(), method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    /// POST with `Content-Type: application/json`.
    pub fn post(&self, path: &str, body: &str) -> Resp {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// PATCH with `Content-Type: application/json`.
    pub fn patch(&self, path: &str, body: &str) -> Resp {
        self.request(
            "PATCH",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// Creates session `id` (asserting 201) and returns the reply.
    pub fn create_session(&self, id: &str) -> Value {
        let resp = self.post("/v1/sessions", &json!({ "id": id }).to_string());
        assert_eq!(resp.status, 201, "create {id}: {}", resp.text());
        resp.json()
    }

    /// POSTs `body` to `/v1/sessions/{id}/append`.
    pub fn append(&self, id: &str, body: &Value) -> Resp {
        self.post(&format!("/v1/sessions/{id}/append"), &body.to_string())
    }

    /// Appends and asserts 201; returns the reply.
    pub fn append_ok(&self, id: &str, body: &Value) -> Value {
        let resp = self.append(id, body);
        assert_eq!(resp.status, 201, "append to {id}: {}", resp.text());
        resp.json()
    }

    /// Every event of a session with `seq > cursor`, paging through `/events`.
    pub fn events_after(&self, id: &str, cursor: u64) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = cursor;
        loop {
            let resp = self.get(&format!(
                "/v1/sessions/{id}/events?cursor={cursor}&limit=1000"
            ));
            assert_eq!(resp.status, 200, "events of {id}: {}", resp.text());
            let page = resp.json();
            let events = page["events"].as_array().expect("events array").clone();
            let last_seq = page["last_seq"].as_u64().expect("last_seq");
            let next = page["next_cursor"].as_u64().expect("next_cursor");
            if events.is_empty() {
                assert!(
                    next >= last_seq,
                    "empty page before the head: cursor {cursor}, last_seq {last_seq}"
                );
                return out;
            }
            out.extend(events);
            cursor = next;
            if cursor >= last_seq {
                return out;
            }
        }
    }

    pub fn all_events(&self, id: &str) -> Vec<Value> {
        self.events_after(id, 0)
    }

    pub fn session(&self, id: &str) -> Value {
        let resp = self.get(&format!("/v1/sessions/{id}"));
        assert_eq!(resp.status, 200, "GET session {id}: {}", resp.text());
        resp.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- server {} (data dir {}) stderr tail ---\n{}",
                self.opts.name,
                self.data_dir.display(),
                self.stderr_tail(6000)
            );
        } else {
            let _ = fs::remove_dir_all(&self.data_dir);
            let _ = fs::remove_file(&self.log_path);
            for path in &self.cleanup {
                let _ = fs::remove_dir_all(path);
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// `starcite` command with a clean environment (no inherited `STARCITE_*`), run from the
/// workspace root, killed if the test thread that spawned it dies.
pub fn base_command(env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (key, _) in std::env::vars() {
        if key.starts_with("STARCITE_") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// Runs the binary with `args` to completion (at most `timeout`; then kill -9 and
/// `None`). Returns the exit status and stderr.
pub fn run_binary(
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
    stderr_path: &Path,
) -> (Option<ExitStatus>, String) {
    let file = fs::File::create(stderr_path).expect("create stderr file");
    let mut child = base_command(env)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn starcite");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&fs::read(stderr_path).unwrap_or_default()).into_owned();
    (status, stderr)
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Asserts an error reply: status, `error` code, a string `message`. Returns the body.
#[track_caller]
pub fn assert_error(resp: &Resp, status: u16, code: &str) -> Value {
    assert_eq!(
        resp.status,
        status,
        "expected {status} {code}, got {}: {}",
        resp.status,
        resp.text()
    );
    let body = resp.json();
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(body["message"].is_string(), "message missing in {body}");
    body
}

/// Like [`assert_error`], and the `field` member equals `field`.
#[track_caller]
pub fn assert_field_error(resp: &Resp, code: &str, field: &str) -> Value {
    let body = assert_error(resp, 400, code);
    assert_eq!(body["field"], field, "field in {body}");
    body
}

/// Serialises a request. Adds `Host`, and `Content-Length` unless the caller gave a
/// `Content-Length` or `Transfer-Encoding` header (then `body` is sent as is).
pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
    let mut framed = false;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding") {
            framed = true;
        }
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    let needs_length = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if !framed && needs_length {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Reads one response (which may be an interim 1xx) from `r`.
pub fn read_response<R: BufRead>(r: &mut R) -> io::Result<Resp> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status_line = String::from_utf8_lossy(&line).trim_end().to_string();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        ));
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        )
    })?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof in headers",
            ));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            break;
        }
        let (k, v) = text.split_once(':').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad header {text:?}"))
        })?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    let chunked = resp
        .header("transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false);
    if chunked {
        loop {
            line.clear();
            r.read_until(b'\n', &mut line)?;
            let text = String::from_utf8_lossy(&line);
            let size_text = text.trim().split(';').next().unwrap_or("").to_string();
            let size = usize::from_str_radix(&size_text, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {text:?}"),
                )
            })?;
            if size == 0 {
                // trailers until the empty line
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line)? == 0 || line == b"\r\n" || line == b"\n" {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            resp.body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        resp.body = vec![0u8; len];
        r.read_exact(&mut resp.body)?;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// Parses every complete response in `bytes` (e.g. the reply to pipelined requests).
pub fn parse_responses(bytes: &[u8]) -> Vec<Resp> {
    let mut reader = io::Cursor::new(bytes);
    let mut out = Vec::new();
    while (reader.position() as usize) < bytes.len() {
        match read_response(&mut reader) {
            Ok(resp) => out.push(resp),
            Err(_) => break,
        }
    }
    out
}

/// A client connection (keep-alive).
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::try_open(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    pub fn try_open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.writer.set_read_timeout(Some(timeout)).unwrap();
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Reads one response, possibly an interim 1xx.
    pub fn read_response(&mut self) -> io::Result<Resp> {
        read_response(&mut self.reader)
    }

    /// Reads the next final (non-1xx) response.
    pub fn read_final(&mut self) -> io::Result<Resp> {
        loop {
            let resp = self.read_response()?;
            if !(100..200).contains(&resp.status) {
                return Ok(resp);
            }
        }
    }

    pub fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Resp> {
        self.write_raw(&build_request(method, path, headers, body))?;
        self.read_final()
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        self.try_send(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn post_json(&mut self, path: &str, body: &str) -> Resp {
        self.send(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// True when the peer closes the connection (EOF or reset) within `timeout`, with no
    /// further bytes; false on timeout. Bytes received instead are returned as `Err`.
    pub fn closed_within(&mut self, timeout: Duration) -> Result<bool, Vec<u8>> {
        self.set_read_timeout(timeout);
        let mut buf = [0u8; 4096];
        match self.reader.read(&mut buf) {
            Ok(0) => Ok(true),
            Ok(n) => Err(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(_) => Ok(true),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = self.writer.shutdown(Shutdown::Write);
    }
}

/// One request on a fresh connection; I/O errors are returned.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Resp> {
    let mut conn = Conn::try_open(addr)?;
    conn.try_send(method, path, headers, body)
}

/// One request on a fresh connection; panics on I/O errors.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Writes arbitrary bytes on a fresh connection and reads whatever comes back until the
/// server closes or `timeout` passes. Write errors (the server may close early) are
/// ignored.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.flush();
    read_until_close(&mut stream, timeout)
}

/// Like [`raw_exchange`], and asserts that the server closed the connection (after a
/// framing error the server answers and closes).
#[track_caller]
pub fn raw_exchange_closing(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.flush();
    let (out, closed) = read_until_close_flag(&mut stream, timeout);
    assert!(
        closed,
        "connection still open {timeout:?} after {:?}; got {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(200)]),
        String::from_utf8_lossy(&out)
    );
    out
}

/// Reads until EOF/reset or `timeout`.
pub fn read_until_close(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    read_until_close_flag(stream, timeout).0
}

/// Reads until EOF/reset (`true`) or `timeout` (`false`).
pub fn read_until_close_flag(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (out, false);
        }
        stream.set_read_timeout(Some(deadline - now)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (out, true),
        }
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket tail client
// ---------------------------------------------------------------------------------------

pub type WsStream = tungstenite::WebSocket<TcpStream>;

#[derive(Debug)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code (None when the frame had no payload) and reason.
    Close(Option<u16>, String),
    /// The TCP connection ended without (further) frames.
    Eof,
}

pub struct Ws {
    pub ws: WsStream,
}

impl Ws {
    /// Connects `ws://addr{path}`; returns the handshake error as is.
    pub fn try_connect(addr: SocketAddr, path: &str) -> Result<Ws, tungstenite::Error> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Ws::handshake(stream, addr, path)
    }

    /// Like [`Ws::connect`] over a socket whose receive buffer is set to `rcvbuf` bytes
    /// BEFORE connecting (so the TCP window is negotiated for it): the kernel then holds
    /// little of what the server sends, and a reader that stops reading is really slow.
    pub fn connect_small_rcvbuf(addr: SocketAddr, path: &str, rcvbuf: i32) -> Ws {
        let stream =
            connect_with_rcvbuf(addr, rcvbuf).expect("connect with a small receive buffer");
        Ws::handshake(stream, addr, path).unwrap_or_else(|e| panic!("websocket {path}: {e}"))
    }

    fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
    ) -> Result<Ws, tungstenite::Error> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let url = format!("ws://{addr}{path}");
        let ws = match tungstenite::client::client(url, stream) {
            Ok((ws, _response)) => ws,
            Err(tungstenite::HandshakeError::Failure(e)) => return Err(e),
            Err(tungstenite::HandshakeError::Interrupted(mut mid)) => loop {
                match mid.handshake() {
                    Ok((ws, _)) => break ws,
                    Err(tungstenite::HandshakeError::Failure(e)) => return Err(e),
                    Err(tungstenite::HandshakeError::Interrupted(m)) => mid = m,
                }
            },
        };
        Ok(Ws { ws })
    }

    pub fn connect(addr: SocketAddr, path: &str) -> Ws {
        Ws::try_connect(addr, path).unwrap_or_else(|e| panic!("websocket {path}: {e}"))
    }

    /// The next data or close frame, `None` if nothing arrives within `timeout`.
    pub fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        use tungstenite::{Error, Message};
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let remaining = (deadline - now).max(Duration::from_millis(1));
            self.ws.get_mut().set_read_timeout(Some(remaining)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(Frame::Text(t.as_str().to_string())),
                Ok(Message::Binary(b)) => return Some(Frame::Binary(b.to_vec())),
                Ok(Message::Close(cf)) => {
                    return Some(match cf {
                        Some(cf) => {
                            Frame::Close(Some(u16::from(cf.code)), cf.reason.as_str().to_string())
                        }
                        None => Frame::Close(None, String::new()),
                    })
                }
                Ok(_) => continue, // ping/pong
                Err(Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(Error::ConnectionClosed) | Err(Error::AlreadyClosed) | Err(Error::Io(_)) => {
                    return Some(Frame::Eof)
                }
                Err(Error::Protocol(p)) => {
                    // e.g. the server closed TCP without a close frame
                    let _ = p;
                    return Some(Frame::Eof);
                }
                Err(e) => panic!("websocket read: {e}"),
            }
        }
    }

    /// The next frame, parsed as JSON; panics on anything else or on timeout.
    pub fn next_json(&mut self, timeout: Duration) -> Value {
        match self.next_frame(timeout) {
            Some(Frame::Text(t)) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}"))
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads event frames until an event with `seq >= last_seq` arrived and returns the
    /// events in arrival order (arrays are flattened). Panics on a control frame, a close
    /// or when `timeout` passes first.
    pub fn collect_until(&mut self, last_seq: u64, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut events: Vec<Value> = Vec::new();
        loop {
            if let Some(last) = events.last() {
                if last["seq"].as_u64().unwrap_or(0) >= last_seq {
                    return events;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out waiting for seq {last_seq}; got {} events, last {:?}",
                    events.len(),
                    events.last().map(|e| e["seq"].clone())
                );
            }
            let text = match self.next_frame(deadline - now) {
                Some(Frame::Text(t)) => t,
                None => continue,
                other => panic!(
                    "waiting for seq {last_seq}: got {other:?} after {} events (last seq {:?})",
                    events.len(),
                    events.last().map(|e| e["seq"].clone())
                ),
            };
            let frame: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
            match frame {
                Value::Array(items) => events.extend(items),
                Value::Object(ref map) if map.contains_key("seq") => events.push(frame),
                other => panic!("unexpected control frame {other}"),
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// A TCP connection to `addr` (IPv4) with `SO_RCVBUF` set before `connect`.
pub fn connect_with_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> io::Result<TcpStream> {
    use std::os::unix::io::FromRawFd;
    let v4 = match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => return Err(io::Error::other("IPv4 only")),
    };
    // SAFETY: plain socket calls on a descriptor we own; the TcpStream closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Seqs of a list of events.
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            e["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("event without seq: {e}"))
        })
        .collect()
}

/// `true` for `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn is_rfc3339_micros_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 27 {
        return false;
    }
    let digits = [
        0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25,
    ];
    digits.iter().all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
}

/// Percent-encodes everything but unreserved characters.
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Flips one byte of a file in place (bits 0x5A), durably: damage a test plants on disk.
pub fn flip(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5A], at).unwrap();
    file.sync_all().unwrap();
}
