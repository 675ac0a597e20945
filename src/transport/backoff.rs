//! Reconnect pacing: exponential backoff with jitter from a small seeded RNG.
//!
//! Jitter keeps the dialers of many shards and nodes from reconnecting in lock step
//! after a peer restarts; the seed makes a given dialer's waits reproducible.

use std::time::Duration;

/// Waits grow from `min` to `max`, doubling after every failure. Each wait is drawn
/// uniformly from the upper half of the current step ("equal jitter"), so a wait is
/// never shorter than `min / 2`: a peer that keeps failing is never dialled in a tight
/// loop.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: SplitMix64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        assert!(!min.is_zero() && min <= max, "backoff {min:?}..{max:?}");
        Backoff {
            min,
            max,
            step: min,
            rng: SplitMix64(seed),
        }
    }

    /// After a connection worked: the next failure waits about `min` again.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }

    /// The wait after a failure; later failures wait longer, up to `max`.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.jittered(self.step);
        self.step = (self.step * 2).min(self.max);
        wait
    }

    /// The wait after the peer refused us: retrying sooner will not change its mind.
    pub(crate) fn refused_wait(&mut self) -> Duration {
        self.step = self.max;
        self.jittered(self.max)
    }

    fn jittered(&mut self, step: Duration) -> Duration {
        let half = step / 2;
        let spread_ns = (step - half).as_nanos().max(1) as u64;
        half + Duration::from_nanos(self.rng.next() % spread_ns)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator; plenty for
/// jitter and fully determined by its seed.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_max_and_stay_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(1000));
        let mut b = Backoff::new(min, max, 7);
        let mut step = min;
        for _ in 0..20 {
            let w = b.next_wait();
            assert!(w >= step / 2 && w <= step, "{w:?} outside {step:?}");
            step = (step * 2).min(max);
        }
        b.reset();
        assert!(b.next_wait() <= min);
        let refused = b.refused_wait();
        assert!(refused >= max / 2 && refused <= max);
    }

    #[test]
    fn same_seed_same_waits_other_seed_other_waits() {
        let d = |seed| {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), seed);
            (0..8).map(|_| b.next_wait()).collect::<Vec<_>>()
        };
        assert_eq!(d(1), d(1));
        assert_ne!(d(1), d(2));
    }
}
