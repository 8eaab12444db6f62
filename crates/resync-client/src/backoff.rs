//! Reconnection delays: exponential backoff with full jitter.
//!
//! Attempt `n` (counting from 0) waits a random time in `[0, min(max, initial * 2^n)]`. Full
//! jitter (rather than a fixed schedule like Phoenix's, or "delay ± 50 %") spreads clients that
//! lost their connections at the same moment, a deploy or a network blip, evenly over the
//! window, so the server sees a trickle instead of a herd. The defaults follow the anchors:
//! 0.5 s initial, doubling, capped at 20 s; the attempt count resets once a connection has
//! stayed up for 10 s.

use std::time::Duration;

/// Backoff settings. See the module docs for the formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay. Defaults to 500 ms.
    pub initial: Duration,
    /// The largest ceiling. Defaults to 20 s.
    pub max: Duration,
    /// A connection that stays up this long resets the attempt count. Defaults to 10 s.
    pub reset_after: Duration,
    /// The ceiling of the short random delay used after "reconnect soon" close codes
    /// (shutdown, slow consumer). Defaults to 1 s.
    pub soon: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(20),
            reset_after: Duration::from_secs(10),
            soon: Duration::from_secs(1),
        }
    }
}

/// The delay sequence of one client.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A sequence with a random seed.
    pub fn new(config: BackoffConfig) -> Self {
        Self::from_rng(config, fastrand::Rng::new())
    }

    /// A sequence whose jitter is drawn from `seed`: the same seed, the same delays (for
    /// reproducible tests).
    pub fn with_seed(config: BackoffConfig, seed: u64) -> Self {
        Self::from_rng(config, fastrand::Rng::with_seed(seed))
    }

    fn from_rng(config: BackoffConfig, rng: fastrand::Rng) -> Self {
        Self {
            config,
            attempt: 0,
            rng,
        }
    }

    /// How many delays were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }

    /// The next delay, and counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        random_up_to(&mut self.rng, ceiling)
    }

    /// A short random delay for "reconnect soon" codes; does not count as an attempt.
    pub fn soon(&mut self) -> Duration {
        random_up_to(&mut self.rng, self.config.soon)
    }

    /// Starts over after a stable connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How long a connection must last to reset the count.
    pub fn reset_after(&self) -> Duration {
        self.config.reset_after
    }
}

fn random_up_to(rng: &mut fastrand::Rng, ceiling: Duration) -> Duration {
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.u64(0..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_capped_ceiling() {
        let config = BackoffConfig::default();
        let mut backoff = Backoff::with_seed(config, 7);
        let expected_ceilings_ms = [
            500, 1_000, 2_000, 4_000, 8_000, 16_000, 20_000, 20_000, 20_000,
        ];
        for ceiling_ms in expected_ceilings_ms {
            assert_eq!(backoff.ceiling(), Duration::from_millis(ceiling_ms));
            let delay = backoff.next_delay();
            assert!(
                delay <= Duration::from_millis(ceiling_ms),
                "{delay:?} over {ceiling_ms} ms"
            );
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let delays = |seed| {
            let mut backoff = Backoff::with_seed(BackoffConfig::default(), seed);
            (0..10).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(delays(42), delays(42));
        assert_ne!(delays(42), delays(43));
    }

    #[test]
    fn jitter_spreads_over_the_whole_window() {
        // At the cap, 10,000 delays should cover the window evenly: every tenth of it gets
        // roughly a tenth of the delays (full jitter, not "cap ± a little").
        let config = BackoffConfig::default();
        let mut backoff = Backoff::with_seed(config, 1);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            for _ in 0..10 {
                backoff.next_delay();
            }
            let delay = backoff.next_delay();
            assert!(delay <= config.max);
            let bucket = (delay.as_millis() * 10 / (config.max.as_millis() + 1)) as usize;
            buckets[bucket] += 1;
            backoff.reset();
        }
        for (index, count) in buckets.iter().enumerate() {
            assert!(
                (800..=1_200).contains(count),
                "bucket {index} got {count} of 10,000"
            );
        }
    }

    #[test]
    fn soon_is_short_and_does_not_count() {
        let mut backoff = Backoff::with_seed(BackoffConfig::default(), 3);
        for _ in 0..100 {
            assert!(backoff.soon() <= Duration::from_secs(1));
        }
        assert_eq!(backoff.attempt(), 0);
    }
}
