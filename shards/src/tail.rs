//! What a WebSocket tail decides about its client (websocket.md, "Liveness and close
//! codes"): whether what arrived from the client keeps it alive or ends the tail (and
//! with which close reason), and when to ping it or close it as idle. The shell
//! (`src/tail.rs`) classifies tungstenite's items into [`FromClient`] and runs the
//! timers; the decisions are here so that the fuzz target `tail_frames` drives them
//! with any sequence of frames without the shell's dependencies.

use std::time::Duration;

/// A ping is sent after this long without one.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A client silent for longer than this (no frame at all, not even a pong) is closed
/// with 1001 "idle".
pub const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// One item of the client's side of the socket, as the shell's WebSocket library
/// delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromClient {
    /// Any message, data or control (the library has already answered a ping and
    /// replied to a close).
    Message,
    /// A read error the client caused.
    Violation(Violation),
    /// A read error that is not a violation (a reset, a closed connection), or the end
    /// of the stream.
    Left,
}

/// Why the tail closes a client with 1008 (API.md: protocol violations, a message over
/// the size limit and a client that does not read are all answered with 1008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    Protocol,
    MessageTooLarge,
    InvalidUtf8,
    /// The server queued more for the client (pongs) than the bound on unsent bytes.
    NotReading,
}

impl Violation {
    /// The reason in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Violation::Protocol => "protocol violation",
            Violation::MessageTooLarge => "message too large",
            Violation::InvalidUtf8 => "invalid UTF-8 in a text message",
            Violation::NotReading => "the client does not read what it asked for",
        }
    }
}

/// What the tail's reader does with one item from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientItem {
    /// The client is alive: read on.
    Heard,
    /// The client is gone: stop reading. With a violation, the tail attempts a 1008
    /// close frame with its reason; without, the client just went away.
    Gone(Option<Violation>),
}

/// The decision for one item, given the bytes the server has queued for this client
/// and not yet written (`unsent_bytes`) and their bound. Frames the client sends are
/// read and ignored (websocket.md); only their arrival counts. Each message may have
/// made the server queue a pong, so a message that finds the queue past its bound
/// ends the tail: a client that pings and never reads cannot grow the server.
pub fn client_item(from: FromClient, unsent_bytes: usize, unsent_bytes_max: usize) -> ClientItem {
    match from {
        FromClient::Message if unsent_bytes > unsent_bytes_max => {
            ClientItem::Gone(Some(Violation::NotReading))
        }
        FromClient::Message => ClientItem::Heard,
        FromClient::Violation(violation) => ClientItem::Gone(Some(violation)),
        FromClient::Left => ClientItem::Gone(None),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_client_message_is_heard_and_an_error_or_the_end_means_gone() {
        assert_eq!(client_item(FromClient::Message, 0, 10), ClientItem::Heard);
        assert_eq!(client_item(FromClient::Message, 10, 10), ClientItem::Heard);
        assert_eq!(client_item(FromClient::Left, 0, 10), ClientItem::Gone(None));
        for violation in [
            Violation::Protocol,
            Violation::MessageTooLarge,
            Violation::InvalidUtf8,
        ] {
            assert_eq!(
                client_item(FromClient::Violation(violation), 0, 10),
                ClientItem::Gone(Some(violation))
            );
        }
    }

    #[test]
    fn a_client_that_does_not_read_is_closed_as_a_violation() {
        assert_eq!(
            client_item(FromClient::Message, 11, 10),
            ClientItem::Gone(Some(Violation::NotReading))
        );
        // Leaving is leaving, whatever is queued.
        assert_eq!(
            client_item(FromClient::Left, 11, 10),
            ClientItem::Gone(None)
        );
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
