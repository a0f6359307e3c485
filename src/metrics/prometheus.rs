//! The dispatcher's state in the Prometheus text exposition format (0.0.4).

use std::fmt::Write;

use crate::dispatch::state::StatusSnapshot;
use crate::retry::state::BudgetStatus;

const PREFIX: &str = "necrocode_dispatch";

/// Label values escape `\`, `"` and newlines.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Floats as Prometheus spells them.
pub fn number(value: f64) -> String {
    if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else if value.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{value}")
    }
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {PREFIX}_{name} {help}");
        let _ = writeln!(self.0, "# TYPE {PREFIX}_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.0, "{PREFIX}_{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

pub fn render(status: &StatusSnapshot, budget: Option<BudgetStatus>) -> String {
    let mut out = Exposition(String::new());
    let gauge = "gauge";
    let counter = "counter";
    out.single(
        "queue_size",
        gauge,
        "Tasks queued, ready to assign.",
        status.queue_size as f64,
    );
    out.single(
        "delayed_tasks",
        gauge,
        "Tasks waiting for their retry backoff.",
        status.delayed_count as f64,
    );
    out.single(
        "running_tasks",
        gauge,
        "Tasks running or being launched.",
        status.global_running as f64,
    );
    out.single(
        "max_global_concurrency",
        gauge,
        "The limit on tasks running at once.",
        status.max_global_concurrency as f64,
    );
    out.family("pool_running", gauge, "Tasks running in each agent pool.");
    for pool in &status.pools {
        out.sample("pool_running", &[("pool", &pool.name)], pool.running as f64);
    }
    out.family("pool_max_concurrency", gauge, "Each agent pool's limit.");
    for pool in &status.pools {
        out.sample(
            "pool_max_concurrency",
            &[("pool", &pool.name)],
            pool.max_concurrency as f64,
        );
    }
    out.family(
        "pool_utilization",
        gauge,
        "Each agent pool's running tasks over its limit.",
    );
    for pool in &status.pools {
        out.sample(
            "pool_utilization",
            &[("pool", &pool.name)],
            pool.utilization(),
        );
    }
    let m = &status.metrics;
    for (name, help, value) in [
        ("tasks_enqueued_total", "Tasks taken in.", m.tasks_enqueued),
        ("tasks_assigned_total", "Runners started.", m.tasks_assigned),
        (
            "tasks_completed_total",
            "Tasks completed.",
            m.tasks_completed,
        ),
        (
            "runner_timeouts_total",
            "Runners that timed out: silent past the heartbeat timeout, or stopped at their time limit.",
            m.runner_timeouts,
        ),
    ] {
        out.single(name, counter, help, value as f64);
    }
    let stats = &status.failure_stats;
    for (name, help, counts) in [
        (
            "retries_total",
            "Retries scheduled, by failure reason class.",
            &stats.retries,
        ),
        (
            "permanent_failures_total",
            "Tasks failed for good, by failure reason class.",
            &stats.permanent_failures,
        ),
    ] {
        out.family(name, counter, help);
        for (reason, n) in counts.iter() {
            out.sample(name, &[("reason", reason)], n as f64);
        }
    }
    out.family(
        "backoff_delay_seconds",
        "histogram",
        "Backoff delays scheduled before retries.",
    );
    for (bound, n) in stats.delays.cumulative() {
        out.sample(
            "backoff_delay_seconds_bucket",
            &[("le", &number(bound))],
            n as f64,
        );
    }
    out.sample("backoff_delay_seconds_sum", &[], stats.delays.sum);
    out.sample(
        "backoff_delay_seconds_count",
        &[],
        stats.delays.count as f64,
    );
    if let Some(b) = budget {
        out.single(
            "retry_budget_tokens",
            gauge,
            "Tokens left in the retry budget.",
            b.tokens as f64,
        );
        out.single(
            "retry_budget_capacity",
            gauge,
            "The retry budget's capacity.",
            b.settings.capacity as f64,
        );
        out.single(
            "retry_budget_refused_total",
            counter,
            "Retries refused because the budget was empty.",
            b.refused as f64,
        );
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(3.0), "3");
    }
}
