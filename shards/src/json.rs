//! JSON as the API handles it: parsed once with a nesting limit, stored as compact text
//! (members in received order, numbers as written), and compared for dedupe by a digest
//! of a canonical form in which key order, whitespace and number spelling do not matter.

use serde_json::{Map, Number, Value};
use sha2::{Digest as _, Sha256};

use crate::entry::Digest;

/// Deepest nesting of arrays and objects accepted in a request body; a top-level object
/// is depth 1 (API.md: "JSON nested deeper than 64 levels → 400 invalid_json").
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub message: String,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JsonError {}

/// Parses a request body: UTF-8, JSON syntax, the nesting limit and distinct member
/// names in every object.
///
/// serde_json stops at 128 levels on its own (so 100000 `[` cannot overflow the stack);
/// the depth check below is iterative and enforces the API's 64.
pub fn parse(body: &[u8]) -> Result<Value, JsonError> {
    let text = std::str::from_utf8(body).map_err(|e| JsonError {
        message: format!("body is not valid UTF-8: {e}"),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| JsonError {
        message: if e.to_string().starts_with("recursion limit exceeded") {
            format!("JSON is nested deeper than {MAX_DEPTH} levels")
        } else {
            format!("invalid JSON: {e}")
        },
    })?;
    let depth = depth(&value);
    if depth > MAX_DEPTH {
        return Err(JsonError {
            message: format!("JSON is nested {depth} levels deep, more than {MAX_DEPTH}"),
        });
    }
    check_distinct_members(text)?;
    Ok(value)
}

/// Refuses an object that names a member twice, at any depth (API.md, "Hardening rules
/// (v1.1)"). serde_json keeps the last of two equal names while the raw text keeps
/// both, so a body with duplicates would be stored and served as written but digested
/// for dedupe as if only the last existed. Names are compared after unescaping
/// (`"k"` and `"\u006b"` are the same name). A second pass over text [`parse`] has
/// already accepted, so only a duplicate can fail it.
fn check_distinct_members(text: &str) -> Result<(), JsonError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserialize::deserialize(&mut de)
        .map(|DistinctMembers| ())
        .map_err(|e| JsonError {
            message: format!("invalid JSON: {e}"),
        })
}

/// Deserializes any JSON value, keeping nothing but failing on a repeated member name.
struct DistinctMembers;

impl<'de> serde::Deserialize<'de> for DistinctMembers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DistinctMembers)
    }
}

impl<'de> serde::de::Visitor<'de> for DistinctMembers {
    type Value = DistinctMembers;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(DistinctMembers)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Self, A::Error> {
        while items.next_element::<DistinctMembers>()?.is_some() {}
        Ok(DistinctMembers)
    }

    /// With `arbitrary_precision` a number arrives as a one-member map too; it has no
    /// duplicates, so it needs no special case.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut members: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(name) = members.next_key::<MemberName<'de>>()? {
            members.next_value::<DistinctMembers>()?;
            let name = name.0;
            if seen.contains(name.as_ref()) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate member name {:?} in an object",
                    name.as_ref()
                )));
            }
            seen.insert(name);
        }
        Ok(DistinctMembers)
    }
}

/// A member name, borrowed from the body unless it had escapes.
struct MemberName<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(MemberNameVisitor)
    }
}

struct MemberNameVisitor;

impl<'de> serde::de::Visitor<'de> for MemberNameVisitor {
    type Value = MemberName<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
        Ok(MemberName(std::borrow::Cow::Borrowed(name)))
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(MemberName(std::borrow::Cow::Owned(name.to_owned())))
    }
}

/// Nesting depth of arrays and objects (a scalar is 0, `{}` and `[]` are 1), computed
/// without recursion.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, above)) = stack.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(above + 1);
                stack.extend(items.iter().map(|item| (item, above + 1)));
            }
            Value::Object(members) => {
                deepest = deepest.max(above + 1);
                stack.extend(members.values().map(|member| (member, above + 1)));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
        }
    }
    deepest
}

/// Compact serialisation: no whitespace, object members in received order, numbers as
/// written (serde_json's `arbitrary_precision` keeps their text; an exponent marker is
/// spelled `e+`/`e-`), strings escaped minimally.
pub fn to_compact(value: &Value) -> String {
    serde_json::to_string(value).expect("serialising a serde_json::Value cannot fail")
}

/// The top-level members of a JSON object body as their raw text. Call after [`parse`]
/// accepted the body (so every name is distinct).
pub fn raw_members(
    body: &[u8],
) -> Result<std::collections::HashMap<String, Box<serde_json::value::RawValue>>, JsonError> {
    serde_json::from_slice(body).map_err(|e| JsonError {
        message: e.to_string(),
    })
}

/// Valid JSON text without insignificant whitespace, everything else (numbers, string
/// escapes, member order) exactly as written: how event values are stored and served.
pub fn minify(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// Compact text of an object.
pub fn object_to_compact(members: &Map<String, Value>) -> String {
    serde_json::to_string(members).expect("serialising a serde_json::Map cannot fail")
}

/// The dedupe digest of a JSON value: sha256 of its canonical encoding, truncated to 16
/// bytes. Equal JSON values (key order, whitespace, `1` vs `1.0` vs `10e-1`, `-0` vs `0`)
/// give equal digests; the encoding is prefix-free, so different values do not collide
/// short of a sha256 collision.
///
/// Recursive: callers pass values from [`parse`], whose depth is bounded.
pub fn content_digest(value: &Value) -> Digest {
    let mut hasher = Sha256::new();
    hash_canonical(&mut hasher, value);
    finish(hasher)
}

/// The digest [`content_digest`] gives for an object with these members, without
/// building that object (so a large payload is not copied just to be hashed). Keys must
/// be distinct.
pub fn object_digest(members: &[(&str, &Value)]) -> Digest {
    let mut hasher = Sha256::new();
    hash_members(&mut hasher, members.to_vec());
    finish(hasher)
}

fn finish(hasher: Sha256) -> Digest {
    let full = hasher.finalize();
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

/// Canonical encoding, fed straight into the hasher: a tag byte, then for strings and
/// numbers a u64 length and the bytes, for arrays the count and the items in order, for
/// objects the count and the members sorted bytewise by key.
fn hash_canonical(hasher: &mut Sha256, value: &Value) {
    match value {
        Value::Null => hasher.update(b"n"),
        Value::Bool(false) => hasher.update(b"f"),
        Value::Bool(true) => hasher.update(b"t"),
        Value::Number(number) => hash_bytes(hasher, b'd', canonical_number(number).as_bytes()),
        Value::String(text) => hash_bytes(hasher, b's', text.as_bytes()),
        Value::Array(items) => {
            hash_count(hasher, b'a', items.len());
            for item in items {
                hash_canonical(hasher, item);
            }
        }
        Value::Object(members) => {
            hash_members(
                hasher,
                members.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            );
        }
    }
}

fn hash_members(hasher: &mut Sha256, mut members: Vec<(&str, &Value)>) {
    hash_count(hasher, b'o', members.len());
    members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    for (key, member) in members {
        hash_bytes(hasher, b'k', key.as_bytes());
        hash_canonical(hasher, member);
    }
}

fn hash_count(hasher: &mut Sha256, tag: u8, count: usize) {
    hasher.update([tag]);
    hasher.update((count as u64).to_le_bytes());
}

fn hash_bytes(hasher: &mut Sha256, tag: u8, bytes: &[u8]) {
    hash_count(hasher, tag, bytes.len());
    hasher.update(bytes);
}

/// The exact value of a JSON number as `[-]DIGITSeEXP` with DIGITS free of leading and
/// trailing zeros (`0e0` for every zero), computed on the decimal text, never via f64:
/// `1`, `1.0`, `1e0` and `10e-1` all give `1e0`; `-0.0` gives `0e0`.
pub fn canonical_number(number: &Number) -> String {
    canonical_number_text(&number.to_string())
}

fn canonical_number_text(text: &str) -> String {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent_text) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, "0"),
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = format!("{integer}{fraction}");
    let significant = all_digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return "0e0".to_string();
    }
    // value = digits × 10^(exponent − len(fraction)); dropping trailing zeros of the
    // digits moves them into the exponent.
    let trailing_zeros = significant.len() - trimmed.len();
    let adjustment = trailing_zeros as i64 - fraction.len() as i64;
    let exponent = add_to_decimal(exponent_text, adjustment);
    format!("{}{trimmed}e{exponent}", if negative { "-" } else { "" })
}

/// `text` (an optionally signed decimal integer of any length, as JSON allows in an
/// exponent) plus a small `adjustment`, as a canonical decimal string.
fn add_to_decimal(text: &str, adjustment: i64) -> String {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = digits.trim_start_matches('0');
    if digits.len() <= 30 {
        let magnitude: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().expect("at most 30 ASCII digits fit in i128")
        };
        let value = if negative { -magnitude } else { magnitude };
        return (value + i128::from(adjustment)).to_string();
    }
    // |text| ≥ 10^30 > |adjustment|, so the sign stays and only the magnitude moves.
    let delta = if negative { -adjustment } else { adjustment };
    let magnitude = add_small_to_magnitude(digits, delta);
    format!("{}{magnitude}", if negative { "-" } else { "" })
}

/// `digits` (a decimal magnitude far larger than |delta|) + delta, by schoolbook carry.
fn add_small_to_magnitude(digits: &str, delta: i64) -> String {
    let mut out: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    let mut carry: i128 = i128::from(delta);
    for digit in out.iter_mut().rev() {
        if carry == 0 {
            break;
        }
        let sum = i128::from(*digit) + carry;
        *digit = sum.rem_euclid(10) as u8;
        carry = sum.div_euclid(10);
    }
    assert_eq!(carry, 0, "adjustment larger than the magnitude it adjusts");
    let text: String = out.iter().map(|d| char::from(b'0' + d)).collect();
    text.trim_start_matches('0').to_string()
}

#[cfg(test)]
mod minify_tests {
    use super::*;

    #[test]
    fn minify_keeps_numbers_strings_and_order_as_written() {
        let raw = "{ \"b\" : [1E2, 1.50, -0, 1e-7 ],\n \"a\": \"x \\\" y\\u00e9\" }";
        assert_eq!(
            minify(raw),
            "{\"b\":[1E2,1.50,-0,1e-7],\"a\":\"x \\\" y\\u00e9\"}"
        );
        assert!(parse(minify(raw).as_bytes()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest_of(text: &str) -> Digest {
        content_digest(&parse(text.as_bytes()).unwrap())
    }

    #[test]
    fn depth_64_ok_65_rejected() {
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse(ok.as_bytes()).is_ok());
        let too_deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(parse(too_deep.as_bytes()).is_err());
        let objects_ok = format!("{}1{}", r#"{"a":"#.repeat(64), "}".repeat(64));
        assert!(parse(objects_ok.as_bytes()).is_ok());
        let objects_deep = format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65));
        assert!(parse(objects_deep.as_bytes()).is_err());
    }

    #[test]
    fn duplicate_member_names_are_refused_at_any_depth() {
        for body in [
            r#"{"k":1,"k":2}"#,
            r#"{"k":1,"\u006b":1}"#,
            r#"{"a":{"x":[{"y":1,"y":1}]}}"#,
            r#"[1,{"n":1.5e300,"n":null}]"#,
        ] {
            let error = parse(body.as_bytes()).unwrap_err();
            assert!(
                error.message.contains("duplicate member"),
                "{body}: {error}"
            );
        }
        for body in [
            r#"{"k":1,"K":2,"k2":{"k":3},"a":[{"k":1},{"k":2}]}"#,
            r#"{"n":-1.50e-7,"m":123456789012345678901234567890}"#,
            r#"{"":1,"\"":2,"\\":3}"#,
            "[]",
            "7",
        ] {
            assert!(parse(body.as_bytes()).is_ok(), "{body}");
        }
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_crash() {
        let body = "[".repeat(100_000);
        let error = parse(body.as_bytes()).unwrap_err();
        assert!(error.message.contains("deeper"), "{}", error.message);
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(body.as_bytes()).is_err());
    }

    #[test]
    fn depth_counts_scalars_as_zero() {
        assert_eq!(depth(&parse(b"1").unwrap()), 0);
        assert_eq!(depth(&parse(b"{}").unwrap()), 1);
        assert_eq!(depth(&parse(br#"{"a":[1,{"b":[]}]}"#).unwrap()), 4);
    }

    #[test]
    fn invalid_utf8_and_syntax_are_errors() {
        assert!(parse(b"\"\xff\"").is_err());
        assert!(parse(b"{").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"{} x").is_err());
        assert!(parse(br#""\ud800""#).is_err());
    }

    #[test]
    fn compact_keeps_member_order_and_number_text() {
        let value = parse(
            br#"{ "z": 1.50, "a": [ 1e2, -0, 100000000000000000000000001 ], "m": "\u00e9\n" }"#,
        )
        .unwrap();
        assert_eq!(
            to_compact(&value),
            r#"{"z":1.50,"a":[1e+2,-0,100000000000000000000000001],"m":"é\n"}"#
        );
    }

    #[test]
    fn equal_numbers_have_equal_canonical_form() {
        for text in ["1", "1.0", "1e0", "10e-1", "0.1e1", "1.000e+0", "100e-2"] {
            assert_eq!(canonical_number_text(text), "1e0", "{text}");
        }
        for text in [
            "0",
            "-0",
            "0.0",
            "-0.0e5",
            "0e-99999999999999999999999999999999999",
        ] {
            assert_eq!(canonical_number_text(text), "0e0", "{text}");
        }
        assert_eq!(canonical_number_text("-120"), "-12e1");
        assert_eq!(canonical_number_text("0.00120"), "12e-4");
        assert_eq!(canonical_number_text("1e400"), "1e400");
    }

    #[test]
    fn huge_exponents_are_exact() {
        let big = format!("1{}", "0".repeat(40));
        assert_eq!(
            canonical_number_text(&format!("1e{big}")),
            format!("1e{big}")
        );
        let big_plus_one = format!("1{}1", "0".repeat(39));
        assert_eq!(
            canonical_number_text(&format!("10e{big}")),
            format!("1e{big_plus_one}")
        );
        assert_eq!(
            canonical_number_text(&format!("0.1e-{big}")),
            format!("1e-{big_plus_one}")
        );
        assert_eq!(
            canonical_number_text(&format!("0.1e{big}")),
            format!("1e{}", "9".repeat(40))
        );
        assert_eq!(
            digest_of(&format!("[10e{big}]")),
            digest_of(&format!("[1e{big_plus_one}]"))
        );
        assert_ne!(
            digest_of(&format!("[1e{big}]")),
            digest_of(&format!("[1e{big_plus_one}]"))
        );
    }

    #[test]
    fn digest_ignores_key_order_whitespace_and_number_spelling() {
        assert_eq!(
            digest_of(r#"{"a":1,"b":[true,null,"x"]}"#),
            digest_of(" { \"b\" : [ true , null , \"x\" ] ,\n \"a\" : 1.0 } ")
        );
        assert_eq!(digest_of("[-0]"), digest_of("[0]"));
        assert_eq!(digest_of(r#""\u0041""#), digest_of(r#""A""#));
    }

    #[test]
    fn object_digest_equals_digest_of_the_object() {
        let value = parse(br#"{"b":[1,2],"a":null,"c":{"x":"y"}}"#).unwrap();
        let members: Vec<(&str, &Value)> = value
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        assert_eq!(object_digest(&members), content_digest(&value));
    }

    #[test]
    fn digest_distinguishes_values() {
        let values = [
            "null",
            "true",
            "false",
            "0",
            "1",
            "-1",
            "0.1",
            "\"\"",
            "\"1\"",
            "[]",
            "{}",
            "[[]]",
            "[null]",
            r#"{"a":null}"#,
            r#"{"a":1}"#,
            r#"{"b":1}"#,
            r#"["a","b"]"#,
            r#"["ab"]"#,
            r#"["b","a"]"#,
            r#"{"a":"b"}"#,
            r#"{"ab":""}"#,
        ];
        let digests: std::collections::HashSet<Digest> =
            values.iter().map(|v| digest_of(v)).collect();
        assert_eq!(digests.len(), values.len());
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            (any::<i32>(), 0u32..4).prop_map(|(n, scale)| {
                let text = format!("{n}e-{scale}");
                Value::Number(text.parse().unwrap())
            }),
            "[a-c\u{e9}\"\\\\]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-d]{1,2}", inner), 0..5)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// Reverses the member order of every object, recursively.
    fn reversed(value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(reversed).collect()),
            Value::Object(members) => Value::Object(
                members
                    .iter()
                    .rev()
                    .map(|(k, v)| (k.clone(), reversed(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    proptest! {
        #[test]
        fn digest_ignores_member_order_and_whitespace(value in arb_json()) {
            let compact = to_compact(&value);
            let pretty = serde_json::to_string_pretty(&reversed(&value)).unwrap();
            let reparsed = parse(pretty.as_bytes()).unwrap();
            prop_assert_eq!(content_digest(&value), content_digest(&reparsed));
            prop_assert_eq!(content_digest(&value), content_digest(&parse(compact.as_bytes()).unwrap()));
        }

        #[test]
        fn digest_differs_when_values_differ(a in arb_json(), b in arb_json()) {
            let same = canonical_text(&a) == canonical_text(&b);
            prop_assert_eq!(same, content_digest(&a) == content_digest(&b));
        }

        #[test]
        fn compact_round_trips(value in arb_json()) {
            let compact = to_compact(&value);
            prop_assert_eq!(to_compact(&parse(compact.as_bytes()).unwrap()), compact);
        }
    }

    /// An independent, readable canonical form for the property test above.
    fn canonical_text(value: &Value) -> String {
        match value {
            Value::Number(n) => canonical_number(n),
            Value::Array(items) => {
                format!(
                    "[{}]",
                    items
                        .iter()
                        .map(canonical_text)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            Value::Object(members) => {
                let mut sorted: Vec<_> = members.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0));
                let parts: Vec<String> = sorted
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{}:{}",
                            to_compact(&Value::String((*k).clone())),
                            canonical_text(v)
                        )
                    })
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
            other => to_compact(other),
        }
    }
}
