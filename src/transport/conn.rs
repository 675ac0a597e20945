//! One connection's life: dial or accept, handshake, then a reader and a writer until
//! either fails, the connection is replaced, or the transport shuts down.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::sleep;
use shards::wire::{
    decode_frame, encode_frame, FrameError, Handshake, FRAME_HEADER_BYTES, FRAME_PAYLOAD_BYTES_MAX,
};

use super::backoff::Backoff;
use super::{
    ConnHandle, Incoming, Shared, CONNECT_TIMEOUT, HANDSHAKES_PENDING_MAX, HANDSHAKE_TIMEOUT,
    UNACKED_TIMEOUT,
};

/// Bytes asked of the socket per read; the buffer grows beyond it only for a larger frame.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// A writer keeps a buffer up to this size between batches; a larger one is freed.
const WRITE_BUFFER_KEPT_BYTES_MAX: usize = 1 << 20;
/// A handshake frame is a few hundred bytes; anything announcing more is refused.
const HANDSHAKE_BYTES_MAX: usize = 4 << 10;

/// Sets `TCP_USER_TIMEOUT` to [`UNACKED_TIMEOUT`]; a failure is logged (the connection
/// still works, it only notices a partition's end later).
fn set_unacked_timeout(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(UNACKED_TIMEOUT.as_millis()).expect("timeout fits in u32");
    // SAFETY: setsockopt on the stream's own open descriptor, with a pointer to a c_uint
    // that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "setting TCP_USER_TIMEOUT on a peer connection failed");
    }
}

pub(super) fn handshake_frame(ours: &Handshake) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(&ours.encode(), &mut frame);
    frame
}

/// The frame that tells a peer why we refuse it (see the module docs of `transport`).
fn refusal_frame(reason: &str) -> Vec<u8> {
    let payload = shards::peer::encode(&shards::peer::PeerFrame::Refused {
        reason: reason.to_string(),
    });
    let mut frame = Vec::new();
    encode_frame(&payload, &mut frame);
    frame
}

/// Why a peer's handshake is refused.
enum Refusal {
    /// Closed without a word (another cluster, a miswired port, ...): the peer's
    /// handshake check says why on its side, or ours is logged here.
    Silent(String),
    /// The peer itself must be repaired: it is told why before the connection closes.
    Tell(String),
}

/// Why a connection (or an attempt at one) ended.
#[derive(Debug)]
enum ConnEnd {
    Io(std::io::Error),
    BadFrame(FrameError),
    /// The peer closed its end.
    Eof,
    /// A newer connection to the same peer took over, or the transport shut down.
    Replaced,
    /// Nobody receives incoming frames any more.
    ConsumerGone,
    /// The peer refused us, with this reason (its first frame).
    Refused(String),
}

impl std::fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnEnd::Io(e) => write!(f, "i/o error: {e}"),
            ConnEnd::BadFrame(e) => write!(f, "bad frame: {e}"),
            ConnEnd::Eof => write!(f, "closed by the peer"),
            ConnEnd::Replaced => write!(f, "replaced or shut down"),
            ConnEnd::ConsumerGone => write!(f, "incoming frames have no consumer"),
            ConnEnd::Refused(reason) => write!(f, "refused by the peer: {reason}"),
        }
    }
}

/// `f`, or `None` when it takes longer than `limit`.
async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        sleep(limit).await;
        None
    })
    .await
}

/// Accepts connections until the transport shuts down; each one handshakes on its own.
pub(super) async fn accept_loop(shared: Rc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) if shared.handshakes_pending.get() >= HANDSHAKES_PENDING_MAX => {
                tracing::warn!(
                    limit = HANDSHAKES_PENDING_MAX,
                    "too many peer connections are handshaking; closing a new one"
                );
                drop(stream);
            }
            Ok(stream) => {
                shared
                    .handshakes_pending
                    .set(shared.handshakes_pending.get() + 1);
                let pending = PendingHandshake(shared.clone());
                shared.spawn(async move {
                    let shared = pending.0.clone();
                    accept_one(&shared, stream, pending).await
                });
            }
            Err(e) => {
                // Usually out of file descriptors: pause instead of spinning.
                tracing::warn!(error = %e, "accepting a peer connection failed");
                sleep(shared.config.reconnect_backoff_max).await;
            }
        }
    }
}

/// Counts a handshaking accepted connection until dropped (also when its task is).
struct PendingHandshake(Rc<Shared>);

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let pending = &self.0.handshakes_pending;
        pending.set(pending.get() - 1);
    }
}

/// The acceptor's side of the handshake: check theirs, then answer with ours.
async fn accept_one(shared: &Rc<Shared>, mut stream: TcpStream, pending: PendingHandshake) {
    let remote = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    set_unacked_timeout(&stream);
    let mut reader = FrameReader::new();
    let theirs = match within(HANDSHAKE_TIMEOUT, reader.next_frame(&mut stream)).await {
        Some(Ok(Some(bytes))) => bytes,
        Some(Ok(None)) => return,
        Some(Err(e)) => {
            tracing::debug!(%remote, error = %e, "peer connection failed before its handshake");
            return;
        }
        None => {
            tracing::warn!(%remote, "peer sent no handshake in time; closing");
            return;
        }
    };
    let (peer_id, incarnation) = match check_handshake(shared, &theirs, None) {
        Ok(peer) => peer,
        Err(Refusal::Silent(reason)) => {
            tracing::warn!(%remote, %reason, "refusing peer connection");
            shared.bump(|s| s.handshakes_refused += 1);
            return;
        }
        Err(Refusal::Tell(reason)) => {
            // Our half of the handshake, then why: the peer's log says it too.
            let mut bytes = shared.handshake_frame.clone();
            bytes.extend_from_slice(&refusal_frame(&reason));
            let _ = within(HANDSHAKE_TIMEOUT, stream.write_all(&bytes)).await;
            return;
        }
    };
    if let Err(e) = stream.write_all(&shared.handshake_frame).await {
        tracing::debug!(peer = peer_id, error = %e, "answering the handshake failed");
        return;
    }
    drop(pending);
    run(shared, peer_id, incarnation, stream, reader).await;
}

/// Decodes and checks a peer's handshake; the peer's node id and process incarnation
/// when it may talk to us.
fn check_handshake(
    shared: &Shared,
    bytes: &[u8],
    expected: Option<u64>,
) -> Result<(u64, u64), Refusal> {
    let silent = |e: String| Refusal::Silent(e);
    let theirs = Handshake::decode(bytes).map_err(|e| silent(e.to_string()))?;
    shared
        .config
        .handshake
        .accept(&theirs, &shared.config.members)
        .map_err(|e| silent(e.to_string()))?;
    match expected {
        Some(expected) if theirs.node_id != expected => {
            return Err(silent(format!(
                "expected node {expected} at this address, found node {}",
                theirs.node_id
            )));
        }
        // The lower node id dials. Taking a connection from a higher one as well would
        // leave two connections to one peer replacing each other forever.
        None if theirs.node_id > shared.config.node_id => {
            return Err(silent(format!(
                "node {} dialled us, but we dial it (the lower node id dials)",
                theirs.node_id
            )));
        }
        _ => {}
    }
    if !shared.peers.borrow().contains_key(&theirs.node_id) {
        return Err(silent(format!(
            "node {} has no peer address here",
            theirs.node_id
        )));
    }
    check_incarnation(shared, &theirs)?;
    Ok((theirs.node_id, theirs.incarnation))
}

/// A node we know must come back with the data dir we knew (`incarnations`); one we
/// never met is remembered from now on.
fn check_incarnation(shared: &Shared, theirs: &Handshake) -> Result<(), Refusal> {
    let node = theirs.node_id;
    let known = shared.incarnations.borrow().get(node);
    if let Err(e) = shards::wire::check_data_incarnation(theirs, known) {
        let reason = e.to_string();
        shared.bump(|s| {
            s.handshakes_refused += 1;
            s.new_data_dir_refusals += 1;
        });
        if shared.should_log_refusal(node) {
            tracing::error!(peer = node, %reason, "refusing peer");
        }
        return Err(Refusal::Tell(reason));
    }
    if known.is_none() {
        tracing::info!(
            peer = node,
            incarnation = %crate::datadir::format_incarnation(theirs.data_incarnation),
            "remembering the data dir incarnation of a new peer"
        );
    }
    shared
        .incarnations
        .borrow_mut()
        .record(node, theirs.data_incarnation)
        .map_err(Refusal::Silent)
}

/// Keeps one connection to a peer with a higher node id, redialling with backoff.
pub(super) async fn dial_loop(shared: Rc<Shared>, peer_id: u64, addr: SocketAddr) {
    let config = &shared.config;
    let seed = config.node_id.rotate_left(32) ^ (u64::from(config.shard) << 16) ^ peer_id;
    let mut backoff = Backoff::new(
        config.reconnect_backoff_min,
        config.reconnect_backoff_max,
        seed,
    );
    loop {
        let wait = match dial_once(&shared, peer_id, addr).await {
            Dial::Ran => {
                backoff.reset();
                backoff.next_wait()
            }
            Dial::Failed => backoff.next_wait(),
            Dial::Refused => backoff.refused_wait(),
        };
        sleep(wait).await;
    }
}

enum Dial {
    /// Handshaken, used, and now closed.
    Ran,
    Failed,
    Refused,
}

/// The dialer's side: connect, send our handshake, check theirs, then run.
async fn dial_once(shared: &Rc<Shared>, peer_id: u64, addr: SocketAddr) -> Dial {
    let mut stream = match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(peer = peer_id, %addr, error = %e, "dialling peer failed");
            shared.bump(|s| s.dial_failures += 1);
            return Dial::Failed;
        }
    };
    let _ = stream.set_nodelay(true);
    set_unacked_timeout(&stream);
    let mut reader = FrameReader::new();
    let answer = async {
        stream.write_all(&shared.handshake_frame).await?;
        reader.next_frame(&mut stream).await.map_err(|e| match e {
            ConnEnd::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
    };
    let theirs = match within(HANDSHAKE_TIMEOUT, answer).await {
        Some(Ok(Some(bytes))) => bytes,
        Some(Ok(None)) => {
            tracing::warn!(
                peer = peer_id,
                %addr,
                "peer closed the connection during the handshake: it refused us (its log says why)"
            );
            shared.bump(|s| s.handshakes_refused += 1);
            return Dial::Refused;
        }
        Some(Err(e)) => {
            tracing::debug!(peer = peer_id, %addr, error = %e, "handshake with peer failed");
            shared.bump(|s| s.dial_failures += 1);
            return Dial::Failed;
        }
        None => {
            tracing::warn!(peer = peer_id, %addr, "peer answered no handshake in time");
            shared.bump(|s| s.dial_failures += 1);
            return Dial::Failed;
        }
    };
    let incarnation = match check_handshake(shared, &theirs, Some(peer_id)) {
        Ok((_, incarnation)) => incarnation,
        Err(Refusal::Silent(reason)) => {
            tracing::warn!(peer = peer_id, %addr, %reason, "refusing peer");
            shared.bump(|s| s.handshakes_refused += 1);
            return Dial::Refused;
        }
        Err(Refusal::Tell(reason)) => {
            let _ = within(HANDSHAKE_TIMEOUT, stream.write_all(&refusal_frame(&reason))).await;
            return Dial::Refused;
        }
    };
    match run(shared, peer_id, incarnation, stream, reader).await {
        ConnEnd::Refused(_) => Dial::Refused,
        _ => Dial::Ran,
    }
}

/// Runs a handshaken connection until it fails or is replaced; says how it ended.
async fn run(
    shared: &Rc<Shared>,
    peer_id: u64,
    incarnation: u64,
    stream: TcpStream,
    mut reader: FrameReader,
) -> ConnEnd {
    reader.handshake_done();
    let Some(incoming) = shared.incoming.borrow().clone() else {
        return ConnEnd::ConsumerGone;
    };
    let (close_tx, close_rx) = oneshot::channel::<()>();
    let (wake_tx, wake_rx) = local_channel::new_bounded(1);
    let conn_id = shared.next_conn_id.get();
    shared.next_conn_id.set(conn_id + 1);
    let handle = ConnHandle {
        id: conn_id,
        _close: close_tx,
        wake: wake_tx,
    };
    if !register(shared, peer_id, incarnation, handle) {
        return ConnEnd::Replaced;
    }
    tracing::info!(peer = peer_id, conn = conn_id, incarnation = %format!("{incarnation:016x}"), "peer connected");
    let (read_half, write_half) = stream.split();
    let read = read_loop(shared, peer_id, conn_id, read_half, reader, incoming);
    let write = write_loop(shared, peer_id, conn_id, write_half, wake_rx);
    let closed = async {
        let _ = close_rx.await;
        ConnEnd::Replaced
    };
    let end = futures_lite::future::or(read, futures_lite::future::or(write, closed)).await;
    match &end {
        ConnEnd::BadFrame(_) => {
            shared.bump(|s| s.frame_errors += 1);
            tracing::warn!(peer = peer_id, conn = conn_id, reason = %end, "closing peer connection");
        }
        ConnEnd::Refused(reason) => {
            shared.bump(|s| s.handshakes_refused += 1);
            if shared.should_log_refusal(peer_id) {
                tracing::error!(peer = peer_id, %reason, "refused by peer");
            }
            shared
                .refused_by
                .borrow_mut()
                .insert(peer_id, reason.clone());
        }
        _ => tracing::info!(peer = peer_id, conn = conn_id, reason = %end, "peer disconnected"),
    }
    deregister(shared, peer_id, conn_id);
    end
}

/// Makes `handle` the peer's connection, closing an older one (keep the newest). Frames
/// queued for an earlier process of the peer are dropped (see "Incarnations").
fn register(shared: &Shared, peer_id: u64, incarnation: u64, handle: ConnHandle) -> bool {
    let mut peers = shared.peers.borrow_mut();
    let Some(peer) = peers.get_mut(&peer_id) else {
        return false;
    };
    let reconnect = peer.ever_connected;
    let mut lost = peer.inflight_frames;
    if peer
        .process_incarnation
        .is_some_and(|known| known != incarnation)
        && peer.pending_frames > 0
    {
        tracing::info!(
            peer = peer_id,
            frames = peer.pending_frames,
            "peer restarted: dropping the frames queued for its earlier process"
        );
        lost += std::mem::take(&mut peer.pending_frames);
        peer.pending = Vec::new();
    }
    peer.process_incarnation = Some(incarnation);
    if let Some(old) = peer.conn.replace(handle) {
        tracing::info!(
            peer = peer_id,
            old = old.id,
            "a newer connection replaces the old one"
        );
    }
    peer.ever_connected = true;
    peer.inflight_bytes = 0;
    peer.inflight_frames = 0;
    if peer.pending_frames > 0 {
        let _ = peer.conn.as_ref().expect("just set").wake.try_send(());
    }
    drop(peers);
    shared.bump(|s| {
        s.connects += 1;
        s.reconnects += u64::from(reconnect);
        s.frames_dropped += lost;
    });
    true
}

/// Forgets connection `conn_id` unless a newer one already replaced it; the frames it
/// was writing are lost.
fn deregister(shared: &Shared, peer_id: u64, conn_id: u64) {
    let mut peers = shared.peers.borrow_mut();
    let Some(peer) = peers.get_mut(&peer_id) else {
        return;
    };
    if peer.conn.as_ref().map(|c| c.id) != Some(conn_id) {
        return;
    }
    peer.conn = None;
    let lost = std::mem::take(&mut peer.inflight_frames);
    peer.inflight_bytes = 0;
    drop(peers);
    shared.bump(|s| s.frames_dropped += lost);
}

/// Delivers every frame from the peer; stops reading while the consumer lags.
async fn read_loop(
    shared: &Shared,
    peer_id: u64,
    conn_id: u64,
    mut stream: impl AsyncRead + Unpin,
    mut reader: FrameReader,
    incoming: Rc<local_channel::LocalSender<Incoming>>,
) -> ConnEnd {
    let mut first = true;
    loop {
        let payload = match reader.next_frame(&mut stream).await {
            Ok(Some(payload)) => payload,
            Ok(None) => return ConnEnd::Eof,
            Err(end) => return end,
        };
        if std::mem::take(&mut first) {
            // A refusal can only be the first frame after the handshake.
            if let Ok(shards::peer::PeerFrame::Refused { reason }) = shards::peer::decode(&payload)
            {
                return ConnEnd::Refused(reason);
            }
            shared.refused_by.borrow_mut().remove(&peer_id);
        }
        let bytes = (FRAME_HEADER_BYTES + payload.len()) as u64;
        shared.bump(|s| {
            s.frames_received += 1;
            s.bytes_received += bytes;
        });
        let frame = Incoming {
            from: peer_id,
            conn: conn_id,
            payload,
        };
        if incoming.send(frame).await.is_err() {
            return ConnEnd::ConsumerGone;
        }
        // A peer that keeps the socket full must not starve the shard's other tasks.
        glommio::yield_if_needed().await;
    }
}

/// Writes everything queued for the peer, one write call per batch of frames.
async fn write_loop(
    shared: &Shared,
    peer_id: u64,
    conn_id: u64,
    mut stream: impl AsyncWrite + Unpin,
    wake: LocalReceiver<()>,
) -> ConnEnd {
    let mut batch = Vec::new();
    loop {
        let Some(frames) = take_batch(shared, peer_id, conn_id, &mut batch) else {
            return ConnEnd::Replaced;
        };
        if frames == 0 {
            if wake.recv().await.is_none() {
                return ConnEnd::Replaced;
            }
            continue;
        }
        if let Err(e) = stream.write_all(&batch).await {
            return ConnEnd::Io(e);
        }
        let bytes = batch.len() as u64;
        {
            let mut peers = shared.peers.borrow_mut();
            if let Some(peer) = peers.get_mut(&peer_id) {
                if peer.conn.as_ref().map(|c| c.id) == Some(conn_id) {
                    peer.inflight_bytes = 0;
                    peer.inflight_frames = 0;
                }
            }
        }
        shared.bump(|s| {
            s.frames_sent += frames;
            s.bytes_sent += bytes;
            s.writes += 1;
        });
        batch.clear();
        glommio::yield_if_needed().await;
        if batch.capacity() > WRITE_BUFFER_KEPT_BYTES_MAX {
            batch = Vec::new();
        }
    }
}

/// Swaps the peer's queued frames into `batch` (empty on entry) and marks them in
/// flight. `None` when `conn_id` is no longer the peer's connection.
fn take_batch(shared: &Shared, peer_id: u64, conn_id: u64, batch: &mut Vec<u8>) -> Option<u64> {
    debug_assert!(batch.is_empty());
    let mut peers = shared.peers.borrow_mut();
    let peer = peers.get_mut(&peer_id)?;
    if peer.conn.as_ref().map(|c| c.id) != Some(conn_id) {
        return None;
    }
    let frames = std::mem::take(&mut peer.pending_frames);
    std::mem::swap(&mut peer.pending, batch);
    peer.inflight_bytes = batch.len();
    peer.inflight_frames = frames;
    Some(frames)
}

/// Splits a byte stream into frames, keeping the bytes of a partial frame between reads.
pub(super) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Until the handshake is done, a stranger may not make us buffer a large frame.
    payload_bytes_max: usize,
}

impl FrameReader {
    /// A reader for a new connection, which accepts only a handshake-sized frame.
    pub(super) fn new() -> FrameReader {
        FrameReader {
            buf: vec![0; READ_CHUNK_BYTES],
            start: 0,
            end: 0,
            payload_bytes_max: HANDSHAKE_BYTES_MAX,
        }
    }

    /// After the handshake: frames up to the wire format's bound.
    fn handshake_done(&mut self) {
        self.payload_bytes_max = FRAME_PAYLOAD_BYTES_MAX;
    }

    /// The next frame's payload; `None` at end of stream.
    async fn next_frame(
        &mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> Result<Option<Vec<u8>>, ConnEnd> {
        loop {
            match decode_frame(&self.buf[self.start..self.end]) {
                Ok(Some((payload, used))) => {
                    let payload = payload.to_vec();
                    self.start += used;
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(Some(payload));
                }
                Ok(None) => {}
                Err(e) => return Err(ConnEnd::BadFrame(e)),
            }
            self.check_announced_length()?;
            self.make_room();
            let n = stream
                .read(&mut self.buf[self.end..])
                .await
                .map_err(ConnEnd::Io)?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }

    fn check_announced_length(&self) -> Result<(), ConnEnd> {
        if self.end - self.start < FRAME_HEADER_BYTES {
            return Ok(());
        }
        let header = &self.buf[self.start..self.start + 4];
        let len = u32::from_le_bytes(header.try_into().expect("4 bytes"));
        if len as usize > self.payload_bytes_max {
            return Err(ConnEnd::BadFrame(FrameError::LengthOutOfRange { len }));
        }
        Ok(())
    }

    /// Ensures free space after `end` for the rest of the frame in progress (whose
    /// length `decode_frame` has already checked against the bound).
    fn make_room(&mut self) {
        let have = self.end - self.start;
        let needed = if have >= FRAME_HEADER_BYTES {
            let header = &self.buf[self.start..self.start + 4];
            FRAME_HEADER_BYTES + u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize
        } else {
            FRAME_HEADER_BYTES
        };
        debug_assert!(have < needed);
        if have == 0 && self.buf.len() > 4 * READ_CHUNK_BYTES {
            // A large frame passed; do not keep its buffer for the connection's life.
            self.buf = vec![0; READ_CHUNK_BYTES];
            self.start = 0;
            self.end = 0;
        }
        let free_after = self.buf.len() - self.end;
        if self.start > 0
            && (free_after < READ_CHUNK_BYTES / 2 || self.buf.len() - self.start < needed)
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.end = have;
            self.start = 0;
        }
        if self.buf.len() - self.start < needed {
            self.buf.resize(self.start + needed, 0);
        }
        assert!(self.end < self.buf.len(), "no room to read into");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_reader_reassembles_frames_split_across_reads() {
        let mut stream = Vec::new();
        encode_frame(b"a", &mut stream);
        encode_frame(&vec![9u8; 3 * READ_CHUNK_BYTES], &mut stream);
        encode_frame(b"bc", &mut stream);
        // A reader that hands out at most 1000 bytes per read.
        struct Trickle(Vec<u8>, usize);
        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut [u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let n = buf.len().min(1000).min(self.0.len() - self.1);
                let at = self.1;
                buf[..n].copy_from_slice(&self.0[at..at + n]);
                self.1 += n;
                std::task::Poll::Ready(Ok(n))
            }
        }
        let mut src = Trickle(stream, 0);
        let mut reader = FrameReader::new();
        reader.handshake_done();
        let next = |r: &mut FrameReader, s: &mut Trickle| {
            futures_lite::future::block_on(r.next_frame(s)).unwrap()
        };
        assert_eq!(next(&mut reader, &mut src).unwrap(), b"a");
        assert_eq!(
            next(&mut reader, &mut src).unwrap().len(),
            3 * READ_CHUNK_BYTES
        );
        assert_eq!(next(&mut reader, &mut src).unwrap(), b"bc");
        assert!(next(&mut reader, &mut src).is_none());
    }

    #[test]
    fn before_the_handshake_a_large_frame_is_refused_unread() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&(1u32 << 20).to_le_bytes());
        stream.extend_from_slice(&[0u8; 4]);
        let mut src = futures::io::Cursor::new(stream);
        let mut reader = FrameReader::new();
        let got = futures_lite::future::block_on(reader.next_frame(&mut src));
        assert!(matches!(
            got,
            Err(ConnEnd::BadFrame(FrameError::LengthOutOfRange { len })) if len == 1 << 20
        ));
        assert_eq!(reader.buf.len(), READ_CHUNK_BYTES);
    }
}
