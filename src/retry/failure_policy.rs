//! Failure classes: which failure reasons are not worth retrying, and which
//! get a retry policy of their own (Temporal's non-retryable error types,
//! Kubernetes' pod failure policy).
//!
//! A pattern names a reason exactly, or its class: the pattern `"oom"`
//! matches the reasons `"oom"` and `"oom: killed at 4 GiB"`, not `"oomph"`.

use std::sync::Arc;

use crate::retry::backoff::{BackoffPolicy, InvalidSetting, Setting};

/// A reason, or a reason class (`name` matches `name` and `name: ...`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReasonPattern(Arc<str>);

impl ReasonPattern {
    pub fn new(pattern: &str) -> ReasonPattern {
        ReasonPattern(Arc::from(pattern))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, reason: &str) -> bool {
        reason
            .strip_prefix(&*self.0)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
    }
}

/// A retry policy for the reasons one pattern matches; a setting left out
/// follows the manager's own.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyOverride {
    pub max_attempts: Option<u64>,
    pub initial_delay: Option<f64>,
    pub backoff_base: Option<f64>,
    pub max_delay: Option<f64>,
}

impl PolicyOverride {
    /// Checks each given setting as the manager's own would be checked.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let mut policy = BackoffPolicy::default();
        for (setting, value) in self.floats() {
            if let Some(value) = value {
                policy = policy.with_float(setting, value)?;
            }
        }
        Ok(())
    }

    fn floats(&self) -> [(Setting, Option<f64>); 3] {
        [
            (Setting::InitialDelay, self.initial_delay),
            (Setting::BackoffBase, self.backoff_base),
            (Setting::MaxDelay, self.max_delay),
        ]
    }

    /// `base` with this override's settings in place.
    pub fn apply(&self, base: &BackoffPolicy) -> BackoffPolicy {
        let mut policy = base.with_max_attempts(self.max_attempts.unwrap_or(base.max_attempts()));
        for (setting, value) in self.floats() {
            if let Some(value) = value {
                // Validated when the override was made.
                policy = policy.with_float(setting, value).unwrap_or(policy);
            }
        }
        policy
    }
}

/// What a reason is, for retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// The manager's own policy.
    Default,
    /// Never retried.
    NonRetryable,
    /// The policy of `overrides[index]`.
    Override(u16),
}

/// The non-retryable reasons and the per-reason policies of one manager.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailureClasses {
    non_retryable: Vec<ReasonPattern>,
    overrides: Vec<(ReasonPattern, PolicyOverride)>,
}

impl FailureClasses {
    /// At most `u16::MAX` overrides; the first matching pattern wins.
    pub fn new(
        non_retryable: Vec<ReasonPattern>,
        overrides: Vec<(ReasonPattern, PolicyOverride)>,
    ) -> Result<FailureClasses, String> {
        if overrides.len() > usize::from(u16::MAX) {
            return Err(format!("at most {} policies", u16::MAX));
        }
        for (pattern, policy) in &overrides {
            policy
                .validate()
                .map_err(|e| format!("policies[{:?}]: {e}", pattern.as_str()))?;
        }
        Ok(FailureClasses {
            non_retryable,
            overrides,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.non_retryable.is_empty() && self.overrides.is_empty()
    }

    pub fn non_retryable(&self) -> &[ReasonPattern] {
        &self.non_retryable
    }

    pub fn overrides(&self) -> &[(ReasonPattern, PolicyOverride)] {
        &self.overrides
    }

    pub fn classify(&self, reason: Option<&str>) -> FailureClass {
        let Some(reason) = reason else {
            return FailureClass::Default;
        };
        if self.non_retryable.iter().any(|p| p.matches(reason)) {
            return FailureClass::NonRetryable;
        }
        self.overrides
            .iter()
            .position(|(p, _)| p.matches(reason))
            .map_or(FailureClass::Default, |i| FailureClass::Override(i as u16))
    }

    /// The policy a failure of `class` is retried under.
    pub fn policy_for(&self, class: FailureClass, base: &BackoffPolicy) -> BackoffPolicy {
        match class {
            FailureClass::Override(i) => self.overrides[usize::from(i)].1.apply(base),
            FailureClass::Default | FailureClass::NonRetryable => *base,
        }
    }
}

/// Why a task is not retried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// Its count reached `max_attempts` (the original's only reason).
    MaxAttempts,
    /// Its reason is non-retryable.
    NonRetryable,
    /// Its first failure is older than `max_retry_duration`.
    MaxRetryDuration,
    /// The retry budget is empty.
    RetryBudget,
}

impl GiveUp {
    pub fn name(self) -> &'static str {
        match self {
            GiveUp::MaxAttempts => "max_attempts",
            GiveUp::NonRetryable => "non_retryable",
            GiveUp::MaxRetryDuration => "max_retry_duration",
            GiveUp::RetryBudget => "retry_budget",
        }
    }

    pub fn parse(name: &str) -> Option<GiveUp> {
        [
            GiveUp::MaxAttempts,
            GiveUp::NonRetryable,
            GiveUp::MaxRetryDuration,
            GiveUp::RetryBudget,
        ]
        .into_iter()
        .find(|g| g.name() == name)
    }

    /// Why, as it is appended to a reason reported for a failed task; None
    /// for the limit, whose reports stay the original's.
    pub fn explanation(self) -> Option<&'static str> {
        match self {
            GiveUp::MaxAttempts => None,
            GiveUp::NonRetryable => Some("non-retryable failure"),
            GiveUp::MaxRetryDuration => Some("max_retry_duration exceeded"),
            GiveUp::RetryBudget => Some("retry budget exhausted"),
        }
    }

    /// The reason reported for a task failed for good.
    pub fn final_reason(self, reason: &Arc<str>) -> Arc<str> {
        match self.explanation() {
            None => reason.clone(),
            Some(why) => Arc::from(format!("{reason} (not retried: {why})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_matches_the_reason_or_its_class() {
        let p = ReasonPattern::new("oom");
        assert!(p.matches("oom"));
        assert!(p.matches("oom: killed at 4 GiB"));
        assert!(!p.matches("oomph"));
        assert!(!p.matches("an oom"));
        assert!(ReasonPattern::new("exit code 2").matches("exit code 2: permission denied"));
    }

    #[test]
    fn non_retryable_wins_then_the_first_override() {
        let timeout = PolicyOverride {
            max_attempts: Some(10),
            ..Default::default()
        };
        let classes = FailureClasses::new(
            vec![ReasonPattern::new("auth")],
            vec![
                (ReasonPattern::new("timeout"), timeout.clone()),
                (ReasonPattern::new("timeout"), PolicyOverride::default()),
            ],
        )
        .unwrap();
        assert_eq!(
            classes.classify(Some("auth: bad token")),
            FailureClass::NonRetryable
        );
        assert_eq!(classes.classify(Some("timeout")), FailureClass::Override(0));
        assert_eq!(classes.classify(Some("exit 1")), FailureClass::Default);
        assert_eq!(classes.classify(None), FailureClass::Default);
        let base = BackoffPolicy::default();
        let p = classes.policy_for(FailureClass::Override(0), &base);
        assert_eq!(p.max_attempts(), 10);
        assert_eq!(p.initial_delay(), base.initial_delay());
    }

    #[test]
    fn an_override_is_checked_like_the_settings() {
        let bad = PolicyOverride {
            backoff_base: Some(0.0),
            ..Default::default()
        };
        let err = FailureClasses::new(vec![], vec![(ReasonPattern::new("x"), bad)]).unwrap_err();
        assert_eq!(
            err,
            "policies[\"x\"]: backoff_base must be a finite number > 0, got 0.0"
        );
    }

    #[test]
    fn the_final_reason_says_why() {
        let reason: Arc<str> = Arc::from("exit 1");
        assert_eq!(&*GiveUp::MaxAttempts.final_reason(&reason), "exit 1");
        assert_eq!(
            &*GiveUp::RetryBudget.final_reason(&reason),
            "exit 1 (not retried: retry budget exhausted)"
        );
        assert_eq!(GiveUp::parse("retry_budget"), Some(GiveUp::RetryBudget));
    }
}
