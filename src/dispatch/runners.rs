//! Runners the dispatcher tracks: which task each one runs, where, since when,
//! and when it was last heard from.

use crate::hashing::FastMap;
use std::sync::Arc;

use crate::dispatch::pools::PoolIndex;
use crate::retry::state::TaskId;
use crate::time::clock::MonoNanos;
use crate::time::wall::WallTime;

/// What the launcher told us about a runner.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunnerDetails {
    pub pid: Option<i64>,
    pub container_id: Option<Arc<str>>,
    pub job_name: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrackedRunner {
    pub runner_id: Arc<str>,
    pub task_id: TaskId,
    pub spec_name: Arc<str>,
    pub slot_id: Option<Arc<str>>,
    pub pool: PoolIndex,
    pub started_mono: MonoNanos,
    pub started_at: WallTime,
    pub last_heartbeat: MonoNanos,
    pub last_heartbeat_at: WallTime,
    pub details: RunnerDetails,
}

#[derive(Debug, Default)]
pub struct Runners {
    by_id: FastMap<Arc<str>, TrackedRunner>,
}

impl Runners {
    /// Tracks a runner; false (and no change) when the id is already tracked.
    pub fn insert(&mut self, runner: TrackedRunner) -> bool {
        if self.by_id.contains_key(&runner.runner_id) {
            return false;
        }
        self.by_id.insert(runner.runner_id.clone(), runner);
        true
    }

    /// Stops tracking a runner and hands back what was known of it. Whoever
    /// gets `Some` here owns the runner's outcome; everyone after gets `None`.
    pub fn take(&mut self, runner_id: &str) -> Option<TrackedRunner> {
        self.by_id.remove(runner_id)
    }

    pub fn get(&self, runner_id: &str) -> Option<&TrackedRunner> {
        self.by_id.get(runner_id)
    }

    pub fn heartbeat(&mut self, runner_id: &str, mono: MonoNanos, wall: WallTime) -> bool {
        match self.by_id.get_mut(runner_id) {
            Some(r) => {
                r.last_heartbeat = r.last_heartbeat.max(mono);
                r.last_heartbeat_at = wall;
                true
            }
            None => false,
        }
    }

    /// Runners silent for longer than `timeout` at `now`.
    pub fn silent_since(&self, now: MonoNanos, timeout: MonoNanos) -> Vec<Arc<str>> {
        let mut ids: Vec<(MonoNanos, Arc<str>)> = self
            .by_id
            .values()
            .filter(|r| now.saturating_sub(r.last_heartbeat) > timeout)
            .map(|r| (r.last_heartbeat, r.runner_id.clone()))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TrackedRunner> {
        self.by_id.values()
    }

    pub fn ids(&self) -> Vec<Arc<str>> {
        self.by_id.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(id: &str, heartbeat: MonoNanos) -> TrackedRunner {
        TrackedRunner {
            runner_id: id.into(),
            task_id: format!("task-of-{id}").into(),
            spec_name: "spec".into(),
            slot_id: Some("slot".into()),
            pool: 0,
            started_mono: 0,
            started_at: WallTime::MIN,
            last_heartbeat: heartbeat,
            last_heartbeat_at: WallTime::MIN,
            details: RunnerDetails::default(),
        }
    }

    #[test]
    fn an_outcome_can_be_taken_once() {
        let mut runners = Runners::default();
        assert!(runners.insert(runner("r1", 0)));
        assert!(!runners.insert(runner("r1", 5)));
        assert!(runners.take("r1").is_some());
        assert!(runners.take("r1").is_none());
        assert!(runners.is_empty());
    }

    #[test]
    fn silence_is_measured_from_the_last_heartbeat() {
        let mut runners = Runners::default();
        runners.insert(runner("old", 0));
        runners.insert(runner("new", 50));
        assert_eq!(runners.silent_since(100, 60), vec![Arc::from("old")]);
        assert!(runners.heartbeat("old", 90, WallTime::MIN));
        assert!(runners.silent_since(100, 60).is_empty());
        assert!(!runners.heartbeat("gone", 90, WallTime::MIN));
    }
}
