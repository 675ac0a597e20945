//! The rules of `API.md` "General HTTP behaviour", checked over real loopback TCP
//! against a toy service, with server and client on one glommio executor.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::{sleep, timeout};
use glommio::{GlommioError, LocalExecutorBuilder, Placement};

use super::*;

/// Longer than any answer should take; a test waiting this long has failed.
const PATIENCE: Duration = Duration::from_secs(5);

enum Toy {
    Hello,
    Echo,
    Slow,
    Upgrade,
}

struct ToyService;

impl Service for ToyService {
    type Route = Toy;

    fn route(&self, method: &Method, path: &str) -> RouteMatch<Toy> {
        match (path, method) {
            ("/hello", Method::Get | Method::Head) => RouteMatch::Found(Toy::Hello),
            ("/hello", _) => RouteMatch::MethodNotAllowed {
                allow: "GET, HEAD, OPTIONS",
            },
            ("/echo", Method::Post) => RouteMatch::Found(Toy::Echo),
            ("/echo", _) => RouteMatch::MethodNotAllowed {
                allow: "POST, OPTIONS",
            },
            ("/slow", Method::Get) => RouteMatch::Found(Toy::Slow),
            ("/upgrade", Method::Get) => RouteMatch::Found(Toy::Upgrade),
            _ => RouteMatch::NotFound,
        }
    }

    async fn handle(&self, route: Toy, req: Request) -> Outcome {
        match route {
            Toy::Hello => Outcome::Respond(Response::json(200, r#"{"hello":"world"}"#)),
            Toy::Echo => {
                let reply = serde_json::json!({
                    "body": String::from_utf8_lossy(&req.body),
                    "query": req.query,
                });
                Outcome::Respond(Response::json(200, reply.to_string()))
            }
            Toy::Slow => {
                sleep(Duration::from_millis(300)).await;
                Outcome::Respond(Response::json(200, "{}"))
            }
            Toy::Upgrade => Outcome::Upgrade {
                response: Response::empty(101)
                    .with_header("Connection", "Upgrade")
                    .with_header("Upgrade", "toy"),
                then: Box::new(|stream, leftover| Box::pin(echo_upgraded(stream, leftover))),
            },
        }
    }
}

/// The upgraded protocol of the toy: send back what arrived early, then echo once.
async fn echo_upgraded(mut stream: TcpStream, leftover: Vec<u8>) {
    stream.write_all(&leftover).await.unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    stream.write_all(&buf[..n]).await.unwrap();
}

/// Runs `test` on a fresh executor with a server for `ToyService` listening on loopback.
fn with_server<F, Fut>(cfg: HttpConfig, test: F)
where
    F: FnOnce(SocketAddr, Rc<Shutdown>) -> Fut,
    Fut: Future<Output = ()>,
{
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(256 << 10)
        .make()
        .expect("executor");
    executor.run(async move {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let shutdown = Rc::new(Shutdown::new());
        let (service, cfg, stop) = (Rc::new(ToyService), Rc::new(cfg), shutdown.clone());
        glommio::spawn_local(async move {
            while let Ok(stream) = listener.accept().await {
                let conn = serve_connection(stream, service.clone(), cfg.clone(), stop.clone());
                glommio::spawn_local(conn).detach();
            }
        })
        .detach();
        test(addr, shutdown).await;
    });
}

async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match timeout(limit, async { Ok(f.await) }).await {
        Ok(v) => v,
        Err(GlommioError::TimedOut(_)) => panic!("timed out waiting for {what}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn error_code(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("error code")
            .to_owned()
    }

    fn closes(&self) -> bool {
        self.header("connection") == Some("close")
    }
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads more bytes; false at end of stream or on a reset.
    async fn fill(&mut self) -> bool {
        // On the heap: a 16 KiB array would live in every future that awaits this,
        // and debug builds copy those futures around the test thread's small stack.
        let mut chunk = vec![0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn reply(&mut self) -> Reply {
        within(PATIENCE, "a response", self.read_reply(true)).await
    }

    /// The answer to a HEAD request: `Content-Length` describes a body never sent.
    async fn head_reply(&mut self) -> Reply {
        within(PATIENCE, "a response", self.read_reply(false)).await
    }

    async fn read_reply(&mut self, with_body: bool) -> Reply {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(head_len) = parsed.parse(&self.buf).unwrap() {
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let status = parsed.code.unwrap();
                let length = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
                let body_len = if with_body { length } else { 0 };
                while self.buf.len() < head_len + body_len {
                    assert!(
                        self.fill().await,
                        "connection closed inside a response body"
                    );
                }
                let body = self.buf[head_len..head_len + body_len].to_vec();
                self.buf.drain(..head_len + body_len);
                return Reply {
                    status,
                    headers,
                    body,
                };
            }
            assert!(
                self.fill().await,
                "connection closed before a response: {:?}",
                self.buf
            );
        }
    }

    /// True when the server closes the connection without sending anything more.
    async fn closed(&mut self) -> bool {
        let at_eof = within(PATIENCE, "the connection to close", async {
            while self.fill().await {}
            true
        })
        .await;
        at_eof && self.buf.is_empty()
    }
}

fn small_timeouts() -> HttpConfig {
    HttpConfig {
        header_timeout: Duration::from_millis(200),
        body_idle_timeout: Duration::from_millis(200),
        keepalive_idle: Duration::from_millis(200),
        ..HttpConfig::default()
    }
}

const GET_HELLO: &[u8] = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n";

fn post_echo(content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        for _ in 0..3 {
            c.send(GET_HELLO).await;
            let r = c.reply().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body, br#"{"hello":"world"}"#);
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.header("access-control-allow-origin"), Some("*"));
            assert!(r.header("date").is_some());
            assert!(!r.closes());
        }
    });
}

#[test]
fn connection_close_is_honoured() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!(r.status, 200);
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn http10_closes_unless_keep_alive_is_asked() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!(r.header("connection"), Some("keep-alive"));
        c.send(b"GET /hello HTTP/1.0\r\n\r\n").await;
        let r = c.reply().await;
        assert_eq!(r.status, 200);
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn head_request_gets_length_but_no_body() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"HEAD /hello HTTP/1.1\r\n\r\n").await;
        let r = c.head_reply().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("17"));
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.body, br#"{"hello":"world"}"#);
    });
}

#[test]
fn unknown_route_is_404_not_found() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /nope HTTP/1.1\r\n\r\n").await;
        let r = c.reply().await;
        assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
        assert_eq!(r.json()["message"], "no such route");
        assert!(!r.closes());
    });
}

#[test]
fn unknown_route_with_small_body_discards_it_and_keeps_the_connection() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"POST /nope HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .await;
        assert_eq!(c.reply().await.status, 404);
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.status, 200);
    });
}

#[test]
fn unknown_route_wins_over_oversized_body() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"POST /nope HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn wrong_method_is_405_with_allow() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /echo HTTP/1.1\r\n\r\n").await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (405, "method_not_allowed")
        );
        assert_eq!(r.header("allow"), Some("POST, OPTIONS"));
    });
}

#[test]
fn wrong_method_wins_over_framing_errors() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"PUT /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!(r.status, 405);
        // The framing is ambiguous, so what follows cannot be trusted.
        assert!(r.closes());
    });
}

#[test]
fn both_content_length_and_transfer_encoding_is_400_and_closes() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
        let r = c.reply().await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn bad_content_length_or_transfer_coding_is_400() {
    let heads = [
        "Content-Length: abc\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1, 1\r\n",
        "Content-Length: 1\r\nContent-Length: 2\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
    ];
    with_server(HttpConfig::default(), |addr, _| async move {
        for extra in heads {
            let mut c = Client::connect(addr).await;
            let req =
                format!("POST /echo HTTP/1.1\r\nContent-Type: application/json\r\n{extra}\r\n");
            c.send(req.as_bytes()).await;
            let r = c.reply().await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (400, "bad_request"),
                "{extra}"
            );
            assert!(c.closed().await, "{extra}");
        }
    });
}

#[test]
fn garbage_is_400_and_closes() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        assert!(c.closed().await);
    });
}

#[test]
fn malformed_header_on_unknown_route_is_404() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /nope HTTP/1.1\r\nbad header line\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!(r.status, 404);
        assert!(c.closed().await);
    });
}

#[test]
fn headers_over_16_kib_are_431() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let big = "a".repeat(17 * 1024);
        let mut c = Client::connect(addr).await;
        c.send(format!("GET /hello HTTP/1.1\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (431, "headers_too_large")
        );
        assert!(r.closes());
        assert!(c.closed().await);

        // Routing still comes first.
        let mut c = Client::connect(addr).await;
        c.send(format!("GET /nope HTTP/1.1\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.reply().await.status, 404);

        // So many fields that they cannot be counted is the same failure.
        let mut c = Client::connect(addr).await;
        let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        c.send(format!("GET /hello HTTP/1.1\r\n{many}\r\n").as_bytes())
            .await;
        assert_eq!(c.reply().await.status, 431);
    });
}

#[test]
fn content_length_over_limit_is_413_before_the_body_is_sent() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        // Only the head is sent: the answer must not wait for the 2 MiB body.
        c.send(b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n")
            .await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (413, "payload_too_large")
        );
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn chunked_total_over_limit_is_413() {
    let cfg = HttpConfig {
        max_body_bytes: 1024,
        ..HttpConfig::default()
    };
    with_server(cfg, |addr, _| async move {
        let mut c = Client::connect(addr).await;
        let chunk = "x".repeat(600);
        let req = format!(
            "POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        );
        c.send(req.as_bytes()).await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (413, "payload_too_large")
        );
        assert!(c.closed().await);
    });
}

#[test]
fn body_at_the_limit_is_accepted() {
    let cfg = HttpConfig {
        max_body_bytes: 1024,
        ..HttpConfig::default()
    };
    with_server(cfg, |addr, _| async move {
        let mut c = Client::connect(addr).await;
        let body = format!("\"{}\"", "x".repeat(1022));
        c.send(&post_echo("application/json", &body)).await;
        let r = c.reply().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body"], body);
    });
}

#[test]
fn non_json_body_is_415() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(&post_echo("text/plain", "hello")).await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (415, "unsupported_media_type")
        );
        // The body was within limits and has been read: the connection goes on.
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.status, 200);

        c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .await;
        assert_eq!(c.reply().await.status, 415, "a body without Content-Type");

        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nhi\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(c.reply().await.status, 415, "a chunked body");
    });
}

#[test]
fn json_media_type_is_case_insensitive_and_takes_parameters() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(&post_echo("Application/JSON; charset=utf-8", "{}"))
            .await;
        assert_eq!(c.reply().await.status, 200);
    });
}

#[test]
fn empty_body_without_content_type_passes() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .await;
        assert_eq!(c.reply().await.status, 200);
        c.send(b"POST /echo HTTP/1.1\r\n\r\n").await;
        assert_eq!(c.reply().await.status, 200);
        c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await;
        assert_eq!(c.reply().await.status, 200);
    });
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        let mut batch = Vec::new();
        batch.extend_from_slice(&post_echo("application/json", "1"));
        batch.extend_from_slice(b"GET /slow HTTP/1.1\r\n\r\n");
        batch.extend_from_slice(&post_echo("application/json", "2"));
        batch.extend_from_slice(b"GET /nope HTTP/1.1\r\n\r\n");
        batch.extend_from_slice(&post_echo("application/json", "3"));
        c.send(&batch).await;
        assert_eq!(c.reply().await.json()["body"], "1");
        assert_eq!(c.reply().await.status, 200);
        assert_eq!(c.reply().await.json()["body"], "2");
        assert_eq!(c.reply().await.status, 404);
        assert_eq!(c.reply().await.json()["body"], "3");
    });
}

#[test]
fn chunked_body_ignores_extensions_and_trailers() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo?x=1 HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;name=value\r\n\"ab\r\n2 ; q=\"x\"\r\nc\"\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .await;
        let r = c.reply().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body"], "\"abc\"");
        assert_eq!(r.json()["query"], "x=1");
        // The trailer section was consumed exactly: the next request parses.
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.status, 200);
    });
}

#[test]
fn chunked_body_arriving_in_pieces_is_reassembled() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        let req = b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\n[1, \r\n3\r\n2, \r\n2\r\n3]\r\n0\r\n\r\n";
        for piece in req.chunks(7) {
            c.send(piece).await;
            sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(c.reply().await.json()["body"], "[1, 2, 3]");
    });
}

#[test]
fn bad_chunk_syntax_is_400_and_closes() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              zz\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        let r = c.reply().await;
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"));
        assert!(c.closed().await);
    });
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await;
        let interim = c.reply().await;
        assert_eq!(interim.status, 100);
        c.send(b"{}").await;
        let r = c.reply().await;
        assert_eq!((r.status, r.json()["body"].as_str()), (200, Some("{}")));
        assert!(!r.closes());
    });
}

#[test]
fn expect_100_continue_is_not_sent_when_the_body_is_already_here() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
              Expect: 100-continue\r\n\r\n{}",
        )
        .await;
        assert_eq!(c.reply().await.status, 200);
    });
}

#[test]
fn expect_100_continue_gets_the_error_instead_when_checks_fail() {
    let heads: [(&str, u16); 3] = [
        ("POST /nope HTTP/1.1\r\nContent-Length: 2\r\n", 404),
        (
            "POST /echo HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n",
            415,
        ),
        (
            "POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 9999999\r\n",
            413,
        ),
    ];
    with_server(HttpConfig::default(), |addr, _| async move {
        for (head, status) in heads {
            let mut c = Client::connect(addr).await;
            c.send(format!("{head}Expect: 100-continue\r\n\r\n").as_bytes())
                .await;
            let r = c.reply().await;
            assert_eq!(r.status, status, "{head}");
            assert!(r.closes(), "{head}");
            assert!(c.closed().await, "{head}");
        }
    });
}

#[test]
fn header_timeout_is_408() {
    with_server(small_timeouts(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n").await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (408, "request_timeout")
        );
        assert!(c.closed().await);
    });
}

#[test]
fn header_timeout_counts_from_the_first_byte_despite_trickling() {
    with_server(small_timeouts(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        let started = Instant::now();
        // One byte every 50 ms keeps the connection busy but never finishes the head.
        let trickle = async {
            for &b in b"GET /hello HTTP/1.1\r\nX-Slow: a" {
                if c.stream.write_all(&[b]).await.is_err() {
                    return;
                }
                sleep(Duration::from_millis(50)).await;
            }
        };
        trickle.await;
        let r = c.reply().await;
        assert_eq!(r.status, 408);
        assert!(started.elapsed() < Duration::from_secs(3));
    });
}

#[test]
fn silence_inside_a_body_is_408() {
    with_server(small_timeouts(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n[1,").await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (408, "request_timeout")
        );
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn a_body_still_incomplete_at_the_body_deadline_is_408_despite_trickling() {
    let cfg = HttpConfig {
        body_timeout: Duration::from_millis(500),
        ..small_timeouts()
    };
    with_server(cfg, |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        )
        .await;
        let started = Instant::now();
        // A byte every 50 ms: never 200 ms of silence, yet never the whole body.
        let trickle = async {
            for _ in 0..60 {
                if c.stream.write_all(b" ").await.is_err() {
                    return;
                }
                sleep(Duration::from_millis(50)).await;
            }
        };
        trickle.await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (408, "request_timeout")
        );
        assert!(r.closes());
        assert!(started.elapsed() < Duration::from_secs(3));
    });
}

#[test]
fn content_coded_bodies_are_415() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}")
            .await;
        let r = c.reply().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (415, "unsupported_media_type")
        );
        // The body was read and dropped: the connection goes on.
        c.send(b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}")
            .await;
        assert_eq!(c.reply().await.status, 200);
        c.send(
            b"POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: br\r\n\
              Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(c.reply().await.status, 415, "a chunked body");
        // Framing errors still rank above.
        c.send(b"POST /echo HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: x\r\n\r\n")
            .await;
        assert_eq!(c.reply().await.status, 400);
    });
}

#[test]
fn idle_keep_alive_connection_closes_silently() {
    with_server(small_timeouts(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.status, 200);
        let started = Instant::now();
        assert!(c.closed().await, "closed without another byte");
        assert!(started.elapsed() >= Duration::from_millis(150));
    });
}

#[test]
fn stalled_connection_does_not_delay_another() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut stalled = Client::connect(addr).await;
        stalled
            .send(b"POST /echo HTTP/1.1\r\nContent-Type: appl")
            .await;
        let mut stalled_body = Client::connect(addr).await;
        stalled_body
            .send(&post_echo("application/json", "[1,2,3]")[..60])
            .await;
        sleep(Duration::from_millis(20)).await;

        let started = Instant::now();
        let mut c = Client::connect(addr).await;
        c.send(GET_HELLO).await;
        assert_eq!(c.reply().await.status, 200);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop((stalled, stalled_body));
    });
}

#[test]
fn cors_preflight_on_known_path_is_204() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(
            b"OPTIONS /echo HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n\
              Access-Control-Request-Headers: content-type, x-trace\r\n\r\n",
        )
        .await;
        let r = c.reply().await;
        assert_eq!(r.status, 204);
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        assert_eq!(
            r.header("access-control-allow-methods"),
            Some("GET, HEAD, POST, PATCH, OPTIONS")
        );
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type, x-trace")
        );
        assert_eq!(
            r.header("access-control-expose-headers"),
            Some("Retry-After")
        );
        assert_eq!(r.header("access-control-max-age"), Some("86400"));
        assert_eq!(r.header("content-length"), None);
        assert!(r.body.is_empty());

        c.send(b"OPTIONS /hello HTTP/1.1\r\n\r\n").await;
        let r = c.reply().await;
        assert_eq!(r.status, 204);
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type")
        );

        c.send(b"OPTIONS /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(c.reply().await.status, 404);
    });
}

#[test]
fn shutdown_closes_idle_connections_at_once() {
    with_server(HttpConfig::default(), |addr, shutdown| async move {
        let mut used = Client::connect(addr).await;
        used.send(GET_HELLO).await;
        assert_eq!(used.reply().await.status, 200);
        let mut fresh = Client::connect(addr).await;
        sleep(Duration::from_millis(20)).await;

        let started = Instant::now();
        shutdown.trigger();
        assert!(used.closed().await);
        assert!(fresh.closed().await);
        // keepalive_idle is 60 s: only the shutdown can have closed them.
        assert!(started.elapsed() < Duration::from_secs(1));
    });
}

#[test]
fn shutdown_finishes_the_request_in_flight_with_connection_close() {
    with_server(HttpConfig::default(), |addr, shutdown| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /slow HTTP/1.1\r\n\r\n").await;
        sleep(Duration::from_millis(50)).await;
        shutdown.trigger();
        let r = c.reply().await;
        assert_eq!(r.status, 200);
        assert!(r.closes());
        assert!(c.closed().await);
    });
}

#[test]
fn upgrade_hands_over_the_stream_and_early_bytes() {
    with_server(HttpConfig::default(), |addr, _| async move {
        let mut c = Client::connect(addr).await;
        c.send(b"GET /upgrade HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: toy\r\n\r\nearly")
            .await;
        let r = c.reply().await;
        assert_eq!(r.status, 101);
        assert_eq!(r.header("connection"), Some("Upgrade"));
        assert_eq!(r.header("upgrade"), Some("toy"));
        assert_eq!(r.header("content-length"), None);
        while c.buf.len() < 5 {
            assert!(c.fill().await);
        }
        assert_eq!(c.buf.drain(..).collect::<Vec<_>>(), b"early");
        c.send(b"later").await;
        while c.buf.len() < 5 {
            assert!(c.fill().await);
        }
        assert_eq!(c.buf, b"later");
    });
}
