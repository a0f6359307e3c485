//! Saving and restoring what a dispatcher must not forget across a restart:
//! its retry state and its delayed set (which task comes back when). Tasks
//! themselves belong to the caller's task source; a restored delayed task is
//! held without its handle until the source hands it over again.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dispatch::saved_reports::{self, SavedReport};
use crate::dispatch::state::{DispatcherState, Effect, ReportedState};
use crate::retry::snapshot::{self as retry_snapshot, RetryState, SnapshotError};
use crate::retry::state::{RetryBook, TaskId};
use crate::time::clock::Now;
use crate::time::wall::WallTime;

pub const FORMAT: &str = "necrocode-dispatch dispatcher state";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatcherSnapshot {
    pub format: String,
    pub version: u32,
    pub saved_at: String,
    pub retry: RetryState,
    pub delayed: Vec<SavedDelay>,
    /// Reports not yet delivered when saved, in each task's order (SPEC §9).
    #[serde(default)]
    pub pending_reports: Vec<SavedReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDelay {
    pub task_id: String,
    pub spec_name: String,
    /// When it comes back, as a wall-clock time at the save.
    pub due_at: String,
}

pub fn capture<T>(state: &DispatcherState<T>, book: &RetryBook, now: Now) -> DispatcherSnapshot {
    let delayed = state
        .delayed_tasks()
        .into_iter()
        .map(|(id, spec, due)| SavedDelay {
            task_id: id.to_string(),
            spec_name: spec.to_string(),
            due_at: retry_snapshot::wall_of(now, due)
                .isoformat()
                .as_str()
                .to_owned(),
        })
        .collect();
    DispatcherSnapshot {
        format: FORMAT.to_owned(),
        version: VERSION,
        saved_at: now.wall.isoformat().as_str().to_owned(),
        retry: retry_snapshot::capture(book, now),
        delayed,
        // Reports being delivered at this moment are not among them: they
        // are in a port call, and go back to their lane if it fails.
        pending_reports: state
            .outbox()
            .lanes()
            .flat_map(|(_, reports)| reports.iter().flat_map(saved_reports::save))
            .collect(),
    }
}

/// Restores the retry state and holds each saved delayed task until its due
/// time, into a dispatcher that holds no task yet (the retry state is
/// replaced whole, so tasks already held would lose theirs). Everything is
/// checked first: on error nothing changes.
pub fn restore<T>(
    state: &mut DispatcherState<T>,
    book: &mut RetryBook,
    snapshot: &DispatcherSnapshot,
    now: Now,
) -> Result<(), SnapshotError> {
    retry_snapshot::check_header(
        "dispatcher state",
        (&snapshot.format, snapshot.version),
        (FORMAT, VERSION),
    )?;
    if state.held_tasks() > 0 {
        return Err(SnapshotError(format!(
            "restore needs a dispatcher that holds no task yet; this one holds {}",
            state.held_tasks()
        )));
    }
    retry_snapshot::saved_time("saved_at", &snapshot.saved_at)?;
    let records: std::collections::HashMap<&str, &str> = snapshot
        .retry
        .records
        .iter()
        .map(|r| (r.task_id.as_str(), r.due_at.as_str()))
        .collect();
    let mut seen = HashSet::new();
    let mut delayed = Vec::with_capacity(snapshot.delayed.len());
    for (i, d) in snapshot.delayed.iter().enumerate() {
        if !seen.insert(d.task_id.as_str()) {
            return Err(SnapshotError(format!(
                "delayed[{i}] ({:?}): task_id appears twice",
                d.task_id
            )));
        }
        let due = WallTime::parse_isoformat(&d.due_at).ok_or_else(|| {
            SnapshotError(format!(
                "delayed[{i}] ({:?}): due_at {:?} is not an isoformat datetime",
                d.task_id, d.due_at
            ))
        })?;
        // A delayed task waits for its retry record's due time: both were
        // written by one capture, so they agree unless the file was edited.
        let record_due = records.get(d.task_id.as_str()).ok_or_else(|| {
            SnapshotError(format!(
                "delayed[{i}] ({:?}): no retry record for it in retry.records",
                d.task_id
            ))
        })?;
        // (A record whose own due_at is malformed is reported by its check.)
        let record_due_time = retry_snapshot::saved_time("due_at", record_due).ok();
        if record_due_time.is_some_and(|t| t != due) {
            return Err(SnapshotError(format!(
                "delayed[{i}] ({:?}): due_at {:?} disagrees with its retry record's due_at {record_due:?}",
                d.task_id, d.due_at
            )));
        }
        delayed.push((
            TaskId::from(d.task_id.as_str()),
            Arc::<str>::from(d.spec_name.as_str()),
            retry_snapshot::mono_of(now, due),
        ));
    }
    let reports = snapshot
        .pending_reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            saved_reports::load(r).map_err(|e| SnapshotError(format!("pending_reports[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A RUNNING report names a runner of the process that saved it: none
    // survives a restart, and delivering it would leave the task RUNNING in
    // the registry with nothing running it. The task comes back through the
    // source instead; the other reports (events, READY, DONE, FAILED) stand.
    let reports: Vec<Effect<T>> = reports
        .into_iter()
        .filter(|r| {
            !matches!(
                r,
                Effect::ReportState {
                    state: ReportedState::Running,
                    ..
                }
            )
        })
        .collect();
    retry_snapshot::restore(book, &snapshot.retry, now)
        .map_err(|e| SnapshotError(format!("retry: {e}")))?;
    for (id, spec, due) in delayed {
        state.hold_delayed(id, spec, due, now);
    }
    state.restore_reports(reports, now.mono);
    Ok(())
}

pub fn to_json(snapshot: &DispatcherSnapshot) -> String {
    serde_json::to_string(snapshot).expect("dispatcher state serialises")
}

pub fn from_json(text: &str) -> Result<DispatcherSnapshot, SnapshotError> {
    retry_snapshot::parse_json(text, "dispatcher state")
}
