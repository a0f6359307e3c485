//! The retry policy: how many attempts, and how long to wait before each one.

use std::fmt;

/// One of the four settings of a [`BackoffPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    MaxAttempts,
    BackoffBase,
    InitialDelay,
    MaxDelay,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::MaxAttempts => "max_attempts",
            Setting::BackoffBase => "backoff_base",
            Setting::InitialDelay => "initial_delay",
            Setting::MaxDelay => "max_delay",
        }
    }

    fn requirement(self) -> &'static str {
        match self {
            Setting::MaxAttempts => "an int >= 0",
            Setting::BackoffBase => "a finite number > 0",
            Setting::InitialDelay | Setting::MaxDelay => "a finite number >= 0",
        }
    }
}

/// A setting outside its domain; names the setting and the value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InvalidSetting {
    pub setting: Setting,
    pub value: f64,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} must be {}, got {}",
            self.setting.name(),
            self.setting.requirement(),
            python_float_repr(self.value)
        )
    }
}

/// How Python spells a float in a message (`nan`, `inf`, `2.0`).
pub fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        "nan".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Exponential backoff: `initial_delay * backoff_base ** (retry_count - 1)`,
/// capped at `max_delay`, for at most `max_attempts` retries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    max_attempts: u64,
    backoff_base: f64,
    initial_delay: f64,
    max_delay: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            max_attempts: 3,
            backoff_base: 2.0,
            initial_delay: 1.0,
            max_delay: 300.0,
        }
    }
}

impl BackoffPolicy {
    pub fn new(
        max_attempts: u64,
        backoff_base: f64,
        initial_delay: f64,
        max_delay: f64,
    ) -> Result<Self, InvalidSetting> {
        Self::default()
            .with_max_attempts(max_attempts)
            .with_float(Setting::BackoffBase, backoff_base)?
            .with_float(Setting::InitialDelay, initial_delay)?
            .with_float(Setting::MaxDelay, max_delay)
    }

    pub fn max_attempts(&self) -> u64 {
        self.max_attempts
    }
    pub fn backoff_base(&self) -> f64 {
        self.backoff_base
    }
    pub fn initial_delay(&self) -> f64 {
        self.initial_delay
    }
    pub fn max_delay(&self) -> f64 {
        self.max_delay
    }

    /// Any `u64` is a valid attempt limit; negatives are rejected where the
    /// Python int is converted.
    pub fn with_max_attempts(mut self, max_attempts: u64) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The policy with one float setting replaced, validated.
    pub fn with_float(mut self, setting: Setting, value: f64) -> Result<Self, InvalidSetting> {
        let valid = value.is_finite()
            && match setting {
                Setting::BackoffBase => value > 0.0,
                _ => value >= 0.0,
            };
        if !valid {
            return Err(InvalidSetting { setting, value });
        }
        match setting {
            Setting::BackoffBase => self.backoff_base = value,
            Setting::InitialDelay => self.initial_delay = value,
            Setting::MaxDelay => self.max_delay = value,
            Setting::MaxAttempts => return Err(InvalidSetting { setting, value }),
        }
        Ok(self)
    }

    /// The delay before the retry that follows failure number `retry_count`.
    ///
    /// Bit-for-bit the Python expression
    /// `min(initial_delay * backoff_base ** (retry_count - 1), max_delay)` (and
    /// `initial_delay` for `retry_count <= 0`) wherever that is finite; where the
    /// power overflows, `max_delay`. Never NaN, never infinite, never panics.
    pub fn delay(&self, retry_count: i64) -> f64 {
        if retry_count <= 0 {
            return self.initial_delay;
        }
        // i64 -> f64 rounds to nearest, like Python's int -> float.
        self.delay_for_exponent((retry_count - 1) as f64)
    }

    /// [`BackoffPolicy::delay`] for an exponent `retry_count - 1` already in
    /// floating point (retry counts beyond the `i64` range, or infinite).
    pub fn delay_for_exponent(&self, exponent: f64) -> f64 {
        // A first or second failure, the usual ones, skips the library's
        // `pow`: x^0 is 1 and x^1 is x exactly (IEEE 754, C99 F.9.4.4), so the
        // delay is the same to the bit.
        let growth = if exponent == 0.0 {
            1.0
        } else if exponent == 1.0 {
            self.backoff_base
        } else {
            self.backoff_base.powf(exponent)
        };
        if !growth.is_finite() {
            return self.max_delay;
        }
        let delay = self.initial_delay * growth;
        // Python's min(a, b) returns a unless b < a.
        if self.max_delay < delay {
            self.max_delay
        } else {
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(base: f64, initial: f64, max: f64) -> BackoffPolicy {
        BackoffPolicy::new(3, base, initial, max).unwrap()
    }

    #[test]
    fn defaults_are_the_originals() {
        let p = BackoffPolicy::default();
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.backoff_base(), 2.0);
        assert_eq!(p.initial_delay(), 1.0);
        assert_eq!(p.max_delay(), 300.0);
    }

    #[test]
    fn delays_for_counts_zero_to_five_with_base_two() {
        let p = BackoffPolicy::default();
        let delays: Vec<f64> = (0..=5).map(|n| p.delay(n)).collect();
        assert_eq!(delays, vec![1.0, 1.0, 2.0, 4.0, 8.0, 16.0]);
    }

    #[test]
    fn delays_are_capped_at_max_delay() {
        let p = policy(2.0, 1.0, 10.0);
        assert_eq!(p.delay(4), 8.0);
        assert_eq!(p.delay(5), 10.0);
        assert_eq!(p.delay(100), 10.0);
    }

    #[test]
    fn overflowing_power_gives_max_delay() {
        let p = BackoffPolicy::default();
        assert_eq!(p.delay(5000), 300.0);
        assert_eq!(p.delay(i64::MAX), 300.0);
        assert_eq!(p.delay_for_exponent(f64::INFINITY), 300.0);
    }

    #[test]
    fn non_positive_counts_give_initial_delay_uncapped() {
        let p = policy(2.0, 50.0, 10.0);
        assert_eq!(p.delay(0), 50.0);
        assert_eq!(p.delay(-7), 50.0);
        assert_eq!(p.delay(i64::MIN), 50.0);
    }

    #[test]
    fn invalid_settings_are_named_with_their_value() {
        let err = BackoffPolicy::new(3, 0.0, 1.0, 1.0).unwrap_err();
        assert_eq!(err.setting, Setting::BackoffBase);
        assert_eq!(
            err.to_string(),
            "backoff_base must be a finite number > 0, got 0.0"
        );
        let err = BackoffPolicy::new(3, 2.0, f64::NAN, 1.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "initial_delay must be a finite number >= 0, got nan"
        );
        let err = BackoffPolicy::new(3, 2.0, 1.0, f64::INFINITY).unwrap_err();
        assert_eq!(err.setting, Setting::MaxDelay);
        assert!(BackoffPolicy::new(3, 2.0, -1.0, 1.0).is_err());
    }

    /// A small deterministic generator, so the property tests need no crate.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn float(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn random_policies() -> impl Iterator<Item = BackoffPolicy> {
        let mut rng = SplitMix(7);
        (0..500).map(move |i| {
            let base = match i % 4 {
                0 => rng.float(1e-3, 1.0),
                1 => 1.0,
                2 => rng.float(1.0, 10.0),
                _ => rng.float(10.0, 1e6),
            };
            let initial = if i % 7 == 0 { 0.0 } else { rng.float(0.0, 1e4) };
            let max = if i % 5 == 0 {
                1e300
            } else {
                rng.float(0.0, 1e6)
            };
            policy(base, initial, max)
        })
    }

    fn interesting_counts() -> Vec<i64> {
        let mut counts: Vec<i64> = (-3..200).collect();
        counts.extend([1_000, 1_024, 1_025, 5_000, 1 << 31, 1 << 53, i64::MAX]);
        counts
    }

    #[test]
    fn property_delay_is_finite_non_negative_and_capped() {
        for p in random_policies() {
            for &n in &interesting_counts() {
                let d = p.delay(n);
                assert!(d.is_finite() && d >= 0.0, "{p:?} n={n} d={d}");
                if n > 0 {
                    assert!(d <= p.max_delay(), "{p:?} n={n} d={d}");
                }
            }
        }
    }

    #[test]
    fn property_delay_is_monotone_in_the_count_for_bases_at_least_one() {
        for p in random_policies().filter(|p| p.backoff_base() >= 1.0) {
            let counts = interesting_counts();
            let delays: Vec<f64> = counts
                .iter()
                .filter(|&&n| n >= 1)
                .map(|&n| p.delay(n))
                .collect();
            assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
        }
    }

    #[test]
    fn property_delay_is_non_increasing_for_bases_below_one() {
        for p in random_policies().filter(|p| p.backoff_base() < 1.0) {
            let delays: Vec<f64> = (1..2_000).map(|n| p.delay(n)).collect();
            assert!(delays.windows(2).all(|w| w[0] >= w[1]), "{p:?}");
        }
    }

    #[test]
    fn property_delay_equals_the_formula_where_finite() {
        for p in random_policies() {
            for n in 1..300 {
                let power = p.backoff_base().powf((n - 1) as f64);
                if power.is_finite() {
                    let expected = (p.initial_delay() * power).min(p.max_delay());
                    assert_eq!(p.delay(n).to_bits(), expected.to_bits(), "{p:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn property_no_panic_for_any_count() {
        let p = BackoffPolicy::default();
        let mut rng = SplitMix(99);
        for _ in 0..100_000 {
            let d = p.delay(rng.next() as i64);
            assert!(d.is_finite());
        }
        for e in [f64::NAN, f64::NEG_INFINITY, -1e308, 1e308] {
            assert!(p.delay_for_exponent(e).is_finite(), "exponent {e}");
        }
    }
}
