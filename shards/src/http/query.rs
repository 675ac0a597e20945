//! Query strings: `name=value` pairs and their percent-escapes (API.md, "Hardening
//! rules (v1.1)": a malformed escape is refused with the parameter's 400, never
//! dropped). Fuzzed by `shards/fuzz`, target `query_string`.

use crate::validate::FieldError;

/// A query string's `name=value` pairs, percent-decoded (`+` is a space, as browsers
/// send). A pair with a malformed escape (`%` not followed by two hex digits, or bytes
/// that are not UTF-8) keeps its raw name and no value: the parameter it names is
/// refused with that parameter's error code, never skipped (API.md, "Hardening rules
/// (v1.1)"), so `metadata.k=%zz` cannot turn a filtered listing into a full one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, Option<String>)>,
}

/// A parameter whose name or value has a malformed percent-escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The prefix of a metadata filter parameter, `metadata.KEY=VALUE`.
pub const METADATA_FILTER_PREFIX: &str = "metadata.";

impl Query {
    pub fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (name, value) = part.split_once('=').unwrap_or((part, ""));
                let decode = |text: &str| percent_decode(&text.replace('+', " "));
                match (decode(name), decode(value)) {
                    (Some(name), value) => (name, value),
                    (None, _) => (name.to_owned(), None),
                }
            })
            .collect();
        Query { pairs }
    }

    /// Every pair in the order sent: the decoded name (the raw one when it does not
    /// decode) and the decoded value, None when the pair is malformed.
    pub fn pairs(&self) -> &[(String, Option<String>)] {
        &self.pairs
    }

    /// The first value of `name`, if the parameter is there.
    pub fn get(&self, name: &str) -> Result<Option<&str>, Malformed> {
        match self.pairs.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(value))) => Ok(Some(value)),
            Some((_, None)) => Err(Malformed),
        }
    }

    /// Every `metadata.KEY=VALUE` filter as (KEY, VALUE), in the order sent; a
    /// malformed one is 400 `invalid_filter` naming the parameter.
    pub fn metadata_filters(&self) -> Result<Vec<(String, String)>, FieldError> {
        let mut filters = Vec::new();
        for (name, value) in &self.pairs {
            let Some(key) = name.strip_prefix(METADATA_FILTER_PREFIX) else {
                continue;
            };
            let Some(value) = value else {
                return Err(FieldError::new(
                    "invalid_filter",
                    Some(name),
                    "the filter has a malformed percent-escape (% must be followed by two \
                     hex digits, and the decoded bytes must be UTF-8)",
                ));
            };
            filters.push((key.to_owned(), value.clone()));
        }
        Ok(filters)
    }
}

/// Decodes `%XX` escapes; None for a malformed escape or bytes that are not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    // The crate passes a malformed escape through unchanged; API.md refuses it.
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    let decoded = percent_encoding::percent_decode(bytes).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let query = Query::parse("metadata.user=a%20b&limit=5&x=1+2&x=3&y");
        assert_eq!(query.get("metadata.user"), Ok(Some("a b")));
        assert_eq!(query.get("x"), Ok(Some("1 2")), "the first one counts");
        assert_eq!(query.get("y"), Ok(Some("")));
        assert_eq!(query.get("z"), Ok(None));
        assert_eq!(
            query.metadata_filters().unwrap(),
            vec![("user".to_owned(), "a b".to_owned())]
        );
        assert_eq!(
            Query::parse("a%2Bb=%2B&&=").pairs(),
            &[
                ("a+b".to_owned(), Some("+".to_owned())),
                (String::new(), Some(String::new()))
            ]
        );
    }

    #[test]
    fn malformed_percent_escapes_are_refused_not_dropped() {
        for bad in ["%zz", "%", "%4", "a%g1", "%+1", "%ff", "%C3%28", "%%41"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
            let query = Query::parse(&format!("cursor={bad}&{bad}=1"));
            assert_eq!(query.get("cursor"), Err(Malformed), "{bad}");
            assert_eq!(query.get(bad), Err(Malformed), "a raw name is kept: {bad}");
        }
        assert_eq!(percent_decode("%41%c3%a9+").as_deref(), Some("Aé+"));
        for filter in [
            "metadata.k=%zz",
            "metadata.%zz=v",
            "metadata.k=ok&metadata.j=%",
        ] {
            let error = Query::parse(filter).metadata_filters().unwrap_err();
            assert_eq!(error.code, "invalid_filter", "{filter}");
            assert!(error.field.unwrap().starts_with("metadata."), "{filter}");
        }
        // An unknown parameter stays ignored, malformed or not.
        assert!(Query::parse("other=%zz")
            .metadata_filters()
            .unwrap()
            .is_empty());
    }
}
