//! Reads of events and listings: a page of a session's events from the hot window,
//! the log (damaged copies from another replica, see `damage`) or the archive; tails
//! waiting for a session's next commit; this shard's part of a listing page.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use shards::listing;
use shards::validate::render_event;

use super::{event_bytes, ShardCore};
use crate::node::with_timeout;
use crate::ops::{ApiError, ArchivedFilter, Reply};
use crate::store::{Cold, ReadPlan};
use crate::wal::{ReadError, RecordLocation};

/// Tails waiting for the next committed event of a session.
#[derive(Default)]
pub(super) struct TailWaiters {
    by_session: HashMap<String, Vec<oneshot::Sender<()>>>,
}

impl TailWaiters {
    fn add(&mut self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.by_session.entry(id.to_string()).or_default().push(tx);
        rx
    }

    /// Drops the waiters of `id` that stopped waiting (timed out), so idle sessions
    /// collect no garbage.
    fn forget_gone(&mut self, id: &str) {
        if let Some(list) = self.by_session.get_mut(id) {
            list.retain(|tx| !tx.is_canceled());
            if list.is_empty() {
                self.by_session.remove(id);
            }
        }
    }

    /// Wakes every tail waiting on `session`.
    fn wake(&mut self, session: &str) {
        if let Some(waiters) = self.by_session.remove(session) {
            for tx in waiters {
                let _ = tx.send(());
            }
        }
    }

    /// Wakes every tail (shutdown): dropping a waiter's sender wakes it.
    fn wake_all(&mut self) {
        self.by_session.clear();
    }
}

/// Rendered events of one read, within a byte budget (but at least one event).
struct Page {
    events: Vec<(u64, Arc<str>)>,
    bytes: usize,
    max_bytes: usize,
}

impl Page {
    fn new(max_bytes: usize) -> Page {
        Page {
            events: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Adds the event if it fits; false (and nothing added) when it does not.
    fn push(&mut self, seq: u64, text: Arc<str>) -> bool {
        if !self.events.is_empty() && self.bytes + text.len() > self.max_bytes {
            return false;
        }
        self.bytes += text.len();
        self.events.push((seq, text));
        true
    }
}

/// How many cold events from the first one are read together: direct locations
/// (active segment or repaired copies) together, or one run of consecutive entries of a
/// sealed segment's index file.
pub(super) fn sealed_run(cold: &[(u64, Cold)]) -> usize {
    let direct = |c: Cold| matches!(c, Cold::Active { .. } | Cold::Repaired { .. });
    let mut n = 1;
    while n < cold.len() {
        let same = match (cold[n - 1].1, cold[n].1) {
            (a, b) if direct(a) && direct(b) => true,
            (Cold::Sealed { epoch: a, index: i }, Cold::Sealed { epoch: b, index: j }) => {
                a == b && j == i + 1
            }
            _ => false,
        };
        if !same {
            break;
        }
        n += 1;
    }
    n
}

/// Lets the executor collect socket and disk completions and run every task they wake
/// before going on. A plain `yield_now` is not enough: glommio polls for I/O only when
/// its task queue has nothing ready to run (or its 100 ms preemption timer fires), so a
/// task that is always ready would hold every append's I/O back by 100 ms per step. A
/// timer, by contrast, can fire only from that poll.
async fn yield_to_io() {
    glommio::timer::sleep(Duration::from_micros(10)).await;
}

impl ShardCore {
    pub(super) async fn read(
        &self,
        id: &str,
        after: u64,
        max_events: usize,
        max_bytes: usize,
        wait: Option<Duration>,
    ) -> Reply {
        let group = shards::group_of(id);
        let mut waited = false;
        loop {
            let last_seq = self
                .groups
                .borrow()
                .get(&group)
                .and_then(|g| g.state.view(id))
                .map(|v| v.last_seq);
            let Some(last_seq) = last_seq else {
                return Reply::Error(ApiError::SessionNotFound);
            };
            let plan = self.store.borrow().plan_read(id, after, max_events);
            if let Some(gone) = plan.gone {
                return match self.read_gone(id, after, gone, max_events, max_bytes).await {
                    Ok(events) => Reply::Events { events, last_seq },
                    Err(e) => Reply::Error(e),
                };
            }
            if plan.cold.is_empty() && plan.hot.is_empty() && !waited {
                if let Some(wait) = wait {
                    self.wait_for_event(id, wait).await;
                    waited = true;
                    continue;
                }
            }
            let mut page = Page::new(max_bytes);
            return match self.materialize(id, plan, &mut page).await {
                Ok(()) => Reply::Events {
                    events: page.events,
                    last_seq,
                },
                // Retention deleted the segment between planning and reading: plan
                // again (the range now comes from the archive, or is expired).
                Err(_) if self.store.borrow().first_local_seq(id) > after + 1 => continue,
                Err(e) => Reply::Error(e),
            };
        }
    }

    /// A read starting before the local log (events `after+1..=gone` left it): those
    /// come from the archive, then the local log goes on from `gone + 1` in the same
    /// page. Without an archive they are expired.
    async fn read_gone(
        &self,
        id: &str,
        after: u64,
        gone: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Arc<str>)>, ApiError> {
        if self.archive.is_none() {
            return Err(ApiError::EventsExpired {
                first_available_seq: gone + 1,
            });
        }
        let want = (gone - after).min(max_events as u64);
        let mut page = Page::new(max_bytes);
        for (seq, text) in self.read_archive(id, after, want).await? {
            if !page.push(seq, text) {
                return Ok(page.events);
            }
        }
        let next = page.events.last().map_or(after, |e| e.0);
        let room = max_events - page.events.len();
        if next == gone && room > 0 {
            let plan = self.store.borrow().plan_read(id, gone, room);
            if plan.gone.is_none() {
                self.materialize(id, plan, &mut page).await?;
            }
        }
        Ok(page.events)
    }

    async fn wait_for_event(&self, id: &str, wait: Duration) {
        if self.shutting_down.get() {
            return;
        }
        let rx = self.tails.borrow_mut().add(id);
        let _ = with_timeout(wait, rx).await;
        self.tails.borrow_mut().forget_gone(id);
    }

    /// Wakes every tail waiting on any session (shutdown).
    pub fn wake_all_tails(&self) {
        self.tails.borrow_mut().wake_all();
    }

    /// Adds a read plan's events to `page`: cold ones are read back from the log (or,
    /// where the local copy is damaged, from another replica). Stops at the first event
    /// that does not fit.
    async fn materialize(&self, id: &str, plan: ReadPlan, page: &mut Page) -> Result<(), ApiError> {
        let mut take =
            |e: shards::entry::AppendEntry| page.push(e.seq, Arc::from(render_event(&e)));
        if !self.read_cold_events(id, &plan.cold, &mut take).await? {
            return Ok(());
        }
        for (seq, text) in plan.hot {
            if !page.push(seq, text) {
                break;
            }
        }
        Ok(())
    }

    /// Log locations of cold events (all direct, or one sealed run).
    pub(super) async fn resolve(
        &self,
        cold: &[(u64, Cold)],
    ) -> Result<Vec<(u64, RecordLocation)>, ReadError> {
        match cold[0].1 {
            Cold::Active { .. } | Cold::Repaired { .. } => Ok(cold
                .iter()
                .map(|&(seq, c)| match c {
                    Cold::Active { epoch, offset } | Cold::Repaired { epoch, offset } => {
                        (seq, RecordLocation { epoch, offset })
                    }
                    Cold::Sealed { .. } => unreachable!("sealed_run keeps runs apart"),
                })
                .collect()),
            Cold::Sealed { epoch, index } => {
                let pending = self.log.borrow().sealing.get(&epoch).cloned();
                let offsets = match pending {
                    Some(offsets) => {
                        let start = index as usize;
                        let slice = offsets.get(start..start + cold.len()).ok_or_else(|| {
                            ReadError::Io(std::io::Error::other(format!(
                                "index of segment {epoch} being written lacks entries {start}.."
                            )))
                        })?;
                        slice.to_vec()
                    }
                    None => self.reader.read_offsets(epoch, index, cold.len() as u32)?,
                };
                Ok(cold
                    .iter()
                    .zip(offsets)
                    .map(|(&(seq, _), offset)| (seq, RecordLocation { epoch, offset }))
                    .collect())
            }
        }
    }

    /// Events `after+1 ..= through` of a session, read back from the log (the index
    /// says where; damaged ones come from another replica), stopping before
    /// `max_bytes` (`event_bytes`) would be passed, but with at least one event.
    /// Returns them and whether the range was read whole.
    pub(crate) async fn read_log_events(
        &self,
        id: &str,
        after: u64,
        through: u64,
        max_bytes: usize,
    ) -> Result<(Vec<shards::entry::AppendEntry>, bool), String> {
        let locations = self.store.borrow().locations(id, after, through);
        let mut events = Vec::with_capacity(locations.len());
        let mut bytes = 0usize;
        let mut take = |e: shards::entry::AppendEntry| {
            let size = event_bytes(&e);
            if !events.is_empty() && bytes + size > max_bytes {
                return false;
            }
            bytes += size;
            events.push(e);
            true
        };
        self.read_cold_events(id, &locations, &mut take)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let complete = events.last().map_or(after, |e| e.seq) >= through;
        Ok((events, complete))
    }

    /// This shard's part of a listing page (`shards::listing`). The scan yields to the
    /// executor between chunks and only a few scans run at once, so however many
    /// listings are in flight, a ready append waits for at most a few chunks; the scan
    /// holds no borrow across those yields.
    pub(super) async fn list(
        &self,
        after: Option<String>,
        limit: usize,
        archived: ArchivedFilter,
        filters: &[(String, String)],
    ) -> Reply {
        let wanted = |view: &shards::session::SessionView| {
            let flag = match archived {
                ArchivedFilter::Active => !view.archived,
                ArchivedFilter::Archived => view.archived,
                ArchivedFilter::All => true,
            };
            flag && shards::session::metadata_matches(view, filters)
        };
        let examine_max = listing::examined_per_shard(self.shards);
        let mut scan = listing::Scan::new(after, limit + 1, examine_max);
        // Waiting listings cost nothing; the semaphore is never closed.
        let Ok(_scanning) = self.listing_scans.acquire_permit(1).await else {
            return Reply::Error(ApiError::Unavailable);
        };
        loop {
            let finished = {
                let groups = self.groups.borrow();
                scan.step(groups.values().map(|g| &g.state), wanted)
            };
            if finished {
                break;
            }
            yield_to_io().await;
        }
        let groups = self.groups.borrow();
        // A session's group may have left this shard during the scan: it is left out.
        let part = listing::render_part(scan.finish(), |id| {
            let view = groups.get(&shards::group_of(id))?.state.view(id)?;
            Some(shards::session::render_session(view))
        });
        Reply::Sessions(part)
    }

    pub(super) fn wake_tails(&self, session: &str) {
        self.tails.borrow_mut().wake(session);
    }
}
