//! Query strings and their percent-escapes (`shards::http::query`), the class of input
//! API.md's "Hardening rules (v1.1)" added: a malformed escape refuses the parameter it
//! is in (never drops it, so `metadata.k=%zz` cannot widen a filtered listing).
//!
//! Input: byte 0 even = the rest is a raw query string (as the request target carried
//! it), checked against a plain reference decoder written here; odd = a recipe for
//! `name=value` pairs, encoded as a client would (upper- or lowercase hex, `+` or `%20`
//! for spaces), some damaged with a malformed escape, which must parse back to exactly
//! the pairs encoded, the damaged ones refused.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use shards::http::query::{percent_decode, Malformed, Query, METADATA_FILTER_PREFIX};

fuzz_target!(|data: &[u8]| {
    let [mode, ref rest @ ..] = *data else {
        return;
    };
    if mode & 1 == 0 {
        check_raw(&String::from_utf8_lossy(rest));
    } else {
        // Running out of bytes ends the recipe early: what was built is still checked.
        let _ = check_recipe(&mut Unstructured::new(rest));
    }
});

/// `%XX` decoding as API.md states it, independently of the crate the server uses:
/// every `%` starts two hex digits, and the bytes must be UTF-8.
fn reference_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A pair as the parser must see it: `+` is a space, then escapes are decoded; a name
/// that does not decode stays raw, and any malformed part leaves no value.
fn reference_pair(part: &str) -> (String, Option<String>) {
    let (name, value) = part.split_once('=').unwrap_or((part, ""));
    let decode = |text: &str| reference_decode(&text.replace('+', " "));
    match (decode(name), decode(value)) {
        (Some(name), value) => (name, value),
        (None, _) => (name.to_owned(), None),
    }
}

fn check_raw(raw: &str) {
    assert_eq!(percent_decode(raw), reference_decode(raw), "{raw:?}");
    let expected: Vec<_> = raw
        .split('&')
        .filter(|part| !part.is_empty())
        .map(reference_pair)
        .collect();
    let query = Query::parse(raw);
    assert_eq!(query.pairs(), expected.as_slice(), "{raw:?}");
    check_lookups(&query);
}

/// `get` answers with the first pair of a name, and the metadata filters are every
/// well-formed `metadata.*` pair in order, unless one is malformed: then the first
/// malformed one is refused by name.
fn check_lookups(query: &Query) {
    let pairs = query.pairs();
    for (name, _) in pairs {
        let first = pairs.iter().find(|(n, _)| n == name).expect("listed");
        let expected = first.1.as_deref().ok_or(Malformed).map(Some);
        assert_eq!(query.get(name), expected, "{name:?}");
    }
    if !pairs.iter().any(|(n, _)| n == "absent-name") {
        assert_eq!(query.get("absent-name"), Ok(None));
    }
    let metadata = pairs
        .iter()
        .filter_map(|(n, v)| Some((n, n.strip_prefix(METADATA_FILTER_PREFIX)?, v)));
    let mut expected = Vec::new();
    for (name, key, value) in metadata {
        let Some(value) = value else {
            let error = query.metadata_filters().expect_err("a malformed filter");
            assert_eq!(error.code, "invalid_filter");
            assert_eq!(error.field.as_deref(), Some(name.as_str()));
            return;
        };
        expected.push((key.to_owned(), value.clone()));
    }
    assert_eq!(query.metadata_filters(), Ok(expected));
}

/// Names the server reads, so that lookups of real parameters are exercised.
const NAMES: [&str; 6] = [
    "cursor",
    "limit",
    "archived",
    "batch_size",
    "metadata.user",
    "metadata.",
];
/// Malformed escapes: not hex, or bytes that are not UTF-8 wherever they land (0xFF
/// never is; 0xC3 needs a continuation byte, not `(`); or cut short, at the end only
/// (`%4` before `1` would be a well-formed `%41`).
const DAMAGE: [&str; 5] = ["%zz", "%+1", "%G0", "%ff", "%C3%28"];
const DAMAGE_AT_END: [&str; 2] = ["%", "%4"];

fn text(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 3)? {
        return Ok(NAMES[u.choose_index(NAMES.len())?].to_owned());
    }
    let len = u.int_in_range(0..=24)?;
    let mut s = String::new();
    for _ in 0..len {
        s.push(u.arbitrary::<char>()?);
    }
    Ok(s)
}

/// Escapes everything but unreserved characters, as a client's encoder would, with
/// the spelling the recipe picks.
fn encode(u: &mut Unstructured, text: &str) -> Result<String> {
    let upper = u.arbitrary::<bool>()?;
    let plus_for_space = u.arbitrary::<bool>()?;
    let mut out = String::new();
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' if plus_for_space => out.push('+'),
            _ if upper => out.push_str(&format!("%{b:02X}")),
            _ => out.push_str(&format!("%{b:02x}")),
        }
    }
    Ok(out)
}

fn check_recipe(u: &mut Unstructured) -> Result<()> {
    let count = u.int_in_range(0..=8)?;
    let mut parts = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..count {
        let name = text(u)?;
        let value = text(u)?;
        let mut encoded_value = encode(u, &value)?;
        let damaged = u.ratio(1, 4)?;
        if damaged && u.arbitrary::<bool>()? {
            encoded_value.push_str(DAMAGE_AT_END[u.choose_index(DAMAGE_AT_END.len())?]);
        } else if damaged {
            // Any index is a character boundary: the encoded text is ASCII.
            let at = u.int_in_range(0..=encoded_value.len())?;
            encoded_value.insert_str(at, DAMAGE[u.choose_index(DAMAGE.len())?]);
        }
        parts.push(format!("{}={encoded_value}", encode(u, &name)?));
        expected.push((name, (!damaged).then_some(value)));
        if u.ratio(1, 8)? {
            // Empty parts (`a=1&&b=2`) are skipped.
            parts.push(String::new());
        }
    }
    let raw = parts.join("&");
    let query = Query::parse(&raw);
    assert_eq!(query.pairs(), expected.as_slice(), "{raw:?}");
    check_lookups(&query);
    check_raw(&raw);
    Ok(())
}
