//! Listing pages (`GET /v1/sessions`, API.md "Hardening rules (v1.1)"): a page holds at
//! most [`PAGE_BYTES_MAX`] and examines at most [`EXAMINED_SESSIONS_MAX`] sessions.
//!
//! Every shard scans the sessions of its groups in bytewise id order ([`Scan`]), a chunk
//! at a time so that the shell can yield to other tasks between chunks, and stops at
//! `limit + 1` matches, at its share of the examination budget, or at the end. Its part
//! of the page ([`Part`]) says up to which id it is complete. [`merge`] keeps only what
//! every shard has seen (ids up to the smallest such bound), so a session that a shard
//! did not reach is never skipped: it is on a later page. A page may therefore hold
//! fewer than `limit` sessions, even none, while `next_cursor` is not null.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::session::{GroupState, SessionView};

/// Largest listing response body.
pub const PAGE_BYTES_MAX: usize = 4 << 20;

/// Sessions one page examines at most, over all shards of the node.
pub const EXAMINED_SESSIONS_MAX: usize = 10_000;

/// Listing scans one shard runs at once; more wait their turn (waiting costs nothing).
/// Each running scan is one more task that a shard's ready append may have to wait
/// behind (one chunk each), so listings, however many, take a bounded share of the
/// shard. One at a time measured better for appends than two (docs/benchmarks.md).
pub const SCANS_AT_ONCE_MAX: usize = 1;

/// Sessions a shard examines between two yields to its executor (well under 1 ms of
/// work with a filter on small metadata; each chunk also restarts the merge of the
/// shard's groups, which is why it is not smaller).
pub const SCAN_CHUNK_SESSIONS: usize = 512;

/// Metadata bytes a shard's filter may look at between two yields (a filter parses the
/// metadata, up to 64 KiB per session).
pub const SCAN_CHUNK_METADATA_BYTES: usize = 1 << 20;

/// Room for `{"sessions":[`, `],"next_cursor":` and a cursor (an id of at most 128
/// plain bytes) around the sessions of a page.
const PAGE_ENVELOPE_BYTES: usize = 1024;

/// Bytes of rendered sessions (with their separating commas) a page may hold.
pub const PAGE_SESSIONS_BYTES_MAX: usize = PAGE_BYTES_MAX - PAGE_ENVELOPE_BYTES;

/// One shard's examination budget: its share of [`EXAMINED_SESSIONS_MAX`].
pub fn examined_per_shard(shards: usize) -> usize {
    assert!(shards > 0);
    (EXAMINED_SESSIONS_MAX / shards).max(1)
}

/// One shard's scan of its sessions in id order, resumable between chunks.
#[derive(Debug)]
pub struct Scan {
    /// The last id examined (exclusive start of the next chunk).
    position: Option<String>,
    matches_max: usize,
    examine_left: usize,
    matched: Vec<String>,
    /// No session after `position` exists in these groups.
    exhausted: bool,
}

/// What a finished [`Scan`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Matching ids, ascending.
    pub ids: Vec<String>,
    /// Every matching session with an id up to this one is in `ids`; None: every
    /// matching session after the cursor is.
    pub complete_through: Option<String>,
}

impl Scan {
    /// A scan of the ids after `after` that stops at `matches_max` matches or after
    /// examining `examine_max` sessions.
    pub fn new(after: Option<String>, matches_max: usize, examine_max: usize) -> Scan {
        assert!(matches_max > 0 && examine_max > 0);
        Scan {
            position: after,
            matches_max,
            examine_left: examine_max,
            matched: Vec::new(),
            exhausted: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.exhausted || self.examine_left == 0 || self.matched.len() >= self.matches_max
    }

    /// Examines the next sessions of `groups` in id order (merged over the groups), at
    /// most `SCAN_CHUNK_SESSIONS` of them or [`SCAN_CHUNK_METADATA_BYTES`] of their
    /// metadata, and keeps those `wanted` accepts. Returns whether the scan is finished.
    ///
    /// The groups may change between chunks (the scan holds no borrow); the scan goes on
    /// from the last id it examined.
    pub fn step<'a>(
        &mut self,
        groups: impl Iterator<Item = &'a GroupState>,
        wanted: impl Fn(&SessionView) -> bool,
    ) -> bool {
        if self.is_finished() {
            return true;
        }
        let from = self.position.take();
        let mut cursors: Vec<_> = groups.map(|g| g.views_after(from.as_deref())).collect();
        // The smallest next id of every group; ids are unique across groups.
        let mut heads: BinaryHeap<Reverse<(&'a str, usize)>> = BinaryHeap::new();
        let mut views: Vec<Option<&'a SessionView>> = Vec::with_capacity(cursors.len());
        for (i, cursor) in cursors.iter_mut().enumerate() {
            let view = cursor.next();
            if let Some(v) = view {
                heads.push(Reverse((v.id.as_str(), i)));
            }
            views.push(view);
        }
        let (mut sessions, mut metadata_bytes) = (0, 0);
        let mut last: Option<&'a str> = None;
        while sessions < SCAN_CHUNK_SESSIONS && metadata_bytes < SCAN_CHUNK_METADATA_BYTES {
            let Some(Reverse((_, i))) = heads.pop() else {
                self.exhausted = true;
                break;
            };
            let view = views[i].expect("a group in the heap has a head");
            views[i] = cursors[i].next();
            if let Some(next) = views[i] {
                heads.push(Reverse((next.id.as_str(), i)));
            }
            sessions += 1;
            metadata_bytes += view.metadata.len();
            self.examine_left -= 1;
            last = Some(&view.id);
            if wanted(view) {
                self.matched.push(view.id.clone());
            }
            if self.examine_left == 0 || self.matched.len() >= self.matches_max {
                break;
            }
        }
        self.position = last.map(str::to_owned).or(from);
        self.is_finished()
    }

    pub fn finish(self) -> Found {
        assert!(
            self.is_finished(),
            "a scan is finished before its result is used"
        );
        let complete_through = if self.exhausted { None } else { self.position };
        Found {
            ids: self.matched,
            complete_through,
        }
    }
}

/// One shard's part of a page: rendered sessions in id order and the id up to which
/// they are complete (see [`Found`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Part {
    pub sessions: Vec<(String, String)>,
    pub complete_through: Option<String>,
}

/// Renders the sessions of `found` in order, as many as fit in
/// [`PAGE_SESSIONS_BYTES_MAX`] (always the first). `render` gives None for a session
/// gone since the scan (its group moved away): it is left out.
pub fn render_part(found: Found, mut render: impl FnMut(&str) -> Option<String>) -> Part {
    let mut sessions = Vec::new();
    let mut bytes = 0;
    let mut complete_through = found.complete_through;
    for id in found.ids {
        let Some(text) = render(&id) else { continue };
        let size = text.len() + 1;
        if !sessions.is_empty() && bytes + size > PAGE_SESSIONS_BYTES_MAX {
            // Complete only up to the last session kept: the rest is for a later page.
            complete_through = sessions.last().map(|(id, _): &(String, String)| id.clone());
            break;
        }
        bytes += size;
        sessions.push((id, text));
    }
    Part {
        sessions,
        complete_through,
    }
}

/// A page: sessions in id order and the cursor of the next page (None: no further
/// matching session exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub sessions: Vec<(String, String)>,
    pub next_cursor: Option<String>,
}

/// Merges the shards' parts into a page of at most `limit` sessions and
/// [`PAGE_SESSIONS_BYTES_MAX`] of them.
pub fn merge(parts: Vec<Part>, limit: usize) -> Page {
    assert!(limit > 0);
    // Every shard has seen every id up to `bound`: beyond it a session may be missing.
    let bound: Option<String> = parts
        .iter()
        .filter_map(|p| p.complete_through.clone())
        .min_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut candidates: Vec<(String, String)> = parts
        .into_iter()
        .flat_map(|p| p.sessions)
        .filter(|(id, _)| {
            bound
                .as_deref()
                .is_none_or(|b| id.as_bytes() <= b.as_bytes())
        })
        .collect();
    candidates.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let total = candidates.len();
    let mut bytes = 0;
    let mut kept = 0;
    for (_, text) in &candidates {
        let size = text.len() + 1;
        if kept == limit || (kept > 0 && bytes + size > PAGE_SESSIONS_BYTES_MAX) {
            break;
        }
        bytes += size;
        kept += 1;
    }
    candidates.truncate(kept);
    let next_cursor = if kept < total {
        // Cut by `limit` or by bytes: the next page starts after the last one kept.
        candidates.last().map(|(id, _)| id.clone())
    } else {
        bound
    };
    Page {
        sessions: candidates,
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Limits;

    fn text(id: &str, bytes: usize) -> String {
        format!("{id}:{}", "x".repeat(bytes))
    }

    fn part(ids: &[&str], complete_through: Option<&str>) -> Part {
        Part {
            sessions: ids
                .iter()
                .map(|id| (id.to_string(), text(id, 10)))
                .collect(),
            complete_through: complete_through.map(str::to_string),
        }
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.sessions.iter().map(|(id, _)| id.as_str()).collect()
    }

    #[test]
    fn merge_keeps_only_ids_every_shard_has_seen() {
        // Shard 0 stopped at "m" (budget); shard 1 went to the end.
        let page = merge(
            vec![part(&["b", "k"], Some("m")), part(&["c", "p", "z"], None)],
            10,
        );
        assert_eq!(ids(&page), ["b", "c", "k"]);
        assert_eq!(page.next_cursor.as_deref(), Some("m"));
        // Nothing seen by all: an empty page that still moves on.
        let page = merge(vec![part(&[], Some("d")), part(&["q"], None)], 10);
        assert_eq!(ids(&page), Vec::<&str>::new());
        assert_eq!(page.next_cursor.as_deref(), Some("d"));
    }

    #[test]
    fn merge_cuts_at_limit_and_ends_with_null_only_when_complete() {
        let page = merge(vec![part(&["a", "c"], None), part(&["b", "d"], None)], 3);
        assert_eq!(ids(&page), ["a", "b", "c"]);
        assert_eq!(page.next_cursor.as_deref(), Some("c"));
        let page = merge(vec![part(&["a", "c"], None), part(&["b"], None)], 3);
        assert_eq!(page.next_cursor, None);
        // A shard that stopped at limit + 1 matches bounds the page by its last match.
        let page = merge(
            vec![part(&["a", "b", "e"], Some("e")), part(&["c"], None)],
            2,
        );
        assert_eq!(ids(&page), ["a", "b"]);
        assert_eq!(page.next_cursor.as_deref(), Some("b"));
    }

    #[test]
    fn merge_cuts_at_page_bytes_but_keeps_at_least_one() {
        let big = PAGE_SESSIONS_BYTES_MAX / 3;
        let sessions = ["a", "b", "c", "d"].map(|id| (id.to_string(), text(id, big)));
        let page = merge(
            vec![Part {
                sessions: sessions.to_vec(),
                complete_through: None,
            }],
            1000,
        );
        assert_eq!(ids(&page), ["a", "b"]);
        assert_eq!(page.next_cursor.as_deref(), Some("b"));
        let huge = vec![("a".to_string(), text("a", PAGE_SESSIONS_BYTES_MAX))];
        let page = merge(
            vec![Part {
                sessions: huge,
                complete_through: None,
            }],
            10,
        );
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(page.next_cursor, None);
    }

    #[test]
    fn render_part_stops_at_the_byte_limit() {
        let found = Found {
            ids: vec!["a".into(), "b".into(), "c".into(), "gone".into()],
            complete_through: None,
        };
        let big = PAGE_SESSIONS_BYTES_MAX / 2;
        let part = render_part(found.clone(), |id| Some(text(id, big)));
        assert_eq!(part.sessions.len(), 1);
        assert_eq!(part.complete_through.as_deref(), Some("a"));
        let part = render_part(found, |id| (id != "gone").then(|| text(id, 5)));
        assert_eq!(part.sessions.len(), 3);
        assert_eq!(part.complete_through, None);
    }

    fn groups_with(ids: &[&str], groups: usize) -> Vec<GroupState> {
        let mut states: Vec<GroupState> = (0..groups)
            .map(|_| GroupState::new(Limits::default()))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            let tag = if n % 3 == 0 { "a" } else { "b" };
            let body = format!(r#"{{"metadata":{{"tag":"{tag}"}}}}"#);
            let new = crate::validate::validate_create(body.as_bytes()).unwrap();
            let state = &mut states[n % groups];
            let command = state.decide_create(&new, id.to_string(), 1).unwrap();
            state.apply(&command);
            state.commit(&command);
        }
        states
    }

    fn run(states: &[GroupState], scan: &mut Scan, tag: &str) -> usize {
        let mut chunks = 0;
        loop {
            chunks += 1;
            let wanted = |v: &SessionView| v.metadata.contains(tag);
            if scan.step(states.iter(), wanted) {
                return chunks;
            }
        }
    }

    #[test]
    fn scan_merges_groups_in_id_order_within_its_budget() {
        let all: Vec<String> = (0..1000).map(|n| format!("s{n:04}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let states = groups_with(&refs, 7);
        // Budget: 600 examined, no match cap reached.
        let mut scan = Scan::new(Some("s0099".into()), 10_000, 600);
        let chunks = run(&states, &mut scan, "\"a\"");
        assert!(chunks > 600 / SCAN_CHUNK_SESSIONS, "{chunks} chunks");
        let found = scan.finish();
        assert_eq!(found.complete_through.as_deref(), Some("s0699"));
        let expected: Vec<String> = (100..700)
            .filter(|n| n % 3 == 0)
            .map(|n| format!("s{n:04}"))
            .collect();
        assert_eq!(found.ids, expected);
        // A match cap: stops at the cap-th match.
        let mut scan = Scan::new(None, 3, 10_000);
        run(&states, &mut scan, "\"a\"");
        let found = scan.finish();
        assert_eq!(found.ids, ["s0000", "s0003", "s0006"]);
        assert_eq!(found.complete_through.as_deref(), Some("s0006"));
        // The end: complete.
        let mut scan = Scan::new(Some("s0990".into()), 100, 100);
        run(&states, &mut scan, "\"b\"");
        let found = scan.finish();
        assert_eq!(found.complete_through, None);
        assert_eq!(found.ids.len(), 6);
    }
}
