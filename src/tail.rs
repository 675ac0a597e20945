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
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures::future::{select, Either};
use futures::{SinkExt, StreamExt};
use glommio::net::TcpStream;

use crate::http::{Outcome, Request, Response, Shutdown};
use crate::node::{with_timeout, Node};
use crate::ops::{ApiError, Op, Reply};

pub const PING_INTERVAL: Duration = Duration::from_secs(30);
pub const SILENCE_LIMIT: Duration = Duration::from_secs(60);
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

pub struct TailParams {
    pub id: String,
    pub cursor: u64,
    pub batch_size: usize,
    pub buffer_bytes: usize,
}

/// The `Sec-WebSocket-Key` of a valid upgrade request, or None.
pub fn upgrade_key(req: &Request) -> Option<String> {
    let header = |name: &str| {
        req.header(name)
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase())
    };
    let upgrade = header("upgrade")?;
    let connection = header("connection")?;
    let version = header("sec-websocket-version")?;
    let wants_ws = upgrade.split(',').any(|t| t.trim() == "websocket");
    let wants_upgrade = connection.split(',').any(|t| t.trim() == "upgrade");
    if !wants_ws || !wants_upgrade || version.trim() != "13" {
        return None;
    }
    let key = req.header("sec-websocket-key")?;
    let key = std::str::from_utf8(key).ok()?.trim().to_string();
    (!key.is_empty()).then_some(key)
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
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(CLIENT_MESSAGE_BYTES_MAX);
    config.max_frame_size = Some(CLIENT_MESSAGE_BYTES_MAX);
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    let (mut sink, mut incoming) = ws.split();
    let last_heard = Rc::new(Cell::new(Instant::now()));
    let client_gone = Rc::new(Shutdown::new());
    let reader = {
        let last_heard = last_heard.clone();
        let client_gone = client_gone.clone();
        glommio::spawn_local(async move {
            // Reading also answers pings and completes the close handshake.
            while client_item(incoming.next().await.as_ref()) == ClientItem::Heard {
                last_heard.set(Instant::now());
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

/// What the tail's reader does with one item of the client's side of the socket (None
/// is the end of the stream). Pure, so a fuzz target can drive it with any sequence of
/// frames (`shards/fuzz`, target `tail_frames`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientItem {
    /// Any message, data or control (tungstenite has already answered a ping and
    /// replied to a close): the client is alive, read on.
    Heard,
    /// An error (a message over the size limit, a protocol violation, a reset) or the
    /// end of the stream: the client is gone, stop reading.
    Gone,
}

/// The decision of [`ClientItem`] for one item. Frames the client sends are read and
/// ignored (websocket.md); only their arrival counts.
pub fn client_item(
    item: Option<&Result<Message, async_tungstenite::tungstenite::Error>>,
) -> ClientItem {
    match item {
        Some(Ok(_)) => ClientItem::Heard,
        Some(Err(_)) | None => ClientItem::Gone,
    }
}

/// What the tail loop does about the client's liveness before its next read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Silent for more than [`SILENCE_LIMIT`]: close with 1001 "idle".
    Idle,
    /// [`PING_INTERVAL`] since the last ping: send one.
    Ping,
    Fine,
}

/// The liveness decision from the time since the client was last heard (any frame,
/// including the automatic pong) and since the last ping was sent. Silence is checked
/// first: an idle client is closed, not pinged once more.
pub fn liveness(since_heard: Duration, since_ping: Duration) -> Liveness {
    if since_heard > SILENCE_LIMIT {
        Liveness::Idle
    } else if since_ping >= PING_INTERVAL {
        Liveness::Ping
    } else {
        Liveness::Fine
    }
}

type Sink = async_tungstenite::WebSocketSender<TcpStream>;

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
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
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
                if sink.send(Message::Text(gap.into())).await.is_err() {
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
            if sink.send(Message::Text(gap.into())).await.is_err() {
                return None;
            }
            cursor = last_seq;
        }
        first = false;
        if let Some(last) = events.last() {
            cursor = last.0;
        }
        if send_events(sink, &events, params.batch_size).await.is_err() {
            return None;
        }
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
    use async_tungstenite::tungstenite::error::{CapacityError, Error as WsError};

    #[test]
    fn any_client_message_is_heard_and_an_error_or_the_end_means_gone() {
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
            assert_eq!(client_item(Some(&Ok(message))), ClientItem::Heard);
        }
        let too_long = WsError::Capacity(CapacityError::MessageTooLong {
            size: CLIENT_MESSAGE_BYTES_MAX + 1,
            max_size: CLIENT_MESSAGE_BYTES_MAX,
        });
        for error in [too_long, WsError::ConnectionClosed, WsError::AlreadyClosed] {
            assert_eq!(client_item(Some(&Err(error))), ClientItem::Gone);
        }
        assert_eq!(client_item(None), ClientItem::Gone);
    }

    #[test]
    fn a_client_silent_past_the_limit_is_closed_not_pinged() {
        let just = Duration::from_millis(1);
        assert_eq!(
            liveness(SILENCE_LIMIT, PING_INTERVAL - just),
            Liveness::Fine
        );
        assert_eq!(liveness(SILENCE_LIMIT, PING_INTERVAL), Liveness::Ping);
        assert_eq!(
            liveness(SILENCE_LIMIT + just, PING_INTERVAL),
            Liveness::Idle
        );
        assert_eq!(liveness(Duration::ZERO, Duration::ZERO), Liveness::Fine);
    }
}
