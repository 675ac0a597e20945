//! A TCP proxy that holds every byte for a set time before passing it on: network delay
//! for tests on a kernel without `netem`.
//!
//! A [`DelayProxy`] listens on one address and forwards each connection it accepts to one
//! target. Each direction of a connection is a reader thread that stamps every chunk it
//! reads with the time it may leave (`now + delay`) and a writer thread that waits until
//! then and writes it, so bytes arrive `delay` later and in order without the delay
//! limiting throughput. The delay can be changed at any time ([`DelayProxy::set_delay`]);
//! chunks already read keep their stamp.
//!
//! Bounded: at most [`CONNECTIONS_MAX`] connections at once (more are closed at accept),
//! at most [`CHUNKS_IN_FLIGHT_MAX`] chunks held per direction (then the reader waits,
//! and TCP pushes back on the sender), a write blocked for [`WRITE_TIMEOUT`] closes the
//! connection, and every thread polls a stop flag, so dropping the proxy ends it within
//! a few tens of milliseconds (at most the write timeout).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Connections forwarded at once.
pub const CONNECTIONS_MAX: usize = 32;
/// Chunks read but not yet written, per direction of a connection.
pub const CHUNKS_IN_FLIGHT_MAX: usize = 1024;
/// Largest chunk read at once.
const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A write blocked this long (the receiver stopped reading) closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// State shared by the accept thread and every forwarding thread.
struct Shared {
    target: SocketAddr,
    delay_ms: AtomicU64,
    stop: AtomicBool,
    connections: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Forwards connections from `addr()` to a target, each byte `delay` late.
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0: any free port) and forwards to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            delay_ms: AtomicU64::new(delay.as_millis() as u64),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = shared.clone();
            thread::spawn(move || accept_loop(&listener, &shared))
        };
        DelayProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The delay of the bytes read from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = delay.as_millis() as u64;
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        if shared.connections.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            continue; // dropped: closed
        }
        let Ok(server) = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) else {
            continue; // the client sees its connection closed, as if the target refused
        };
        forward(client, server, shared);
    }
}

/// Starts the four threads of one connection: a reader and a writer per direction.
fn forward(client: TcpStream, server: TcpStream, shared: &Arc<Shared>) {
    // `&TcpStream` reads and writes, so the four threads share the two sockets.
    let sockets = Arc::new([client, server]);
    for socket in sockets.iter() {
        let set = socket
            .set_nonblocking(false)
            .and_then(|()| socket.set_read_timeout(Some(POLL)))
            .and_then(|()| socket.set_write_timeout(Some(WRITE_TIMEOUT)))
            .and_then(|()| socket.set_nodelay(true));
        if set.is_err() {
            return; // both dropped: closed
        }
    }
    shared.connections.fetch_add(1, Ordering::SeqCst);
    // The last of the four threads to end counts the connection as gone.
    let alive = Arc::new(AtomicUsize::new(4));
    let mut handles = Vec::new();
    for (from, to) in [(0, 1), (1, 0)] {
        let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT_MAX);
        let (sockets_r, shared_r, alive_r) = (sockets.clone(), shared.clone(), alive.clone());
        handles.push(thread::spawn(move || {
            read_side(&sockets_r[from], &tx, &shared_r);
            finish(&sockets_r, &shared_r, &alive_r);
        }));
        let (sockets_w, shared_w, alive_w) = (sockets.clone(), shared.clone(), alive.clone());
        handles.push(thread::spawn(move || {
            write_side(&sockets_w[to], &rx, &shared_w);
            finish(&sockets_w, &shared_w, &alive_w);
        }));
    }
    shared.threads.lock().unwrap().extend(handles);
}

/// Whichever thread of a connection ends first closes both sockets, so all four end.
fn finish(sockets: &[TcpStream; 2], shared: &Shared, alive: &AtomicUsize) {
    for socket in sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
    if alive.fetch_sub(1, Ordering::SeqCst) == 1 {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads chunks from `from` and queues each with the time it may be written.
fn read_side(mut from: &TcpStream, tx: &SyncSender<(Instant, Vec<u8>)>, shared: &Shared) {
    let mut buf = vec![0u8; CHUNK_BYTES_MAX];
    while !shared.stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let delay = Duration::from_millis(shared.delay_ms.load(Ordering::SeqCst));
        let mut chunk = (Instant::now() + delay, buf[..n].to_vec());
        // A full queue waits for the writer (bounded by the stop flag).
        loop {
            match tx.try_send(chunk) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    chunk = back;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// Writes each queued chunk to `to` once its time has come.
fn write_side(mut to: &TcpStream, rx: &Receiver<(Instant, Vec<u8>)>, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (due, bytes) = match rx.recv_timeout(POLL) {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Sleeps at most the delay set when the chunk was read.
        let wait = due.saturating_duration_since(Instant::now());
        thread::sleep(wait);
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
}
