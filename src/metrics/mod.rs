//! What the dispatcher counts beyond the original's metrics: retries and
//! permanent failures by reason, and the backoff delays it scheduled.

pub mod prometheus;

use std::collections::BTreeMap;
use std::sync::Arc;

/// Upper bounds (seconds) of the delay histogram's buckets; one more bucket,
/// `+Inf`, takes the rest.
pub const DELAY_BUCKETS: [f64; 11] = [
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Distinct reason labels kept; beyond that, counts go to [`OTHER`].
pub const MAX_REASONS: usize = 50;
pub const OTHER: &str = "other";

/// A reason's label: its class, the part before the first `:` ("exit code 1:
/// flaky test" counts as "exit code 1"), so that free text in reasons does not
/// make a label per failure. At most 100 characters.
pub fn reason_label(reason: &str) -> &str {
    let class = match reason.as_bytes().iter().position(|&b| b == b':') {
        Some(colon) => &reason[..colon],
        None => reason,
    }
    .trim();
    let class = if class.is_empty() { "unknown" } else { class };
    if class.len() <= 100 {
        return class; // no more characters than bytes
    }
    match class.char_indices().nth(100) {
        Some((end, _)) => &class[..end],
        None => class,
    }
}

/// Counts by reason label.
#[derive(Clone, Debug, Default)]
pub struct ReasonCounts {
    counts: BTreeMap<Arc<str>, u64>,
    /// The reason counted last and its label. Failures come in runs of one
    /// reason, the very same `Arc` (the retry book keeps each reason once):
    /// its label is not looked for again.
    last: Option<(Arc<str>, Arc<str>)>,
}

impl PartialEq for ReasonCounts {
    fn eq(&self, other: &Self) -> bool {
        self.counts == other.counts
    }
}

impl ReasonCounts {
    pub fn add(&mut self, reason: &Arc<str>) {
        if let Some((seen, label)) = &self.last {
            if Arc::ptr_eq(seen, reason) {
                if let Some(n) = self.counts.get_mut(label) {
                    *n += 1;
                    return;
                }
            }
        }
        let label = reason_label(reason);
        let label = match self.counts.get_key_value(label) {
            Some((kept, _)) => kept.clone(),
            None if self.counts.len() >= MAX_REASONS => Arc::from(OTHER),
            None => Arc::from(label),
        };
        *self.counts.entry(label.clone()).or_insert(0) += 1;
        self.last = Some((reason.clone(), label));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts.iter().map(|(k, &v)| (&**k, v))
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// A histogram of delays, in Prometheus's form (cumulative when read).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DelayHistogram {
    /// Per bucket, not cumulative; the last is `+Inf`.
    counts: [u64; DELAY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl DelayHistogram {
    pub fn observe(&mut self, seconds: f64) {
        let bucket = DELAY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DELAY_BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// `(upper bound, observations <= it)`, the last bound infinite.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let bounds = DELAY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let mut total = 0;
        bounds
            .zip(self.counts)
            .map(|(bound, n)| {
                total += n;
                (bound, total)
            })
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailureStats {
    pub retries: ReasonCounts,
    pub permanent_failures: ReasonCounts,
    pub delays: DelayHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_reason_classes() {
        assert_eq!(reason_label("exit code 1: flaky"), "exit code 1");
        assert_eq!(reason_label("timeout after 2 s"), "timeout after 2 s");
        assert_eq!(reason_label(": odd"), "unknown");
        assert_eq!(reason_label(&"x".repeat(300)).len(), 100);
        // 100 characters, counted as characters: 60 two-byte ones stay whole.
        assert_eq!(reason_label(&"é".repeat(60)), "é".repeat(60));
        assert_eq!(reason_label(&"é".repeat(160)), "é".repeat(100));
        assert_eq!(reason_label("  spaced  : x"), "spaced");
    }

    #[test]
    fn a_run_of_one_reason_counts_under_its_label() {
        let mut counts = ReasonCounts::default();
        let flaky: Arc<str> = Arc::from("exit code 1: flaky");
        let timeout: Arc<str> = Arc::from("timeout");
        for reason in [
            &flaky,
            &flaky,
            &timeout,
            &flaky,
            &Arc::from("exit code 1: other"),
        ] {
            counts.add(reason);
        }
        counts.add(&timeout);
        let all: Vec<(&str, u64)> = counts.iter().collect();
        assert_eq!(all, [("exit code 1", 4), ("timeout", 2)]);
    }

    #[test]
    fn distinct_labels_are_capped() {
        let mut counts = ReasonCounts::default();
        for i in 0..MAX_REASONS + 10 {
            counts.add(&Arc::from(format!("reason {i}")));
        }
        counts.add(&Arc::from("reason 0: again"));
        assert_eq!(counts.iter().count(), MAX_REASONS + 1);
        assert_eq!(counts.iter().find(|(k, _)| *k == OTHER).unwrap().1, 10);
        assert_eq!(counts.iter().find(|(k, _)| *k == "reason 0").unwrap().1, 2);
        assert_eq!(counts.total(), MAX_REASONS as u64 + 11);
    }

    #[test]
    fn the_histogram_is_cumulative() {
        let mut h = DelayHistogram::default();
        for d in [0.05, 1.0, 1.5, 1000.0] {
            h.observe(d);
        }
        let c = h.cumulative();
        assert_eq!(c[0], (0.1, 1));
        assert_eq!(c[2], (1.0, 2));
        assert_eq!(c[3], (2.0, 3));
        assert_eq!(*c.last().unwrap(), (f64::INFINITY, 4));
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 1002.55);
    }
}
