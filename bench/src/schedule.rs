//! The open-loop arrival schedule: request `i` is due at `start + i / rate`,
//! independent of how fast earlier requests were answered.
//!
//! Connection workers claim the next index from a shared counter. A free worker sleeps
//! until the claimed request is due; when every worker is busy, due requests simply wait
//! until one frees up and claims them. Latency is always measured from the due time, so
//! that waiting is charged to the server (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Schedule {
    start: Instant,
    rate: f64,
    warmup_end: Instant,
    end: Instant,
    next: AtomicU64,
}

/// A request a worker must send now.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub index: u64,
    pub due: Instant,
    /// False during warm-up: the result is not recorded.
    pub measured: bool,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64, warmup: Duration, duration: Duration) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        Schedule {
            start,
            rate,
            warmup_end: start + warmup,
            end: start + warmup + duration,
            next: AtomicU64::new(0),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn end(&self) -> Instant {
        self.end
    }

    /// When request `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// Number of requests due strictly before `t`.
    fn due_before(&self, t: Instant) -> u64 {
        let rel = t.saturating_duration_since(self.start).as_secs_f64();
        let mut n = (rel * self.rate).ceil() as u64;
        // Correct float rounding against the exact `due` function.
        while n > 0 && self.due(n - 1) >= t {
            n -= 1;
        }
        while self.due(n) < t {
            n += 1;
        }
        n
    }

    /// Number of requests due in the measured window [warmup end, end).
    pub fn measured_count(&self) -> u64 {
        self.due_before(self.end) - self.due_before(self.warmup_end)
    }

    /// Claims the next request, sleeps until it is due, and returns it. Returns None once
    /// the schedule is over: the next request is due at or after the end, or the worker
    /// only became free after the end (requests left unsent then are counted by the
    /// caller as `measured_count() - issued`).
    pub fn next_slot(&self) -> Option<Slot> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let due = self.due(index);
        if due >= self.end || Instant::now() >= self.end {
            return None;
        }
        sleep_until(due);
        Some(Slot {
            index,
            due,
            measured: due >= self.warmup_end,
        })
    }
}

/// Sleeps until `t` (no-op if it has passed). `thread::sleep` wakes within tens of
/// microseconds on Linux; any lateness is included in the measured latency.
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_due_times() {
        let start = Instant::now();
        let s = Schedule::new(
            start,
            1000.0,
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(1500), start + Duration::from_millis(1500));
        assert_eq!(s.measured_count(), 5000);
        let s = Schedule::new(start, 3.0, Duration::ZERO, Duration::from_secs(1));
        assert_eq!(s.measured_count(), 3);
        let s = Schedule::new(start, 2.5, Duration::from_secs(1), Duration::from_secs(2));
        // due at 0, .4, .8 | 1.2, 1.6, 2.0, 2.4, 2.8 | 3.2
        assert_eq!(s.measured_count(), 5);
    }

    #[test]
    fn slots_stop_at_end() {
        let s = Schedule::new(
            Instant::now(),
            200.0,
            Duration::from_millis(50),
            Duration::from_millis(100),
        );
        let mut measured = 0;
        let mut total = 0;
        while let Some(slot) = s.next_slot() {
            total += 1;
            measured += slot.measured as u64;
            assert!(slot.due <= Instant::now());
        }
        assert!(total <= 30);
        assert!(measured <= s.measured_count());
    }
}
