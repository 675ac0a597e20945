//! Damage detection and repair decisions (no I/O): what a verified segment says about
//! the events the event index places in it, how to rebuild a segment's index file from
//! the segment itself, whether a copy of an event fetched from another replica may
//! replace a damaged record, and how fast the scrubber reads.
//!
//! The shell's scrubber reads a sealed segment through [`crate::codec::SegmentVerifier`]
//! and feeds every intact record and every damaged span to a [`SegmentAudit`] built from
//! the event index (the session runs of that segment and its index file). The audit's
//! [`AuditOutcome`] lists the events to repair from a peer, the damaged spans that hold
//! no event (other records: harmless while the shard snapshot covers them), and, when
//! the index file is damaged or wrong, the offsets to write in its place.
//!
//! Rebuilding an index file from the segment relies on one property of the log: once an
//! event `(session, seq)` is committed, no later record of the log carries that
//! identity with another content (a leader never proposes a seq its state already holds,
//! and snapshot histories carry committed events). So the *last* intact record with
//! the identity in the segment is the committed event, unless a damaged span after it
//! could hide a later copy: that event is then repaired from a peer instead.

use std::collections::HashMap;
use std::time::Duration;

use crate::codec::{record_crc, DamagedSpan, VerifiedRecord};
use crate::entry::{Command, LogRecord, REPAIR_TERM};
use crate::snapshot::Run;

/// An event the event index holds in the audited segment but whose record there is
/// damaged or cannot be found: it must be repaired from another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedEvent {
    pub session: String,
    pub seq: u64,
    /// Where its record was (the index file's offset, or its repaired copy's), if known.
    pub offset: Option<u64>,
    /// The crc32 the damaged record's frame header stored, if it looked sane.
    pub frame_crc: Option<u32>,
    pub reason: String,
}

/// What one segment's audit found.
#[derive(Debug, Default)]
pub struct AuditOutcome {
    /// Why the index file cannot be used as it is (damaged, missing, or pointing at
    /// records that are not its events); `rebuilt_index` then holds its offsets.
    pub index_problem: Option<String>,
    pub rebuilt_index: Option<Vec<u32>>,
    pub damaged_events: Vec<DamagedEvent>,
    /// Damaged spans that hold none of the indexed events (other records: Raft entries
    /// of other kinds, hard state, or bytes past the last batch).
    pub other_spans: Vec<DamagedSpan>,
    /// Every damaged span found.
    pub spans: usize,
    /// Intact records seen.
    pub records: u64,
}

/// Matches the event index of one sealed segment against the segment's verified
/// records (see the module docs). Feed it every record and span, then `finish`.
#[derive(Debug)]
pub struct SegmentAudit {
    /// Session → its runs in this segment.
    runs: HashMap<String, Vec<Run>>,
    /// The index file's offsets, or why it cannot be used.
    index: Result<Vec<u32>, String>,
    /// Positions of entries not yet committed, whose offsets the shell holds in memory.
    fixed: Vec<(u32, u32)>,
    /// Events read from a repaired copy instead of their runs: (session, seq) → offset
    /// of the copy when it is in this segment, None when it is elsewhere.
    repaired: HashMap<(String, u64), Option<u64>>,
    /// Per position: the index file's offset holds that event, intact.
    confirmed: Vec<bool>,
    /// Per position: offset of the last intact record of that event (`u64::MAX`: none).
    located: Vec<u64>,
    /// Repaired copies in this segment found intact.
    repaired_found: Vec<(String, u64)>,
    spans: Vec<DamagedSpan>,
    records: u64,
}

impl SegmentAudit {
    /// `runs`: every (session, run) of this segment in the event index; `index`: the
    /// index file's offsets or why it cannot be read; `fixed`: (position, offset) of
    /// uncommitted entries; `repaired`: events read from a repaired copy, with the
    /// copy's offset when it lies in this segment.
    pub fn new(
        runs: Vec<(String, Run)>,
        index: Result<Vec<u32>, String>,
        fixed: Vec<(u32, u32)>,
        repaired: Vec<(String, u64, Option<u64>)>,
    ) -> SegmentAudit {
        let mut by_session: HashMap<String, Vec<Run>> = HashMap::new();
        let mut positions = fixed
            .iter()
            .map(|&(p, _)| p as usize + 1)
            .max()
            .unwrap_or(0);
        for (session, run) in runs {
            positions = positions.max((run.start + run.count) as usize);
            by_session.entry(session).or_default().push(run);
        }
        SegmentAudit {
            runs: by_session,
            index,
            fixed,
            repaired: repaired
                .into_iter()
                .map(|(s, seq, at)| ((s, seq), at))
                .collect(),
            confirmed: vec![false; positions],
            located: vec![u64::MAX; positions],
            repaired_found: Vec::new(),
            spans: Vec::new(),
            records: 0,
        }
    }

    /// The index position of event `seq` of `session` in this segment, if it has one.
    fn position(&self, session: &str, seq: u64) -> Option<usize> {
        self.runs.get(session)?.iter().find_map(|r| {
            (r.first_seq..r.first_seq + r.count as u64)
                .contains(&seq)
                .then(|| (r.start + (seq - r.first_seq) as u32) as usize)
        })
    }

    pub fn record(&mut self, r: &VerifiedRecord) {
        self.records += 1;
        let Command::Append(e) = &r.record.command else {
            return;
        };
        if r.record.index == 0 && r.record.term == REPAIR_TERM {
            let key = (e.session_id.clone(), e.seq);
            if self.repaired.get(&key) == Some(&Some(r.offset)) {
                self.repaired_found.push(key);
            }
            return;
        }
        let Some(pos) = self.position(&e.session_id, e.seq) else {
            return;
        };
        self.located[pos] = r.offset;
        if let Ok(index) = &self.index {
            if index.get(pos).map(|&o| u64::from(o)) == Some(r.offset) {
                self.confirmed[pos] = true;
            }
        }
    }

    pub fn damaged(&mut self, span: DamagedSpan) {
        self.spans.push(span);
    }

    fn span_at(&self, offset: u64) -> Option<&DamagedSpan> {
        self.spans.iter().find(|s| s.contains(offset))
    }

    fn damaged_at(&self, session: &str, seq: u64, offset: Option<u64>, why: &str) -> DamagedEvent {
        let span = offset.and_then(|o| self.span_at(o));
        DamagedEvent {
            session: session.to_string(),
            seq,
            offset,
            frame_crc: span
                .filter(|s| Some(s.start) == offset)
                .and_then(|s| s.frame_crc),
            reason: span.map_or_else(|| why.to_string(), |s| s.reason.clone()),
        }
    }

    /// Every (position, session, seq) the runs hold, in position order.
    fn events(&self) -> Vec<(usize, &str, u64)> {
        let mut out = Vec::new();
        for (session, runs) in &self.runs {
            for run in runs {
                for k in 0..run.count {
                    let pos = (run.start + k) as usize;
                    out.push((pos, session.as_str(), run.first_seq + u64::from(k)));
                }
            }
        }
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    pub fn finish(self) -> AuditOutcome {
        let mut out = AuditOutcome {
            spans: self.spans.len(),
            records: self.records,
            ..AuditOutcome::default()
        };
        let events = self.events();
        let is_repaired = |s: &str, seq: u64| self.repaired.contains_key(&(s.to_string(), seq));
        let mut problem = self.index.as_ref().err().cloned();
        if let Ok(index) = &self.index {
            for &(pos, session, seq) in &events {
                if self.confirmed[pos] || is_repaired(session, seq) {
                    continue;
                }
                match index.get(pos).map(|&o| u64::from(o)) {
                    Some(o) if self.span_at(o).is_some() => out
                        .damaged_events
                        .push(self.damaged_at(session, seq, Some(o), "")),
                    Some(o) => {
                        problem.get_or_insert_with(|| {
                            format!(
                                "entry {pos} points at offset {o}, which does not hold event \
                                 {seq} of {session}"
                            )
                        });
                    }
                    None => {
                        problem.get_or_insert_with(|| {
                            format!(
                                "it holds {} entries, the event index needs {}",
                                index.len(),
                                self.confirmed.len()
                            )
                        });
                    }
                }
            }
        }
        if problem.is_some() {
            let (offsets, damaged) = self.rebuild(&events);
            out.rebuilt_index = Some(offsets);
            out.damaged_events = damaged;
        }
        out.index_problem = problem;
        for (key, at) in &self.repaired {
            let Some(offset) = *at else { continue };
            if !self.repaired_found.contains(key) {
                let why = "its repaired copy is not intact at its place";
                out.damaged_events
                    .push(self.damaged_at(&key.0, key.1, Some(offset), why));
            }
        }
        let mut used: Vec<u64> = out.damaged_events.iter().filter_map(|d| d.offset).collect();
        // The damaged originals of events repaired before are not news.
        if let Ok(index) = &self.index {
            for &(pos, session, seq) in &events {
                if is_repaired(session, seq) {
                    used.extend(index.get(pos).map(|&o| u64::from(o)));
                }
            }
        }
        out.other_spans = self
            .spans
            .iter()
            .filter(|s| !used.iter().any(|&o| s.contains(o)))
            .cloned()
            .collect();
        out.damaged_events
            .sort_by(|a, b| (&a.session, a.seq).cmp(&(&b.session, b.seq)));
        out
    }

    /// The index file rebuilt from the records found (last intact copy of each event,
    /// unless damage after it could hide a later one), and the events it cannot place.
    fn rebuild(&self, events: &[(usize, &str, u64)]) -> (Vec<u32>, Vec<DamagedEvent>) {
        let mut offsets = vec![0u32; self.confirmed.len()];
        for &(pos, offset) in &self.fixed {
            offsets[pos as usize] = offset;
        }
        let last_damage = self.spans.iter().map(|s| s.start).max();
        let old = self.index.as_ref().ok();
        let mut damaged = Vec::new();
        for &(pos, session, seq) in events {
            let found = self.located[pos];
            let trusted = found != u64::MAX && last_damage.is_none_or(|d| d < found);
            if trusted {
                offsets[pos] = u32::try_from(found).expect("segment offsets fit u32");
            } else if !self.repaired.contains_key(&(session.to_string(), seq)) {
                let at = old
                    .and_then(|i| i.get(pos))
                    .map(|&o| u64::from(o))
                    .filter(|&o| self.span_at(o).is_some());
                let why = if found == u64::MAX {
                    "no intact record of it in the segment"
                } else {
                    "damage after its last intact copy could hide the committed one"
                };
                damaged.push(self.damaged_at(session, seq, at, why));
            }
        }
        (offsets, damaged)
    }
}

/// Whether a copy of an event fetched from another replica may replace a damaged one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchVerdict {
    /// Its encoding, in one of the forms a replica stores an event in (a Raft entry, a
    /// snapshot's history event, a repaired copy), has the damaged frame's crc32: these
    /// are the original bytes.
    Original,
    /// Group, session and seq match, but the damaged frame's crc32 is unknown or the
    /// other replica holds the event in a form whose entry term and index this replica
    /// cannot rebuild. The other replica served it from its committed log after checking
    /// its own crc32, and committed events are the same on every replica: accepted.
    SameEvent,
    /// Not the event asked for.
    Wrong(String),
}

/// Checks a fetched record against the event `(session, seq)` of `group` that is
/// damaged here (its frame's stored crc32 in `frame_crc`, when known).
pub fn check_fetched(
    group: u16,
    session: &str,
    seq: u64,
    frame_crc: Option<u32>,
    fetched: &LogRecord,
) -> FetchVerdict {
    let Command::Append(e) = &fetched.command else {
        return FetchVerdict::Wrong(format!("not an event: {:?}", fetched.command));
    };
    if fetched.group != group || e.session_id != session || e.seq != seq {
        return FetchVerdict::Wrong(format!(
            "group {} event {} of {}, not group {group} event {seq} of {session}",
            fetched.group, e.seq, e.session_id
        ));
    }
    let Some(want) = frame_crc else {
        return FetchVerdict::SameEvent;
    };
    let forms = [(fetched.term, fetched.index), (0, 0), (REPAIR_TERM, 0)];
    let original = forms.into_iter().any(|(term, index)| {
        let form = LogRecord {
            group,
            term,
            index,
            command: fetched.command.clone(),
        };
        record_crc(&form) == want
    });
    if original {
        FetchVerdict::Original
    } else {
        FetchVerdict::SameEvent
    }
}

/// Contiguous ranges `(first, last)` of the sorted, distinct `seqs`, each at most
/// `max_len` long: the requests that fetch them from a peer.
pub fn seq_ranges(seqs: &[u64], max_len: u64) -> Vec<(u64, u64)> {
    assert!(max_len > 0);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &seq in seqs {
        match out.last_mut() {
            Some((first, last)) if seq == *last + 1 && seq - *first < max_len => *last = seq,
            _ => out.push((seq, seq)),
        }
    }
    out
}

/// How long the scrubber pauses after reading `bytes` to stay at `bytes_per_sec`.
pub fn scrub_pause(bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros((u128::from(bytes) * 1_000_000 / u128::from(bytes_per_sec)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::AppendEntry;

    fn event(session: &str, seq: u64) -> LogRecord {
        LogRecord {
            group: 5,
            term: 3,
            index: seq + 100,
            command: Command::Append(AppendEntry {
                session_id: session.into(),
                seq,
                inserted_at_us: 9,
                event_type: "t".into(),
                payload: "1".into(),
                actor: None,
                source: None,
                metadata: "{}".into(),
                refs: "{}".into(),
                idempotency_key: None,
                producer_id: None,
                producer_seq: None,
                digest: [0; 16],
            }),
        }
    }

    fn found(offset: u64, rec: LogRecord) -> VerifiedRecord {
        VerifiedRecord {
            offset,
            crc: record_crc(&rec),
            record: rec,
        }
    }

    fn run(first_seq: u64, count: u32, start: u32) -> Run {
        Run {
            epoch: 4,
            first_seq,
            count,
            start,
        }
    }

    fn span(start: u64, end: u64, frame_crc: Option<u32>) -> DamagedSpan {
        DamagedSpan {
            start,
            end,
            frame_crc,
            reason: "bad".into(),
        }
    }

    /// Session a: seqs 1..=3 at offsets 100, 200, 300 (positions 0..3); b: seq 7 at 400.
    fn audit(index: Result<Vec<u32>, String>) -> SegmentAudit {
        SegmentAudit::new(
            vec![("a".into(), run(1, 3, 0)), ("b".into(), run(7, 1, 3))],
            index,
            vec![(4, 500)],
            Vec::new(),
        )
    }

    const OFFSETS: [u32; 5] = [100, 200, 300, 400, 500];

    #[test]
    fn an_intact_segment_needs_nothing() {
        let mut a = audit(Ok(OFFSETS.to_vec()));
        for (i, seq) in [1, 2, 3].into_iter().enumerate() {
            a.record(&found(100 * (i as u64 + 1), event("a", seq)));
        }
        a.record(&found(400, event("b", 7)));
        let out = a.finish();
        assert!(out.damaged_events.is_empty() && out.index_problem.is_none());
        assert!(out.rebuilt_index.is_none() && out.other_spans.is_empty());
    }

    #[test]
    fn a_damaged_record_is_an_event_to_repair_with_its_frame_crc() {
        let mut a = audit(Ok(OFFSETS.to_vec()));
        a.record(&found(100, event("a", 1)));
        a.damaged(span(200, 280, Some(0xabcd)));
        a.record(&found(300, event("a", 3)));
        a.record(&found(400, event("b", 7)));
        a.damaged(span(600, 4096, None)); // some other record
        let out = a.finish();
        assert!(out.index_problem.is_none());
        assert_eq!(out.damaged_events.len(), 1);
        let d = &out.damaged_events[0];
        assert_eq!((d.session.as_str(), d.seq), ("a", 2));
        assert_eq!((d.offset, d.frame_crc), (Some(200), Some(0xabcd)));
        assert_eq!(out.other_spans.len(), 1);
        assert_eq!(out.other_spans[0].start, 600);
    }

    #[test]
    fn a_damaged_index_file_is_rebuilt_from_the_last_intact_copies() {
        let mut a = audit(Err("checksum mismatch".into()));
        // An uncommitted version of a/2 was written first, then the committed one.
        a.record(&found(100, event("a", 1)));
        a.record(&found(150, event("a", 2)));
        a.record(&found(200, event("a", 2)));
        a.record(&found(300, event("a", 3)));
        a.record(&found(400, event("b", 7)));
        let out = a.finish();
        assert_eq!(out.index_problem.as_deref(), Some("checksum mismatch"));
        assert_eq!(out.rebuilt_index, Some(OFFSETS.to_vec()));
        assert!(out.damaged_events.is_empty());
    }

    #[test]
    fn damage_after_a_copy_makes_that_event_a_repair_not_a_guess() {
        let mut a = audit(Err("unreadable".into()));
        a.record(&found(100, event("a", 1)));
        a.record(&found(150, event("a", 2))); // an earlier version, perhaps
        a.damaged(span(200, 280, None)); // the committed a/2 may be in here
        a.record(&found(300, event("a", 3)));
        a.record(&found(400, event("b", 7)));
        let out = a.finish();
        let damaged: Vec<(&str, u64)> = out
            .damaged_events
            .iter()
            .map(|d| (d.session.as_str(), d.seq))
            .collect();
        // a/1 lies before the damage too: it cannot be trusted either.
        assert_eq!(damaged, vec![("a", 1), ("a", 2)]);
        let rebuilt = out.rebuilt_index.unwrap();
        assert_eq!(&rebuilt[2..], &[300, 400, 500]);
    }

    #[test]
    fn an_index_pointing_at_other_records_is_rebuilt() {
        let mut a = audit(Ok(vec![100, 300, 200, 400, 500]));
        a.record(&found(100, event("a", 1)));
        a.record(&found(200, event("a", 2)));
        a.record(&found(300, event("a", 3)));
        a.record(&found(400, event("b", 7)));
        let out = a.finish();
        assert!(out
            .index_problem
            .unwrap()
            .contains("entry 1 points at offset 300"));
        assert_eq!(out.rebuilt_index, Some(OFFSETS.to_vec()));
        // Too short an index is a problem too.
        let mut a = audit(Ok(vec![100, 200]));
        a.record(&found(100, event("a", 1)));
        a.record(&found(200, event("a", 2)));
        a.record(&found(300, event("a", 3)));
        a.record(&found(400, event("b", 7)));
        let out = a.finish();
        assert!(out.index_problem.unwrap().contains("holds 2 entries"));
    }

    #[test]
    fn repaired_events_are_checked_at_their_copy_not_their_original() {
        let mut copy = event("a", 2);
        copy.term = REPAIR_TERM;
        copy.index = 0;
        let mut a = SegmentAudit::new(
            vec![("a".into(), run(1, 3, 0))],
            Ok(vec![100, 200, 300]),
            Vec::new(),
            vec![("a".into(), 2, Some(900)), ("a".into(), 3, Some(1000))],
        );
        a.record(&found(100, event("a", 1)));
        a.damaged(span(200, 280, None)); // the original of a/2, repaired earlier
        a.record(&found(300, event("a", 3)));
        a.record(&found(900, copy));
        a.damaged(span(1000, 1100, Some(7))); // a/3's repaired copy broke
        let out = a.finish();
        assert_eq!(out.damaged_events.len(), 1);
        assert_eq!(out.damaged_events[0].seq, 3);
        assert_eq!(out.damaged_events[0].frame_crc, Some(7));
        assert!(
            out.other_spans.is_empty(),
            "the old original's span is known"
        );
        assert_eq!(out.spans, 2);
    }

    #[test]
    fn a_fetched_copy_is_original_when_its_crc_matches_any_stored_form() {
        let entry = event("a", 2);
        let crc = record_crc(&entry);
        assert_eq!(
            check_fetched(5, "a", 2, Some(crc), &entry),
            FetchVerdict::Original
        );
        // Held here as a snapshot's history event, there as an entry.
        let mut history = entry.clone();
        history.term = 0;
        history.index = 0;
        assert_eq!(
            check_fetched(5, "a", 2, Some(record_crc(&history)), &entry),
            FetchVerdict::Original
        );
        assert_eq!(
            check_fetched(5, "a", 2, None, &entry),
            FetchVerdict::SameEvent
        );
        assert_eq!(
            check_fetched(5, "a", 2, Some(crc ^ 1), &entry),
            FetchVerdict::SameEvent
        );
        assert!(matches!(
            check_fetched(5, "a", 3, Some(crc), &entry),
            FetchVerdict::Wrong(_)
        ));
        assert!(matches!(
            check_fetched(6, "a", 2, None, &entry),
            FetchVerdict::Wrong(_)
        ));
    }

    #[test]
    fn seqs_are_fetched_in_bounded_contiguous_ranges() {
        assert_eq!(
            seq_ranges(&[1, 2, 3, 5, 6, 9], 2),
            vec![(1, 2), (3, 3), (5, 6), (9, 9)]
        );
        assert!(seq_ranges(&[], 4).is_empty());
    }

    #[test]
    fn the_scrubber_pauses_to_hold_its_rate() {
        assert_eq!(scrub_pause(8 << 20, 8 << 20), Duration::from_secs(1));
        assert_eq!(scrub_pause(1 << 20, 8 << 20), Duration::from_millis(125));
        assert_eq!(scrub_pause(1, 0), Duration::ZERO);
    }
}
