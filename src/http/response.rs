//! Responses and their encoding onto the wire.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An HTTP response. The connection adds `Content-Length`, `Connection`, `Date` and
/// `Access-Control-Allow-Origin` itself; handlers set only what is theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with no body and no headers.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `body` must already be JSON text.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
            body: body.into(),
        }
    }

    /// `{"error": code, "message": message}`, the shape of every API error.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self::error_with(status, code, message, Map::new())
    }

    /// An error with extra fields after `error` and `message`, in the given order.
    pub fn error_with(status: u16, code: &str, message: &str, extra: Map<String, Value>) -> Self {
        let mut fields = Map::with_capacity(2 + extra.len());
        fields.insert("error".to_owned(), Value::from(code));
        fields.insert("message".to_owned(), Value::from(message));
        for (key, value) in extra {
            // The two fixed fields keep their meaning even if a caller repeats them.
            if key != "error" && key != "message" {
                fields.insert(key, value);
            }
        }
        let body =
            serde_json::to_vec(&Value::Object(fields)).expect("a JSON map always serialises");
        Self::json(status, body)
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

/// How the connection frames one response.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wire {
    /// The connection closes after this response: say so (RFC 9112 §9.6).
    pub close: bool,
    /// An HTTP/1.0 client asked to keep the connection: confirm it, or it will close.
    pub confirm_keep_alive: bool,
    /// The request was HEAD: headers only, `Content-Length` still that of the body.
    pub head_request: bool,
    /// A 101 handing the connection over: its own `Connection`/`Upgrade` headers stand.
    pub upgrade: bool,
}

/// The whole response, head and body, in one buffer so it goes out in one write.
pub(crate) fn encode(response: &Response, wire: Wire) -> Vec<u8> {
    let mut out = encode_head(response, wire, response.body.len());
    if sends_body(response, wire) {
        out.extend_from_slice(&response.body);
    }
    out
}

/// Whether the body follows the head on the wire.
pub(crate) fn sends_body(response: &Response, wire: Wire) -> bool {
    let bodiless = response.status < 200 || response.status == 204;
    !bodiless && !wire.head_request
}

/// The status line and headers, with room for `reserve` more bytes.
pub(crate) fn encode_head(response: &Response, wire: Wire, reserve: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + reserve);
    let status = response.status;
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (name, value) in &response.headers {
        if is_connection_owned(name, wire.upgrade) {
            continue;
        }
        if !is_header_safe(name, value) {
            // Writing it would let a value inject headers; this is a bug in the caller.
            tracing::error!(%name, "dropping response header with forbidden characters");
            continue;
        }
        push_header(&mut out, name, value);
    }
    push_header(&mut out, "Access-Control-Allow-Origin", "*");
    with_http_date(|date| push_header(&mut out, "Date", date));
    // RFC 9110 §8.6: no Content-Length on 1xx and 204, whose bodies are always empty.
    let bodiless = status < 200 || status == 204;
    if !bodiless {
        push_header(&mut out, "Content-Length", &response.body.len().to_string());
    }
    if !wire.upgrade {
        if wire.close {
            push_header(&mut out, "Connection", "close");
        } else if wire.confirm_keep_alive {
            push_header(&mut out, "Connection", "keep-alive");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Headers whose value follows from the connection, not from the handler.
fn is_connection_owned(name: &str, upgrade: bool) -> bool {
    let owned: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "date",
        "access-control-allow-origin",
    ];
    owned.iter().any(|o| name.eq_ignore_ascii_case(o))
        || (!upgrade && name.eq_ignore_ascii_case("connection"))
}

fn is_header_safe(name: &str, value: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty()
        && name.bytes().all(token)
        && value
            .bytes()
            .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        // The reason phrase is optional (RFC 9112 §4); an empty one is valid.
        _ => "",
    }
}

thread_local! {
    /// The Date value changes once a second; formatting it once per second per
    /// executor keeps it off the per-response cost.
    static HTTP_DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Calls `f` with the current time as an IMF-fixdate (RFC 9110 §5.6.7).
fn with_http_date<R>(f: impl FnOnce(&str) -> R) -> R {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    HTTP_DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != now {
            *cached = (now, format_http_date(now));
        }
        f(&cached.1)
    })
}

pub(crate) fn format_http_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let mut out = String::with_capacity(29);
    let _ = write!(
        out,
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    out
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's
/// `civil_from_days` (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn http_date_is_imf_fixdate() {
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            format_http_date(951_782_400),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }

    #[test]
    fn error_body_has_code_message_then_extra_fields() {
        let mut extra = Map::new();
        extra.insert("current_version".to_owned(), Value::from(3));
        let r = Response::error_with(409, "expected_version_conflict", "stale", extra);
        assert_eq!(
            r.body,
            br#"{"error":"expected_version_conflict","message":"stale","current_version":3}"#
        );
        assert_eq!(
            r.headers,
            vec![("Content-Type".to_owned(), "application/json".to_owned())]
        );
    }

    #[test]
    fn encode_sets_length_cors_and_close() {
        let r = Response::json(200, "{}").with_header("Content-Length", "99");
        let text = String::from_utf8(encode(
            &r,
            Wire {
                close: true,
                ..Wire::default()
            },
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("\r\nContent-Length: 2\r\n"));
        assert!(!text.contains("99"));
        assert!(text.contains("\r\nAccess-Control-Allow-Origin: *\r\n"));
        assert!(text.ends_with("\r\nConnection: close\r\n\r\n{}"));
    }

    #[test]
    fn encode_drops_header_values_that_could_split_the_response() {
        let r = Response::empty(200).with_header("X-Evil", "a\r\nSet-Cookie: x=1");
        let text = String::from_utf8(encode(&r, Wire::default())).unwrap();
        assert!(!text.contains("Set-Cookie"));
    }
}
