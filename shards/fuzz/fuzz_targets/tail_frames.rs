//! The tail's handling of what its client sends (`shards::tail`): a sequence of
//! messages, errors and the end of the stream, with the bytes the server has queued
//! for the client, interleaved with the tail loop's liveness checks on a virtual
//! clock, driven through the pure decisions the shell uses (`client_item`,
//! `liveness`), not through tungstenite's frame parser (the shell's mapping of
//! tungstenite's items onto [`FromClient`] is a unit test of `src/tail.rs`).
//!
//! Checked against a model of websocket.md ("Liveness and close codes"): any frame
//! counts as hearing from the client unless the server has queued more for it than
//! the bound (then it is closed 1008, as one that does not read); an error or the end
//! of the stream means it left, with a 1008 reason that fits a close frame when the
//! error was its fault, and nothing more is read; the tail closes as idle only after
//! more than 60 s without a frame, pings at most every 30 s and never pings a client it
//! closes as idle.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shards::tail::{
    client_item, liveness, ClientItem, FromClient, Liveness, Violation, PING_INTERVAL,
    SILENCE_LIMIT,
};

/// RFC 6455 §5.5: a control frame carries at most 125 bytes, 2 of them the close code.
const CLOSE_REASON_BYTES_MAX: usize = 123;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Item {
    /// A text, binary, ping, pong or close message: the shell reads them all alike.
    Message,
    ProtocolError,
    TooLong,
    InvalidUtf8,
    /// A reset, a closed connection or the end of the stream.
    Left,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The reader receives something, `after_ms` after the previous step, while the
    /// server has `unsent_bytes` queued for the client.
    Receive {
        after_ms: u16,
        item: Item,
        unsent_bytes: u32,
    },
    /// The tail loop checks liveness before its next read.
    Check { after_ms: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    unsent_bytes_max: u32,
    steps: Vec<Step>,
}

fn from_client(item: Item) -> FromClient {
    match item {
        Item::Message => FromClient::Message,
        Item::ProtocolError => FromClient::Violation(Violation::Protocol),
        Item::TooLong => FromClient::Violation(Violation::MessageTooLarge),
        Item::InvalidUtf8 => FromClient::Violation(Violation::InvalidUtf8),
        Item::Left => FromClient::Left,
    }
}

/// What websocket.md says the tail does with `item`.
fn expected(item: Item, unsent_bytes: u32, unsent_bytes_max: u32) -> ClientItem {
    match item {
        Item::Message if unsent_bytes > unsent_bytes_max => {
            ClientItem::Gone(Some(Violation::NotReading))
        }
        Item::Message => ClientItem::Heard,
        Item::ProtocolError => ClientItem::Gone(Some(Violation::Protocol)),
        Item::TooLong => ClientItem::Gone(Some(Violation::MessageTooLarge)),
        Item::InvalidUtf8 => ClientItem::Gone(Some(Violation::InvalidUtf8)),
        Item::Left => ClientItem::Gone(None),
    }
}

fuzz_target!(|input: Input| {
    let mut now = Duration::ZERO;
    let mut last_heard = Duration::ZERO;
    let mut last_ping = Duration::ZERO;
    let mut pings = 0u64;
    let mut gone = false;
    for step in input.steps {
        match step {
            Step::Receive {
                after_ms,
                item,
                unsent_bytes,
            } => {
                now += Duration::from_millis(after_ms.into());
                if gone {
                    // The reader stopped at the first error or the end: nothing more is
                    // read from this connection.
                    continue;
                }
                let decided = client_item(
                    from_client(item),
                    unsent_bytes as usize,
                    input.unsent_bytes_max as usize,
                );
                assert_eq!(
                    decided,
                    expected(item, unsent_bytes, input.unsent_bytes_max),
                    "{item:?}"
                );
                match decided {
                    ClientItem::Heard => last_heard = now,
                    ClientItem::Gone(violation) => {
                        if let Some(reason) = violation.map(Violation::reason) {
                            assert!(!reason.is_empty() && reason.len() <= CLOSE_REASON_BYTES_MAX);
                        }
                        gone = true;
                    }
                }
            }
            Step::Check { after_ms } => {
                now += Duration::from_millis(after_ms.into());
                if gone {
                    // The loop sees `client_gone` before it looks at liveness.
                    return;
                }
                let decided = liveness(now - last_heard, now - last_ping);
                let silent = now - last_heard;
                let expected = if silent > SILENCE_LIMIT {
                    Liveness::Idle
                } else if now - last_ping >= PING_INTERVAL {
                    Liveness::Ping
                } else {
                    Liveness::Fine
                };
                assert_eq!(decided, expected, "silent {silent:?}");
                match decided {
                    Liveness::Idle => return,
                    Liveness::Ping => {
                        last_ping = now;
                        pings += 1;
                    }
                    Liveness::Fine => {}
                }
                // Pings are spaced by at least the interval.
                assert!(pings <= 1 + (now.as_millis() / PING_INTERVAL.as_millis()) as u64);
            }
        }
    }
});
