//! Runners the dispatcher tracks: which task each one runs, where, since when,
//! and when it was last heard from.

use std::num::NonZeroI32;
use std::sync::Arc;

use crate::dispatch::keyed_slab::{Keyed, KeyedSlab};
use crate::dispatch::pools::PoolIndex;
use crate::dispatch::time_index::TimeQueue;
use crate::id::{RunnerId, SlotId, TaskId};
use crate::time::clock::MonoNanos;

/// What the launcher told us about a runner: its pid, container and job, if
/// any. A pid is kept in 4 bytes when it fits (an operating system's pids
/// do); a container or job name, or a pid that does not fit, is rare
/// (container and cluster pools, odd launchers), so those sit behind one
/// pointer, allocated only when there is one: 16 bytes in every launch
/// report instead of 48.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunnerDetails {
    pid: Option<NonZeroI32>,
    rare: Option<Box<RareDetails>>,
}

#[derive(Clone, Debug, PartialEq)]
struct RareDetails {
    /// A pid that is not a non-zero 32-bit integer.
    wide_pid: Option<i64>,
    container_id: Option<Arc<str>>,
    job_name: Option<Arc<str>>,
}

impl RunnerDetails {
    pub fn new(
        pid: Option<i64>,
        container_id: Option<Arc<str>>,
        job_name: Option<Arc<str>>,
    ) -> Self {
        let narrow = pid.and_then(|p| i32::try_from(p).ok().and_then(NonZeroI32::new));
        let wide_pid = pid.filter(|_| narrow.is_none());
        let rare =
            (wide_pid.is_some() || container_id.is_some() || job_name.is_some()).then(|| {
                Box::new(RareDetails {
                    wide_pid,
                    container_id,
                    job_name,
                })
            });
        RunnerDetails { pid: narrow, rare }
    }

    pub fn pid(&self) -> Option<i64> {
        match self.pid {
            Some(pid) => Some(i64::from(pid.get())),
            None => self.rare.as_ref()?.wide_pid,
        }
    }

    pub fn container_id(&self) -> Option<&Arc<str>> {
        self.rare.as_ref()?.container_id.as_ref()
    }

    pub fn job_name(&self) -> Option<&Arc<str>> {
        self.rare.as_ref()?.job_name.as_ref()
    }
}

/// A running runner, as decisions need it. What it started with (its
/// details, its wall-clock start) goes out in its launch's reports and is
/// read nowhere after, so it is not kept (SPEC §6, memory per running task).
#[derive(Clone, Debug, PartialEq)]
pub struct TrackedRunner {
    pub runner_id: RunnerId,
    /// Its task, which holds the names (spec, repo, skill).
    pub task_id: TaskId,
    pub slot_id: Option<SlotId>,
    pub pool: PoolIndex,
    pub started_mono: MonoNanos,
    pub last_heartbeat: MonoNanos,
}

impl Keyed for TrackedRunner {
    fn key(&self) -> &str {
        &self.runner_id
    }
}

/// Where [`Runners`] keeps a runner: its number until it is taken (a
/// running task names its runner by it, in 4 bytes, not by its id's 16).
pub type RunnerSlot = u32;

#[derive(Debug, Default)]
pub struct Runners {
    by_id: KeyedSlab<TrackedRunner>,
    /// (last heartbeat, the runner's slot in `by_id`), oldest first: a
    /// heartbeat check reads only the runners it times out, O(expired + 1),
    /// not every runner. Slot numbers compare as integers, where ids would
    /// compare as text.
    by_heartbeat: TimeQueue,
}

/// Whether `by_id` holds a runner last heard from at `time` in `slot`.
fn heard_at(by_id: &KeyedSlab<TrackedRunner>) -> impl Fn(MonoNanos, u32) -> bool + '_ {
    move |time, slot| by_id.at(slot).is_some_and(|r| r.last_heartbeat == time)
}

impl Runners {
    /// Makes room for `additional` runners at once (an assignment pass's).
    pub fn reserve(&mut self, additional: usize) {
        self.by_id.reserve(additional);
    }

    /// Tracks a runner; returns its slot, or `None` (and no change) when the
    /// id is already tracked.
    pub fn insert(&mut self, runner: TrackedRunner) -> Option<RunnerSlot> {
        if self.by_id.contains_key(&runner.runner_id) {
            return None;
        }
        let heartbeat = runner.last_heartbeat;
        let slot = self.by_id.insert_absent(runner);
        self.by_heartbeat.insert(heartbeat, slot);
        Some(slot)
    }

    /// Stops tracking a runner and hands back what was known of it. Whoever
    /// gets `Some` here owns the runner's outcome; everyone after gets `None`.
    pub fn take(&mut self, runner_id: &str) -> Option<TrackedRunner> {
        let (_, runner) = self.by_id.remove_from_slot(runner_id)?;
        self.by_heartbeat.forget(heard_at(&self.by_id));
        Some(runner)
    }

    /// [`Self::take`] by the runner's slot.
    pub fn take_at(&mut self, slot: RunnerSlot) -> Option<TrackedRunner> {
        let runner = self.by_id.remove_at(slot)?;
        self.by_heartbeat.forget(heard_at(&self.by_id));
        Some(runner)
    }

    /// [`Self::take`], but only when `runs` says the runner is the one
    /// wanted; otherwise it stays tracked and `Err` tells the task it runs.
    /// One lookup either way.
    pub fn take_if(
        &mut self,
        runner_id: &str,
        runs: impl FnOnce(&TrackedRunner) -> bool,
    ) -> Option<Result<TrackedRunner, TaskId>> {
        match self.by_id.remove_if(runner_id, runs)? {
            Ok(runner) => {
                self.by_heartbeat.forget(heard_at(&self.by_id));
                Some(Ok(runner))
            }
            Err(slot) => Some(Err(self.by_id.at(slot)?.task_id.clone())),
        }
    }

    pub fn get(&self, runner_id: &str) -> Option<&TrackedRunner> {
        self.by_id.get(runner_id)
    }

    /// The runner in `slot`, if one is tracked there.
    pub fn at(&self, slot: RunnerSlot) -> Option<&TrackedRunner> {
        self.by_id.at(slot)
    }

    pub fn heartbeat(&mut self, runner_id: &str, mono: MonoNanos) -> bool {
        let Some(slot) = self.by_id.slot_of(runner_id) else {
            return false;
        };
        let Some(r) = self.by_id.at_mut(slot) else {
            return false;
        };
        if mono > r.last_heartbeat {
            r.last_heartbeat = mono;
            self.by_heartbeat.forget(heard_at(&self.by_id));
            self.by_heartbeat.insert(mono, slot);
        }
        true
    }

    /// Runners silent for longer than `timeout` at `now`, longest silent
    /// first.
    pub fn silent_since(&mut self, now: MonoNanos, timeout: MonoNanos) -> Vec<RunnerId> {
        // Silent for longer than `timeout`: last heard before now - timeout.
        let Some(bound) = now.checked_sub(timeout) else {
            return Vec::new();
        };
        self.by_heartbeat
            .live_before(bound, heard_at(&self.by_id))
            .into_iter()
            .filter_map(|(_, slot)| self.by_id.at(slot))
            .map(|r| r.runner_id.clone())
            .collect()
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

    /// Every runner with its slot.
    pub fn entries(&self) -> impl Iterator<Item = (RunnerSlot, &TrackedRunner)> {
        self.by_id.entries()
    }

    pub fn ids(&self) -> Vec<RunnerId> {
        self.by_id.values().map(|r| r.runner_id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(id: &str, heartbeat: MonoNanos) -> TrackedRunner {
        TrackedRunner {
            runner_id: id.into(),
            task_id: format!("task-of-{id}").into(),
            slot_id: Some("slot".into()),
            pool: 0,
            started_mono: 0,
            last_heartbeat: heartbeat,
        }
    }

    #[test]
    fn details_keep_names_aside_only_when_there_are_some() {
        let pid_only = RunnerDetails::new(Some(7), None, None);
        assert_eq!(pid_only.pid(), Some(7));
        assert_eq!((pid_only.container_id(), pid_only.job_name()), (None, None));
        assert!(pid_only.rare.is_none());
        let named = RunnerDetails::new(None, None, Some("job".into()));
        assert_eq!(named.job_name().map(|s| &**s), Some("job"));
        assert_eq!((named.pid(), named.container_id()), (None, None));
        assert_eq!(std::mem::size_of::<RunnerDetails>(), 16);
        // SPEC §6, memory per running task: the task's names are the task's,
        // and what the runner started with went out in its reports.
        assert_eq!(std::mem::size_of::<TrackedRunner>(), 72);
    }

    #[test]
    fn every_pid_reads_back_as_given_the_wide_ones_kept_aside() {
        let max32 = i64::from(i32::MAX);
        let min32 = i64::from(i32::MIN);
        for pid in [1, 4_194_304, max32, min32, -5] {
            let d = RunnerDetails::new(Some(pid), None, None);
            assert_eq!(d.pid(), Some(pid));
            assert!(d.rare.is_none(), "{pid} fits in 4 bytes");
        }
        for pid in [0, max32 + 1, min32 - 1, i64::MAX, i64::MIN] {
            let d = RunnerDetails::new(Some(pid), None, None);
            assert_eq!(d.pid(), Some(pid));
            assert!(d.rare.is_some(), "{pid} is kept aside");
            assert_eq!((d.container_id(), d.job_name()), (None, None));
        }
        let both = RunnerDetails::new(Some(i64::MAX), Some("c".into()), None);
        assert_eq!(both.pid(), Some(i64::MAX));
        assert_eq!(both.container_id().map(|s| &**s), Some("c"));
        assert_eq!(RunnerDetails::new(None, None, None).pid(), None);
        assert_eq!(
            RunnerDetails::new(None, None, None),
            RunnerDetails::default()
        );
    }

    #[test]
    fn an_outcome_can_be_taken_once() {
        let mut runners = Runners::default();
        assert!(runners.insert(runner("r1", 0)).is_some());
        assert!(runners.insert(runner("r1", 5)).is_none());
        assert!(runners.take("r1").is_some());
        assert!(runners.take("r1").is_none());
        assert!(runners.is_empty());
    }

    #[test]
    fn a_runner_is_taken_by_its_slot_or_only_when_it_runs_the_task_asked() {
        let mut runners = Runners::default();
        let one = runners.insert(runner("r1", 0)).unwrap();
        let two = runners.insert(runner("r2", 0)).unwrap();
        assert_eq!(runners.at(two).map(|r| &*r.runner_id), Some("r2"));
        // Kept, and its task told, when it runs another one.
        let task = runners.at(one).unwrap().task_id.clone();
        let kept = runners.take_if("r1", |r| r.task_id.as_ref() == "other");
        assert_eq!(kept.unwrap().unwrap_err(), task);
        assert_eq!(runners.at(one).map(|r| &*r.runner_id), Some("r1"));
        assert!(runners.take_if("r1", |_| true).unwrap().is_ok());
        assert!(runners.take_if("r1", |_| true).is_none());
        assert_eq!(runners.take_at(two).map(|r| r.runner_id), Some("r2".into()));
        assert!(runners.take_at(two).is_none());
        assert!(runners.is_empty());
        assert_eq!(runners.by_heartbeat.len(), 0);
    }

    #[test]
    fn silence_is_measured_from_the_last_heartbeat() {
        let mut runners = Runners::default();
        runners.insert(runner("old", 0));
        runners.insert(runner("new", 50));
        assert_eq!(runners.silent_since(100, 60), vec![RunnerId::from("old")]);
        assert!(runners.heartbeat("old", 90));
        assert!(runners.silent_since(100, 60).is_empty());
        assert!(!runners.heartbeat("gone", 90));
        // An older heartbeat reported late changes nothing.
        assert!(runners.heartbeat("old", 10));
        assert!(runners.silent_since(100, 60).is_empty());
        assert_eq!(
            runners.silent_since(200, 60),
            vec![RunnerId::from("new"), RunnerId::from("old")]
        );
        runners.take("new");
        assert_eq!(runners.silent_since(200, 60), vec![RunnerId::from("old")]);
        assert_eq!(runners.by_heartbeat.len(), runners.len());
        // A slot freed by "new" and taken by another runner is its own.
        runners.insert(runner("newer", 150));
        assert_eq!(
            runners.silent_since(300, 60),
            vec![RunnerId::from("old"), RunnerId::from("newer")]
        );
        assert_eq!(runners.by_heartbeat.len(), runners.len());
    }
}
