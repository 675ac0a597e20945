//! The WebSocket tail: replay from a cursor, then follow live, with no gap and no
//! duplicate at the seam.
//!
//! The tail PULLS from the shard that owns the session: "events after my cursor, at most
//! this many bytes, and if there are none, wait for the next commit". Replay, live
//! following and catch-up after a slow reader are then the same loop, the seam is just
//! the cursor, and a subscriber never holds more than one read (about the per-subscriber
//! byte budget) plus what the socket has not yet taken: a slow reader stops pulling, it
//! never makes the server buffer.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures::future::{select, Either};
use futures::task::{Context, Poll};
use futures::{AsyncRead, AsyncWrite, SinkExt, StreamExt};
use glommio::net::TcpStream;
use shards::tail::{client_item, liveness, ClientItem, FromClient, Liveness, Violation};

use crate::http::{Outcome, Request, Response, Shutdown};
use crate::node::{with_timeout, Node};
use crate::ops::{ApiError, Op, Reply};

/// How long one read waits for a commit before the loop checks pings and silence.
const READ_WAIT: Duration = Duration::from_secs(5);
/// A tail whose next events are only in an unreachable archive retries this often.
const ARCHIVE_RETRY: Duration = Duration::from_millis(500);
/// Largest frame a client may send us (we expect only control frames).
const CLIENT_MESSAGE_BYTES_MAX: usize = 64 << 10;
/// Events one read asks for, at most.
const READ_EVENTS_MAX: usize = 1000;
/// A batch frame stays under this size unless one event alone is larger (API.md).
const FRAME_BYTES_MAX: usize = 1 << 20;
/// tungstenite's read buffer per connection. Clients send only control frames and small
/// messages, and its default (128 KiB) would be most of an idle tailer's memory.
const READ_BUFFER_BYTES: usize = 4 << 10;
/// Frames are queued up to this many bytes before they are written to the socket.
const WRITE_BUFFER_BYTES: usize = 64 << 10;
/// Room in the write buffer for control frames (pongs, close) beyond a full event frame.
const CONTROL_FRAMES_BYTES: usize = 4 << 10;
/// What an event object adds to the text of its request body at most: field names,
/// seq, cursor, `inserted_at`, nulls and defaults.
const EVENT_FIELDS_BYTES: usize = 4 << 10;
/// The longest event frame: `--max-body-bytes` plus [`EVENT_FIELDS_BYTES`], set once at
/// start by [`set_event_bytes_max`].
static EVENT_FRAME_BYTES_MAX: AtomicUsize = AtomicUsize::new(FRAME_BYTES_MAX);
/// A client that violated the protocol (or stopped reading) gets its close frame within
/// this long, or is dropped without it.
const VIOLATION_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Sets the longest event frame from the body limit (called once at start).
pub fn set_event_bytes_max(max_body_bytes: usize) {
    EVENT_FRAME_BYTES_MAX.store(
        max_body_bytes.saturating_add(EVENT_FIELDS_BYTES),
        Ordering::Relaxed,
    );
}

/// Bytes a reading client can leave queued at most: the write buffer plus one frame of
/// the subscriber budget (or one event, if larger). The tail sends a frame only once
/// what it sent before left the write buffer, so only pongs (and a close) go past it.
fn unsent_bytes_max(buffer_bytes: usize) -> usize {
    let frame_max = buffer_bytes
        .max(FRAME_BYTES_MAX)
        .max(EVENT_FRAME_BYTES_MAX.load(Ordering::Relaxed));
    WRITE_BUFFER_BYTES + frame_max
}

/// The WebSocket settings of a tail with a subscriber budget of `buffer_bytes`. What
/// the server queues for one client stays below [`unsent_bytes_max`] plus room for
/// control frames: a client that sends pings and never reads makes the server queue
/// pongs until that bound (tungstenite then keeps only the latest), and is closed
/// (1008) once past [`unsent_bytes_max`].
pub fn ws_config(buffer_bytes: usize) -> WebSocketConfig {
    let mut config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // tungstenite requires it above write_buffer_size (it panics otherwise).
        .max_write_buffer_size(unsent_bytes_max(buffer_bytes) + CONTROL_FRAMES_BYTES);
    config.max_message_size = Some(CLIENT_MESSAGE_BYTES_MAX);
    config.max_frame_size = Some(CLIENT_MESSAGE_BYTES_MAX);
    config
}

/// The socket under a tail's WebSocket. tungstenite hands the socket its whole write
/// buffer at every attempt, so what the last attempt left unwritten is what the client
/// has not taken: the tail's measure of a client that does not read.
struct Metered {
    stream: TcpStream,
    unsent: Rc<Cell<usize>>,
}

impl AsyncRead for Metered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        let unsent = match &polled {
            Poll::Ready(Ok(written)) => buf.len().saturating_sub(*written),
            Poll::Ready(Err(_)) => 0,
            Poll::Pending => buf.len(),
        };
        this.unsent.set(unsent);
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

pub struct TailParams {
    pub id: String,
    pub cursor: u64,
    pub batch_size: usize,
    pub buffer_bytes: usize,
}

/// Why a request cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// Not a WebSocket upgrade (or without a key): 400 `websocket_upgrade_required`.
    NotUpgrade,
    /// A WebSocket upgrade of a version other than 13: 426 with
    /// `Sec-WebSocket-Version: 13` (RFC 6455 §4.2.2, §4.4).
    WrongVersion,
}

/// The `Sec-WebSocket-Key` of a valid upgrade request, or why there is none.
pub fn upgrade_key(req: &Request) -> Result<String, UpgradeRefusal> {
    let header = |name: &str| {
        req.header(name)
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase())
    };
    let not_upgrade = UpgradeRefusal::NotUpgrade;
    let upgrade = header("upgrade").ok_or(not_upgrade)?;
    let connection = header("connection").ok_or(not_upgrade)?;
    let wants_ws = upgrade.split(',').any(|t| t.trim() == "websocket");
    let wants_upgrade = connection.split(',').any(|t| t.trim() == "upgrade");
    if !wants_ws || !wants_upgrade {
        return Err(not_upgrade);
    }
    if header("sec-websocket-version").as_deref().map(str::trim) != Some("13") {
        return Err(UpgradeRefusal::WrongVersion);
    }
    let key = req.header("sec-websocket-key").ok_or(not_upgrade)?;
    let key = std::str::from_utf8(key)
        .map_err(|_| not_upgrade)?
        .trim()
        .to_string();
    if key.is_empty() {
        return Err(not_upgrade);
    }
    Ok(key)
}

/// The answer to a request that cannot be upgraded.
pub fn refuse_upgrade(refusal: UpgradeRefusal) -> Response {
    match refusal {
        UpgradeRefusal::NotUpgrade => Response::error(
            400,
            "websocket_upgrade_required",
            "this endpoint is a WebSocket: send a GET with Upgrade: websocket",
        ),
        UpgradeRefusal::WrongVersion => Response::error(
            426,
            "websocket_version_unsupported",
            "this server speaks WebSocket version 13 (RFC 6455) only",
        )
        .with_header("Sec-WebSocket-Version", "13"),
    }
}

/// The 101 response and the task that runs the tail once the connection is upgraded.
pub fn upgrade(node: Rc<Node>, shutdown: Rc<Shutdown>, key: &str, params: TailParams) -> Outcome {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = Response {
        status: 101,
        headers: vec![
            ("Upgrade".into(), "websocket".into()),
            ("Connection".into(), "Upgrade".into()),
            ("Sec-WebSocket-Accept".into(), accept),
        ],
        body: Vec::new(),
    };
    Outcome::Upgrade {
        response,
        then: Box::new(move |stream, leftover| {
            Box::pin(async move { run(node, shutdown, stream, leftover, params).await })
        }),
    }
}

async fn run(
    node: Rc<Node>,
    shutdown: Rc<Shutdown>,
    stream: TcpStream,
    leftover: Vec<u8>,
    params: TailParams,
) {
    let config = ws_config(params.buffer_bytes);
    let unsent = Rc::new(Cell::new(0));
    let unsent_max = unsent_bytes_max(params.buffer_bytes);
    let stream = Metered {
        stream,
        unsent: unsent.clone(),
    };
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    let (mut sink, mut incoming) = ws.split();
    let last_heard = Rc::new(Cell::new(Instant::now()));
    let client_gone = Rc::new(Shutdown::new());
    let violation: Rc<Cell<Option<&'static str>>> = Rc::new(Cell::new(None));
    let reader = {
        let last_heard = last_heard.clone();
        let client_gone = client_gone.clone();
        let violation = violation.clone();
        glommio::spawn_local(async move {
            // Reading also answers pings and completes the close handshake.
            loop {
                let item = incoming.next().await;
                match client_item(from_client(item.as_ref()), unsent.get(), unsent_max) {
                    ClientItem::Heard => last_heard.set(Instant::now()),
                    ClientItem::Gone(gone) => {
                        violation.set(gone.map(Violation::reason));
                        break;
                    }
                }
            }
            client_gone.trigger();
        })
    };
    node.core.stats.borrow_mut().tail_subscribers += 1;
    let close = follow(
        &node,
        &shutdown,
        &client_gone,
        &mut sink,
        &last_heard,
        &params,
    )
    .await;
    node.core.stats.borrow_mut().tail_subscribers -= 1;
    if let Some(reason) = violation.get() {
        // The client broke the protocol or stopped reading: attempt the close frame,
        // but never wait on this client for long.
        let frame = CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        };
        let closing = async {
            if sink.send(Message::Close(Some(frame))).await.is_ok() {
                let _ = SinkExt::close(&mut sink).await;
            }
        };
        let _ = with_timeout(VIOLATION_CLOSE_TIMEOUT, closing).await;
        return;
    }
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = with_timeout(Duration::from_secs(1), sink.close(Some(frame))).await;
    }
    let _ = with_timeout(Duration::from_secs(1), SinkExt::close(&mut sink)).await;
    // Wait briefly for the client's close frame; a client that never answers does not
    // keep the connection (dropping the reader task cancels it).
    let _ = with_timeout(Duration::from_secs(1), reader).await;
}

type Sink = async_tungstenite::WebSocketSender<Metered>;

/// What one item of the client's side of the socket is to the tail's decisions
/// (`shards::tail`); None is the end of the stream. Read errors the client caused are
/// violations (all answered 1008, API.md); any other error means it just went away.
fn from_client(item: Option<&Result<Message, WsError>>) -> FromClient {
    match item {
        Some(Ok(_)) => FromClient::Message,
        Some(Err(WsError::Protocol(_))) => FromClient::Violation(Violation::Protocol),
        Some(Err(WsError::Capacity(_))) => FromClient::Violation(Violation::MessageTooLarge),
        Some(Err(WsError::Utf8(_))) => FromClient::Violation(Violation::InvalidUtf8),
        Some(Err(_)) | None => FromClient::Left,
    }
}

/// The tail loop. Returns the close frame to send, or None when the client left.
async fn follow(
    node: &Node,
    shutdown: &Shutdown,
    client_gone: &Shutdown,
    sink: &mut Sink,
    last_heard: &Cell<Instant>,
    params: &TailParams,
) -> Option<(CloseCode, &'static str)> {
    let owner = node.owner_of(&params.id);
    let mut cursor = params.cursor;
    let mut last_ping = Instant::now();
    let mut first = true;
    loop {
        if shutdown.is_triggered() {
            return Some((CloseCode::Away, "server shutting down"));
        }
        if client_gone.is_triggered() {
            return None;
        }
        match liveness(last_heard.get().elapsed(), last_ping.elapsed()) {
            Liveness::Idle => return Some((CloseCode::Away, "idle")),
            Liveness::Ping => {
                last_ping = Instant::now();
                if !sent(sink.send(Message::Ping(Vec::new().into())), client_gone).await {
                    return None;
                }
            }
            Liveness::Fine => {}
        }
        let op = Op::Read {
            id: params.id.clone(),
            after: cursor,
            max_events: READ_EVENTS_MAX,
            max_bytes: params.buffer_bytes,
            wait: (!first).then_some(READ_WAIT),
        };
        let Some(reply) = unless_stopped(node.call(owner, op), shutdown, client_gone).await else {
            continue;
        };
        let (events, last_seq) = match reply {
            Reply::Events { events, last_seq } => (events, last_seq),
            Reply::Error(ApiError::SessionNotFound) => {
                return Some((CloseCode::Error, "session not found"))
            }
            // Retention deleted these events and there is no archive: say so, go on.
            Reply::Error(ApiError::EventsExpired {
                first_available_seq,
            }) => {
                let next = first_available_seq - 1;
                let gap = format!(
                    r#"{{"type":"gap","reason":"expired","from_cursor":{cursor},"next_cursor":{next}}}"#
                );
                if !sent(sink.send(Message::Text(gap.into())), client_gone).await {
                    return None;
                }
                cursor = next;
                continue;
            }
            // Only the archive has them and it cannot be read now: the client sees a
            // delay, never a hole.
            Reply::Error(ApiError::ArchiveUnavailable | ApiError::Overloaded) => {
                let pause = glommio::timer::sleep(ARCHIVE_RETRY);
                unless_stopped(pause, shutdown, client_gone).await;
                continue;
            }
            _ => return Some((CloseCode::Error, "internal error")),
        };
        if first && cursor > last_seq {
            let gap = format!(
                r#"{{"type":"gap","reason":"resume_invalidated","from_cursor":{cursor},"next_cursor":{last_seq}}}"#
            );
            if !sent(sink.send(Message::Text(gap.into())), client_gone).await {
                return None;
            }
            cursor = last_seq;
        }
        first = false;
        if let Some(last) = events.last() {
            cursor = last.0;
        }
        if !sent(send_events(sink, &events, params.batch_size), client_gone).await {
            return None;
        }
    }
}

/// Whether a send completed, unless the client left first: a client that stops reading
/// blocks a send until its reader fails (pongs past the write buffer bound), and must
/// not keep the tail waiting on it.
async fn sent<E>(
    send: impl std::future::Future<Output = Result<(), E>>,
    client_gone: &Shutdown,
) -> bool {
    match select(Box::pin(send), Box::pin(client_gone.wait())).await {
        Either::Left((result, _)) => result.is_ok(),
        Either::Right(_) => false,
    }
}

/// Runs `work` unless the server shuts down or the client leaves first (then None).
async fn unless_stopped<T>(
    work: impl std::future::Future<Output = T>,
    shutdown: &Shutdown,
    client_gone: &Shutdown,
) -> Option<T> {
    let stop = select(Box::pin(shutdown.wait()), Box::pin(client_gone.wait()));
    match select(Box::pin(work), stop).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(_) => None,
    }
}

/// Sends events as single-event frames (batch_size 1) or JSON arrays of up to
/// `batch_size` events and about `FRAME_BYTES_MAX` bytes.
async fn send_events(
    sink: &mut Sink,
    events: &[(u64, Arc<str>)],
    batch_size: usize,
) -> Result<(), async_tungstenite::tungstenite::Error> {
    if batch_size == 1 {
        for (_, text) in events {
            sink.feed(Message::Text(text.as_ref().into())).await?;
        }
        return sink.flush().await;
    }
    let mut start = 0;
    while start < events.len() {
        let mut frame = String::from("[");
        let mut count = 0;
        while start + count < events.len() && count < batch_size {
            let text = &events[start + count].1;
            if count > 0 && frame.len() + text.len() + 2 > FRAME_BYTES_MAX {
                break;
            }
            if count > 0 {
                frame.push(',');
            }
            frame.push_str(text);
            count += 1;
        }
        frame.push(']');
        sink.feed(Message::Text(frame.into())).await?;
        start += count;
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};

    #[test]
    fn any_client_message_is_heard_and_errors_the_client_caused_are_violations() {
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        for message in [
            Message::Text("x".into()),
            Message::Binary(vec![0u8; 3].into()),
            Message::Ping(Vec::new().into()),
            Message::Pong(Vec::new().into()),
            Message::Close(Some(close)),
            Message::Close(None),
        ] {
            assert_eq!(from_client(Some(&Ok(message))), FromClient::Message);
        }
        let too_long = WsError::Capacity(CapacityError::MessageTooLong {
            size: CLIENT_MESSAGE_BYTES_MAX + 1,
            max_size: CLIENT_MESSAGE_BYTES_MAX,
        });
        let unmasked = WsError::Protocol(ProtocolError::UnmaskedFrameFromClient);
        assert_eq!(
            from_client(Some(&Err(too_long))),
            FromClient::Violation(Violation::MessageTooLarge)
        );
        assert_eq!(
            from_client(Some(&Err(unmasked))),
            FromClient::Violation(Violation::Protocol)
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for error in [
            WsError::ConnectionClosed,
            WsError::AlreadyClosed,
            WsError::Io(reset),
        ] {
            assert_eq!(from_client(Some(&Err(error))), FromClient::Left);
        }
        assert_eq!(from_client(None), FromClient::Left);
    }
}
