//! Reports still waiting for delivery when a snapshot is taken (SPEC §9), in
//! a form that survives a restart: a dispatcher restored from the snapshot
//! delivers them first, and ignores polls of their tasks until they land, so
//! a task whose DONE had not reached the registry is not run again.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dispatch::runners::RunnerDetails;
use crate::dispatch::state::{Effect, ReportedState, StateMetadata};
use crate::id::{Id, RunnerId, SlotId, TaskId};
use crate::retry::snapshot::{saved_time, SnapshotError};
use crate::time::wall::WallTime;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case", deny_unknown_fields)]
pub enum SavedReport {
    ReleaseSlot {
        task_id: String,
        slot_id: String,
    },
    StopRunner {
        task_id: String,
        runner_id: String,
    },
    State {
        spec_name: String,
        task_id: String,
        state: String,
        metadata: SavedMetadata,
    },
    TaskAssigned {
        spec_name: String,
        task_id: String,
        runner_id: String,
        slot_id: Option<String>,
        pool_name: String,
        timestamp: String,
    },
    RunnerStarted {
        spec_name: String,
        task_id: String,
        runner_id: String,
        slot_id: Option<String>,
        pool_name: String,
        pid: Option<i64>,
        container_id: Option<String>,
        job_name: Option<String>,
        timestamp: String,
    },
    RunnerFinished {
        spec_name: String,
        task_id: String,
        runner_id: String,
        slot_id: Option<String>,
        success: bool,
        execution_time_seconds: f64,
        failure_reason: Option<String>,
    },
    TaskCompleted {
        spec_name: String,
        task_id: String,
        runner_id: String,
        execution_time_seconds: f64,
    },
    TaskFailed {
        spec_name: String,
        task_id: String,
        runner_id: Option<String>,
        failure_reason: String,
        retry_count: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SavedMetadata {
    Running {
        runner_id: String,
        assigned_slot: Option<String>,
        pool_name: String,
        started_at: String,
    },
    Retry {
        retry_count: u64,
        next_retry_at: String,
        failure_reason: String,
    },
    Interrupted,
    Done {
        runner_id: String,
        completed_at: String,
    },
    Failed {
        reason: String,
        retries: u64,
        runner_id: Option<String>,
    },
}

fn text(s: &str) -> String {
    s.to_string()
}

/// An optional name or id, as saved.
fn opt<S: std::ops::Deref<Target = str>>(s: &Option<S>) -> Option<String> {
    s.as_deref().map(str::to_owned)
}

fn iso(t: WallTime) -> String {
    t.isoformat().as_str().to_owned()
}

fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

fn opt_arc(s: &Option<String>) -> Option<Arc<str>> {
    s.as_deref().map(Arc::from)
}

fn opt_id(s: &Option<String>) -> Option<Id> {
    s.as_deref().map(Id::from)
}

/// A pending report as saved: one entry per port call it has still to make
/// (a completion's parts are saved as the single reports they stand for, so
/// the saved form is the same whichever way they were filed); none for a
/// handle (never pending).
pub fn save<T>(effect: &Effect<T>) -> Vec<SavedReport> {
    let singles = match effect {
        Effect::Started(start) => start.remaining_reports::<T>(),
        Effect::Completed(c) => c.remaining_reports::<T>(),
        single => return save_single(single).into_iter().collect(),
    };
    singles.iter().filter_map(save_single).collect()
}

/// A single report as saved.
fn save_single<T>(effect: &Effect<T>) -> Option<SavedReport> {
    Some(match effect {
        // Not single: see `save`.
        Effect::Discard(_) | Effect::Started(_) | Effect::Completed(_) => return None,
        Effect::ReleaseSlot { task_id, slot_id } => SavedReport::ReleaseSlot {
            task_id: text(task_id),
            slot_id: text(slot_id),
        },
        Effect::StopRunner { task_id, runner_id } => SavedReport::StopRunner {
            task_id: text(task_id),
            runner_id: text(runner_id),
        },
        Effect::ReportState {
            spec_name,
            task_id,
            state,
            metadata,
        } => SavedReport::State {
            spec_name: text(spec_name),
            task_id: text(task_id),
            state: state.value().to_owned(),
            metadata: match metadata {
                StateMetadata::Running {
                    runner_id,
                    assigned_slot,
                    pool_name,
                    started_at,
                } => SavedMetadata::Running {
                    runner_id: text(runner_id),
                    assigned_slot: opt(assigned_slot),
                    pool_name: text(pool_name),
                    started_at: iso(*started_at),
                },
                StateMetadata::Retry {
                    retry_count,
                    next_retry_at,
                    failure_reason,
                } => SavedMetadata::Retry {
                    retry_count: *retry_count,
                    next_retry_at: iso(*next_retry_at),
                    failure_reason: text(failure_reason),
                },
                StateMetadata::Interrupted => SavedMetadata::Interrupted,
                StateMetadata::Done {
                    runner_id,
                    completed_at,
                } => SavedMetadata::Done {
                    runner_id: text(runner_id),
                    completed_at: iso(*completed_at),
                },
                StateMetadata::Failed {
                    reason,
                    retries,
                    runner_id,
                } => SavedMetadata::Failed {
                    reason: text(reason),
                    retries: *retries,
                    runner_id: opt(runner_id),
                },
            },
        },
        Effect::TaskAssigned {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            pool_name,
            timestamp,
        } => SavedReport::TaskAssigned {
            spec_name: text(spec_name),
            task_id: text(task_id),
            runner_id: text(runner_id),
            slot_id: opt(slot_id),
            pool_name: text(pool_name),
            timestamp: iso(*timestamp),
        },
        Effect::RunnerStarted {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            pool_name,
            details,
            timestamp,
        } => SavedReport::RunnerStarted {
            spec_name: text(spec_name),
            task_id: text(task_id),
            runner_id: text(runner_id),
            slot_id: opt(slot_id),
            pool_name: text(pool_name),
            pid: details.pid(),
            container_id: details.container_id().map(|s| s.to_string()),
            job_name: details.job_name().map(|s| s.to_string()),
            timestamp: iso(*timestamp),
        },
        Effect::RunnerFinished {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            success,
            execution_time_seconds,
            failure_reason,
        } => SavedReport::RunnerFinished {
            spec_name: text(spec_name),
            task_id: text(task_id),
            runner_id: text(runner_id),
            slot_id: opt(slot_id),
            success: *success,
            execution_time_seconds: *execution_time_seconds,
            failure_reason: opt(failure_reason),
        },
        Effect::TaskCompleted {
            spec_name,
            task_id,
            runner_id,
            execution_time_seconds,
        } => SavedReport::TaskCompleted {
            spec_name: text(spec_name),
            task_id: text(task_id),
            runner_id: text(runner_id),
            execution_time_seconds: *execution_time_seconds,
        },
        Effect::TaskFailed {
            spec_name,
            task_id,
            runner_id,
            failure_reason,
            retry_count,
        } => SavedReport::TaskFailed {
            spec_name: text(spec_name),
            task_id: text(task_id),
            runner_id: opt(runner_id),
            failure_reason: text(failure_reason),
            retry_count: *retry_count,
        },
    })
}

/// A saved report back as the effect to deliver; an error names the field.
pub fn load<T>(saved: &SavedReport) -> Result<Effect<T>, SnapshotError> {
    Ok(match saved {
        SavedReport::ReleaseSlot { task_id, slot_id } => Effect::ReleaseSlot {
            task_id: TaskId::from(task_id.as_str()),
            slot_id: SlotId::from(slot_id.as_str()),
        },
        SavedReport::StopRunner { task_id, runner_id } => Effect::StopRunner {
            task_id: TaskId::from(task_id.as_str()),
            runner_id: RunnerId::from(runner_id.as_str()),
        },
        SavedReport::State {
            spec_name,
            task_id,
            state,
            metadata,
        } => Effect::ReportState {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            state: match state.as_str() {
                "running" => ReportedState::Running,
                "ready" => ReportedState::Ready,
                "done" => ReportedState::Done,
                "failed" => ReportedState::Failed,
                other => {
                    return Err(SnapshotError(format!(
                        "state {other:?} is not running, ready, done or failed"
                    )))
                }
            },
            metadata: match metadata {
                SavedMetadata::Running {
                    runner_id,
                    assigned_slot,
                    pool_name,
                    started_at,
                } => StateMetadata::Running {
                    runner_id: RunnerId::from(runner_id.as_str()),
                    assigned_slot: opt_id(assigned_slot),
                    pool_name: arc(pool_name),
                    started_at: saved_time("metadata.started_at", started_at)?,
                },
                SavedMetadata::Retry {
                    retry_count,
                    next_retry_at,
                    failure_reason,
                } => StateMetadata::Retry {
                    retry_count: *retry_count,
                    next_retry_at: saved_time("metadata.next_retry_at", next_retry_at)?,
                    failure_reason: arc(failure_reason),
                },
                SavedMetadata::Interrupted => StateMetadata::Interrupted,
                SavedMetadata::Done {
                    runner_id,
                    completed_at,
                } => StateMetadata::Done {
                    runner_id: RunnerId::from(runner_id.as_str()),
                    completed_at: saved_time("metadata.completed_at", completed_at)?,
                },
                SavedMetadata::Failed {
                    reason,
                    retries,
                    runner_id,
                } => StateMetadata::Failed {
                    reason: arc(reason),
                    retries: *retries,
                    runner_id: opt_id(runner_id),
                },
            },
        },
        SavedReport::TaskAssigned {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            pool_name,
            timestamp,
        } => Effect::TaskAssigned {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            runner_id: RunnerId::from(runner_id.as_str()),
            slot_id: opt_id(slot_id),
            pool_name: arc(pool_name),
            timestamp: saved_time("timestamp", timestamp)?,
        },
        SavedReport::RunnerStarted {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            pool_name,
            pid,
            container_id,
            job_name,
            timestamp,
        } => Effect::RunnerStarted {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            runner_id: RunnerId::from(runner_id.as_str()),
            slot_id: opt_id(slot_id),
            pool_name: arc(pool_name),
            details: RunnerDetails::new(*pid, opt_arc(container_id), opt_arc(job_name)),
            timestamp: saved_time("timestamp", timestamp)?,
        },
        SavedReport::RunnerFinished {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            success,
            execution_time_seconds,
            failure_reason,
        } => Effect::RunnerFinished {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            runner_id: RunnerId::from(runner_id.as_str()),
            slot_id: opt_id(slot_id),
            success: *success,
            execution_time_seconds: *execution_time_seconds,
            failure_reason: opt_arc(failure_reason),
        },
        SavedReport::TaskCompleted {
            spec_name,
            task_id,
            runner_id,
            execution_time_seconds,
        } => Effect::TaskCompleted {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            runner_id: RunnerId::from(runner_id.as_str()),
            execution_time_seconds: *execution_time_seconds,
        },
        SavedReport::TaskFailed {
            spec_name,
            task_id,
            runner_id,
            failure_reason,
            retry_count,
        } => Effect::TaskFailed {
            spec_name: arc(spec_name),
            task_id: TaskId::from(task_id.as_str()),
            runner_id: opt_id(runner_id),
            failure_reason: arc(failure_reason),
            retry_count: *retry_count,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::state::{Completion, Start};

    #[test]
    fn every_kind_of_report_survives_a_round_trip_through_json() {
        let at = WallTime::from_micros(63_900_000_000_000_000).unwrap();
        let id = TaskId::from("t");
        let effects: Vec<Effect<()>> = vec![
            Effect::ReleaseSlot {
                task_id: id.clone(),
                slot_id: "s".into(),
            },
            Effect::StopRunner {
                task_id: id.clone(),
                runner_id: "r".into(),
            },
            Effect::ReportState {
                spec_name: "spec".into(),
                task_id: id.clone(),
                state: ReportedState::Ready,
                metadata: StateMetadata::Retry {
                    retry_count: 2,
                    next_retry_at: at,
                    failure_reason: "exit 1".into(),
                },
            },
            Effect::RunnerStarted {
                spec_name: "spec".into(),
                task_id: id.clone(),
                runner_id: "r".into(),
                slot_id: None,
                pool_name: "p".into(),
                details: RunnerDetails::new(Some(42), None, Some("j".into())),
                timestamp: at,
            },
            Effect::TaskFailed {
                spec_name: "spec".into(),
                task_id: id,
                runner_id: None,
                failure_reason: "oom".into(),
                retry_count: 3,
            },
        ];
        for effect in &effects {
            let saved = save(effect);
            assert_eq!(saved.len(), 1);
            let json = serde_json::to_string(&saved[0]).unwrap();
            let back: SavedReport = serde_json::from_str(&json).unwrap();
            let loaded: Effect<()> = load(&back).unwrap();
            assert_eq!(save(&loaded), saved);
        }
        assert!(save(&Effect::Discard(())).is_empty());
    }

    fn completion(slot: Option<&str>, delivered: u8) -> Effect<()> {
        Effect::Completed(Completion {
            spec_name: "spec".into(),
            task_id: "t".into(),
            runner_id: "r".into(),
            slot_id: slot.map(SlotId::from),
            execution_time_seconds: 1.5,
            completed_at: WallTime::from_micros(63_900_000_000_000_000).unwrap(),
            delivered,
        })
    }

    fn kinds(saved: &[SavedReport]) -> Vec<&'static str> {
        saved
            .iter()
            .map(|r| match r {
                SavedReport::State { state, .. } if state == "running" => "running",
                SavedReport::TaskAssigned { .. } => "assigned",
                SavedReport::RunnerStarted { .. } => "started",
                SavedReport::RunnerFinished { success: true, .. } => "finished",
                SavedReport::TaskCompleted { .. } => "completed",
                SavedReport::ReleaseSlot { .. } => "release",
                SavedReport::State { state, .. } if state == "done" => "done",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn a_completion_is_saved_as_the_reports_it_has_still_to_make() {
        let all = ["finished", "completed", "release", "done"];
        assert_eq!(kinds(&save(&completion(Some("s"), 0))), all);
        assert_eq!(kinds(&save(&completion(Some("s"), 2))), all[2..]);
        assert_eq!(kinds(&save(&completion(Some("s"), 4))), [""; 0]);
        // Without a slot there is nothing to release.
        assert_eq!(
            kinds(&save(&completion(None, 0))),
            ["finished", "completed", "done"]
        );
        assert_eq!(kinds(&save(&completion(None, 2))), ["done"]);
        // Each part loads back as the report it stands for.
        for saved in save(&completion(Some("s"), 0)) {
            let loaded: Effect<()> = load(&saved).unwrap();
            assert_eq!(save(&loaded), [saved]);
        }
    }

    #[test]
    fn a_launch_is_saved_as_the_reports_it_has_still_to_make() {
        let at = WallTime::from_micros(63_900_000_000_000_000).unwrap();
        let start = |delivered| -> Effect<()> {
            Effect::Started(Start {
                spec_name: "spec".into(),
                task_id: "t".into(),
                runner_id: "r".into(),
                slot_id: None,
                pool_name: "p".into(),
                details: RunnerDetails::default(),
                started_at: at,
                confirmed_at: at,
                delivered,
            })
        };
        assert_eq!(kinds(&save(&start(0))), ["running", "assigned", "started"]);
        assert_eq!(kinds(&save(&start(2))), ["started"]);
        assert!(save(&start(3)).is_empty());
        for saved in save(&start(0)) {
            let loaded: Effect<()> = load(&saved).unwrap();
            assert_eq!(save(&loaded), [saved]);
        }
    }
}
