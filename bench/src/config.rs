//! Command-line value parsing and the run configuration shared by all modes.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::Rng;

/// One server address the benchmark talks to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL exactly as given (for display).
    pub url: String,
    /// Resolved once at start-up; every connection to this target goes to exactly this
    /// address.
    pub addr: SocketAddr,
    /// Value of the `Host` header (the authority as given in the URL).
    pub host: String,
}

impl Target {
    /// Parses `http://host:port` (or bare `host:port`); only plain http, no path.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = match url.find("://") {
            Some(pos) if url[..pos].eq_ignore_ascii_case("http") => &url[pos + 3..],
            Some(_) => {
                return Err(format!(
                    "unsupported scheme in {url:?}: only http:// is supported"
                ))
            }
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "expected http://host:port without a path, got {url:?}"
            ));
        }
        let (host, port) = split_host_port(authority)?;
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority} resolved to no address"))?;
        Ok(Target {
            url: url.to_string(),
            addr,
            host: authority.to_string(),
        })
    }

    /// Parses a comma-separated list of targets (`http://a:1,http://b:2`); whitespace
    /// around an item is ignored. A value without a comma is exactly [`Target::parse`].
    /// The result is never empty; duplicates are kept (they weight that target).
    pub fn parse_list(list: &str) -> Result<Vec<Target>, String> {
        if !list.contains(',') {
            return Target::parse(list).map(|t| vec![t]);
        }
        let items: Vec<&str> = list.split(',').map(str::trim).collect();
        let n = items.len();
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                if item.is_empty() {
                    return Err(format!(
                        "target {} of {n} in the URL list {list:?} is empty \
                         (expected http://host:port,http://host:port,...)",
                        i + 1
                    ));
                }
                Target::parse(item)
                    .map_err(|e| format!("target {} of {n} in the URL list: {e}", i + 1))
            })
            .collect()
    }
}

/// Human-readable target list for the run header: `url (addr)` for one target (as
/// before multi-target support), `n targets [url (addr), ...]` for several.
pub fn describe_targets(targets: &[Target]) -> String {
    let each: Vec<String> = targets
        .iter()
        .map(|t| format!("{} ({})", t.url, t.addr))
        .collect();
    match each.as_slice() {
        [one] => one.clone(),
        many => format!("{} targets [{}]", many.len(), many.join(", ")),
    }
}

fn split_host_port(authority: &str) -> Result<(&str, u16), String> {
    let bad = || format!("bad host:port {authority:?}");
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => 80,
            p => p
                .strip_prefix(':')
                .ok_or_else(bad)?
                .parse()
                .map_err(|_| bad())?,
        };
        return Ok((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Ok((host, port.parse().map_err(|_| bad())?)),
        Some(_) => Err(bad()),
        None => Ok((authority, 80)),
    }
}

/// Parses `60`, `60s`, `1.5s`, `500ms`, `2m`, `1h`. A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 60s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("bad duration unit {other:?} in {s:?}")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A random session-id prefix so that runs do not collide.
pub fn random_prefix() -> String {
    let tag: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(8)
        .map(char::from)
        .collect();
    format!("bench-{tag}")
}

/// Session ids allow `A-Z a-z 0-9 _ - . :`; the prefix must keep every id within that rule
/// and within 128 bytes once `-<number>` is appended.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > 100 {
        return Err("session prefix must be 1..=100 bytes".into());
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(format!(
            "session prefix {prefix:?} may only contain A-Z a-z 0-9 _ - . :"
        ));
    }
    Ok(())
}

/// Everything a load run needs (the rate is passed separately so find-max can step it).
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Never empty. Connection `i` (load and setup alike) talks to `targets[i % n]`.
    pub targets: Vec<Target>,
    pub duration: Duration,
    pub warmup: Duration,
    pub sessions: u64,
    pub connections: usize,
    pub payload_bytes: usize,
    pub session_prefix: String,
    pub idempotency: bool,
    /// Per-request limit (connect + send + full response).
    pub timeout: Duration,
}

impl LoadConfig {
    pub fn session_id(&self, n: u64) -> String {
        format!("{}-{}", self.session_prefix, n)
    }

    /// The target of connection `i`: round-robin over the targets.
    pub fn target(&self, i: usize) -> &Target {
        &self.targets[i % self.targets.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:4000").unwrap();
        assert_eq!(t.addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:4000");
        let t = Target::parse("127.0.0.1:4001/").unwrap();
        assert_eq!(t.addr.port(), 4001);
        let t = Target::parse("http://[::1]:4002").unwrap();
        assert_eq!(t.addr, "[::1]:4002".parse().unwrap());
        assert!(Target::parse("https://127.0.0.1:4000").is_err());
        assert!(Target::parse("http://127.0.0.1:4000/v1").is_err());
        assert!(Target::parse("http://127.0.0.1:notaport").is_err());
    }

    #[test]
    fn url_lists() {
        // One URL: exactly Target::parse (no trimming, url kept verbatim).
        let one = Target::parse_list("http://127.0.0.1:4000").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].url, "http://127.0.0.1:4000");
        assert_eq!(one[0].addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(
            Target::parse_list("http://127.0.0.1:4000/v1").unwrap_err(),
            Target::parse("http://127.0.0.1:4000/v1").unwrap_err()
        );
        assert!(Target::parse_list("").is_err());

        let three =
            Target::parse_list("http://127.0.0.1:4001, http://127.0.0.1:4002 ,127.0.0.1:4003/")
                .unwrap();
        let ports: Vec<u16> = three.iter().map(|t| t.addr.port()).collect();
        assert_eq!(ports, [4001, 4002, 4003]);
        assert_eq!(three[1].url, "http://127.0.0.1:4002");
        assert_eq!(three[2].host, "127.0.0.1:4003");
        assert_eq!(
            describe_targets(&three[..1]),
            "http://127.0.0.1:4001 (127.0.0.1:4001)"
        );
        assert_eq!(
            describe_targets(&three),
            "3 targets [http://127.0.0.1:4001 (127.0.0.1:4001), \
             http://127.0.0.1:4002 (127.0.0.1:4002), 127.0.0.1:4003/ (127.0.0.1:4003)]"
        );

        for (list, bad) in [
            (
                "http://127.0.0.1:4001,,http://127.0.0.1:4003",
                "target 2 of 3",
            ),
            ("http://127.0.0.1:4001,", "target 2 of 2"),
            (",http://127.0.0.1:4001", "target 1 of 2"),
            (
                "http://127.0.0.1:4001, ,http://127.0.0.1:4003",
                "target 2 of 3",
            ),
            (",", "target 1 of 2"),
        ] {
            let e = Target::parse_list(list).unwrap_err();
            assert!(e.contains(bad) && e.contains("is empty"), "{list:?}: {e}");
        }
        for (list, bad) in [
            (
                "http://127.0.0.1:4001,https://127.0.0.1:4002",
                "target 2 of 2",
            ),
            (
                "http://127.0.0.1:4001,http://127.0.0.1:4002/v1",
                "target 2 of 2",
            ),
            (
                "http://127.0.0.1:nope,http://127.0.0.1:4002",
                "target 1 of 2",
            ),
        ] {
            let e = Target::parse_list(list).unwrap_err();
            assert!(
                e.starts_with(bad) && e.contains("127.0.0.1"),
                "{list:?}: {e}"
            );
        }
    }

    #[test]
    fn connections_round_robin() {
        let cfg = LoadConfig {
            targets: Target::parse_list("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3").unwrap(),
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            sessions: 1,
            connections: 7,
            payload_bytes: 0,
            session_prefix: "t".into(),
            idempotency: false,
            timeout: Duration::from_secs(1),
        };
        let ports: Vec<u16> = (0..7).map(|i| cfg.target(i).addr.port()).collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix(&random_prefix()).is_ok());
        assert!(validate_prefix("a.b:c_d-1").is_ok());
        assert!(validate_prefix("has space").is_err());
        assert!(validate_prefix("").is_err());
    }
}
