//! Jitter: spreading retry delays so that tasks failing together do not all
//! come back at the same instant (the "thundering herd").
//!
//! The strategies are those of AWS's "Exponential Backoff And Jitter" and of
//! Celery's `retry_jitter`. `None` keeps the original's exact delays.

use std::fmt;

/// How a computed backoff delay is randomised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Jitter {
    /// The delay as computed: the original's behaviour.
    #[default]
    None,
    /// Uniform in `0..=delay`.
    Full,
    /// `delay / 2` plus uniform in `0..=delay / 2`.
    Equal,
    /// `min(max_delay, uniform(initial_delay, previous * 3))`, where
    /// `previous` is the task's previous delay (`initial_delay` at first).
    Decorrelated,
}

impl Jitter {
    pub const NAMES: [&'static str; 4] = ["none", "full", "equal", "decorrelated"];

    pub fn parse(name: &str) -> Option<Jitter> {
        match name {
            "none" => Some(Jitter::None),
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            "decorrelated" => Some(Jitter::Decorrelated),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Jitter::None => "none",
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
        }
    }

    /// The delay to wait. `delay` is the backoff as computed for this retry,
    /// `previous` the delay the task waited last time (None for its first),
    /// `initial` and `cap` the policy's `initial_delay` and `max_delay`.
    pub fn apply(
        self,
        delay: f64,
        previous: Option<f64>,
        initial: f64,
        cap: f64,
        rng: &mut Rng,
    ) -> f64 {
        match self {
            Jitter::None => delay,
            Jitter::Full => rng.uniform(0.0, delay),
            Jitter::Equal => delay / 2.0 + rng.uniform(0.0, delay / 2.0),
            Jitter::Decorrelated => {
                let previous = previous.unwrap_or(initial).max(initial);
                rng.uniform(initial, previous * 3.0).min(cap)
            }
        }
    }
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// SplitMix64: a small, fast generator with a 64-bit state, good enough to
/// spread delays (not for anything secret). Seeded, it is reproducible.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator seeded from the standard library's per-process random keys
    /// and the time: different in every process.
    pub fn from_entropy() -> Rng {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng::seeded(std::collections::hash_map::RandomState::new().hash_one(nanos))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform between `low` and `high` (in either order); never outside them.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        let (low, high) = if low <= high {
            (low, high)
        } else {
            (high, low)
        };
        (low + (high - low) * self.unit()).clamp(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_keeps_the_delay() {
        let mut rng = Rng::seeded(1);
        assert_eq!(Jitter::None.apply(4.0, None, 1.0, 300.0, &mut rng), 4.0);
    }

    #[test]
    fn every_strategy_stays_in_its_bounds() {
        let mut rng = Rng::seeded(7);
        for _ in 0..10_000 {
            let full = Jitter::Full.apply(8.0, None, 1.0, 300.0, &mut rng);
            assert!((0.0..=8.0).contains(&full));
            let equal = Jitter::Equal.apply(8.0, None, 1.0, 300.0, &mut rng);
            assert!((4.0..=8.0).contains(&equal));
            let first = Jitter::Decorrelated.apply(1.0, None, 1.0, 300.0, &mut rng);
            assert!((1.0..=3.0).contains(&first));
            let next = Jitter::Decorrelated.apply(2.0, Some(first), 1.0, 300.0, &mut rng);
            assert!((1.0..=first * 3.0).contains(&next));
            let capped = Jitter::Decorrelated.apply(2.0, Some(200.0), 1.0, 300.0, &mut rng);
            assert!((1.0..=300.0).contains(&capped));
        }
    }

    #[test]
    fn a_seed_reproduces_the_sequence() {
        let draw = |seed| {
            let mut rng = Rng::seeded(seed);
            (0..5).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn unit_draws_fill_the_interval_evenly() {
        let mut rng = Rng::seeded(3);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[(rng.unit() * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (9_000..11_000).contains(&b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn names_round_trip() {
        for name in Jitter::NAMES {
            assert_eq!(Jitter::parse(name).unwrap().name(), name);
        }
        assert_eq!(Jitter::parse("FULL"), None);
    }
}
