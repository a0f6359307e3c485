//! A retry budget shared by every task of one manager: a token bucket in the
//! style of the AWS SDKs' retry quota. Each retry takes `retry_cost` tokens;
//! a success gives back what its retry took, or `success_refill` tokens when
//! it needed no retry. When the bucket cannot pay for a retry, failures are
//! final until successes refill it: a systemic outage stops amplifying load
//! with retries (a circuit breaker), while isolated failures still retry.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSettings {
    pub capacity: u64,
    pub retry_cost: u64,
    pub success_refill: u64,
}

impl Default for BudgetSettings {
    /// The AWS SDKs' standard retry quota.
    fn default() -> Self {
        BudgetSettings {
            capacity: 500,
            retry_cost: 5,
            success_refill: 1,
        }
    }
}

impl BudgetSettings {
    /// Names the setting out of range; the caller says where it came from.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.retry_cost == 0 {
            return Err("retry_cost must be an int >= 1, got 0");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    settings: BudgetSettings,
    tokens: u64,
    /// Retries refused since the manager was made.
    refused: u64,
}

impl RetryBudget {
    /// A full bucket.
    pub fn new(settings: BudgetSettings) -> RetryBudget {
        RetryBudget {
            settings,
            tokens: settings.capacity,
            refused: 0,
        }
    }

    pub fn settings(&self) -> BudgetSettings {
        self.settings
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether it cannot pay for a retry now.
    pub fn is_exhausted(&self) -> bool {
        self.tokens < self.settings.retry_cost
    }

    /// Pays for one retry; false (counted as refused) when it cannot.
    pub fn try_acquire(&mut self) -> bool {
        if self.is_exhausted() {
            self.refused += 1;
            return false;
        }
        self.tokens -= self.settings.retry_cost;
        true
    }

    /// A task succeeded; `after_retry` when it had been retried.
    pub fn on_success(&mut self, after_retry: bool) {
        let refill = if after_retry {
            self.settings.retry_cost
        } else {
            self.settings.success_refill
        };
        self.tokens = self
            .tokens
            .saturating_add(refill)
            .min(self.settings.capacity);
    }

    /// Restores a saved level (capped at the capacity).
    pub fn set_tokens(&mut self, tokens: u64) {
        self.tokens = tokens.min(self.settings.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(capacity: u64) -> RetryBudget {
        RetryBudget::new(BudgetSettings {
            capacity,
            retry_cost: 5,
            success_refill: 1,
        })
    }

    #[test]
    fn a_burst_empties_it_and_successes_refill_it() {
        let mut b = budget(20);
        assert!((0..4).all(|_| b.try_acquire()));
        assert!(b.is_exhausted());
        assert!(!b.try_acquire());
        assert_eq!(b.refused(), 1);
        // A retried task succeeding gives its retry back.
        b.on_success(true);
        assert!(b.try_acquire());
        // First-try successes refill one token each.
        for _ in 0..5 {
            b.on_success(false);
        }
        assert!(b.try_acquire());
    }

    #[test]
    fn it_never_exceeds_its_capacity() {
        let mut b = budget(10);
        b.on_success(true);
        assert_eq!(b.tokens(), 10);
        b.set_tokens(99);
        assert_eq!(b.tokens(), 10);
    }

    #[test]
    fn a_zero_cost_is_rejected() {
        let s = BudgetSettings {
            retry_cost: 0,
            ..Default::default()
        };
        assert!(s.validate().is_err());
        assert!(BudgetSettings::default().validate().is_ok());
    }
}
