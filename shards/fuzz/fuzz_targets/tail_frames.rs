//! The tail's handling of what its client sends (`src/tail.rs`): a sequence of
//! messages, errors and the end of the stream, interleaved with the tail loop's
//! liveness checks on a virtual clock, driven through the pure decisions the shell
//! uses (`client_item`, `liveness`), not through tungstenite's frame parser.
//!
//! Checked against a model of websocket.md ("Liveness and close codes"): any frame
//! counts as hearing from the client; an error or the end of the stream means it left
//! and nothing more is read; the tail closes as idle only after more than 60 s without
//! a frame, pings at most every 30 s and never pings a client it closes as idle.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use starcite::tail::{client_item, liveness, ClientItem, Liveness, PING_INTERVAL, SILENCE_LIMIT};
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

#[derive(Arbitrary, Debug)]
enum FromClient {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
    TooLong { size: usize },
    ProtocolError,
    Reset,
    End,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The reader receives something, `after_ms` after the previous step.
    Receive { after_ms: u16, item: FromClient },
    /// The tail loop checks liveness before its next read.
    Check { after_ms: u16 },
}

fn item(from: FromClient) -> Option<Result<Message, WsError>> {
    Some(Ok(match from {
        FromClient::Text(text) => Message::Text(text.into()),
        FromClient::Binary(data) => Message::Binary(data.into()),
        FromClient::Ping(data) => Message::Ping(data.into()),
        FromClient::Pong(data) => Message::Pong(data.into()),
        FromClient::Close(frame) => Message::Close(frame.map(|(code, reason)| CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })),
        FromClient::TooLong { size } => {
            return Some(Err(WsError::Capacity(CapacityError::MessageTooLong {
                size,
                max_size: 64 << 10,
            })))
        }
        FromClient::ProtocolError => {
            return Some(Err(WsError::Protocol(
                ProtocolError::UnmaskedFrameFromClient,
            )))
        }
        FromClient::Reset => {
            let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
            return Some(Err(WsError::Io(reset)));
        }
        FromClient::End => return None,
    }))
}

fuzz_target!(|steps: Vec<Step>| {
    let mut now = Duration::ZERO;
    let mut last_heard = Duration::ZERO;
    let mut last_ping = Duration::ZERO;
    let mut pings = 0u64;
    let mut gone = false;
    for step in steps {
        match step {
            Step::Receive {
                after_ms,
                item: from,
            } => {
                now += Duration::from_millis(after_ms.into());
                if gone {
                    // The reader stopped at the first error or the end: nothing more is
                    // read from this connection.
                    continue;
                }
                let failed = matches!(
                    from,
                    FromClient::TooLong { .. }
                        | FromClient::ProtocolError
                        | FromClient::Reset
                        | FromClient::End
                );
                let decided = client_item(item(from).as_ref());
                assert_eq!(decided == ClientItem::Gone, failed, "{decided:?}");
                match decided {
                    ClientItem::Heard => last_heard = now,
                    ClientItem::Gone => gone = true,
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
