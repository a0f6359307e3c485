//! Saving and restoring retry state across restarts.
//!
//! Monotonic times mean nothing in another process (or after a reboot), so due
//! times are saved as wall-clock times and converted back to the monotonic
//! clock on load: a task due 30 s after the save is due 30 s after the load
//! if the wall clock moved on by exactly the time between them, or at once if
//! the wall clock says the due time has passed.
//!
//! A restore checks everything first and changes nothing when any part is
//! wrong, so a truncated or corrupted file loads nothing.

use crate::id::TaskId;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::retry::failure_policy::GiveUp;
use crate::retry::state::{RetryBook, StoredRecord};
use crate::time::clock::{MonoNanos, Now};
use crate::time::wall::WallTime;

/// What the file says it is, so that another JSON file is not taken for one.
pub const FORMAT: &str = "necrocode-dispatch retry state";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryState {
    pub format: String,
    pub version: u32,
    /// Wall-clock time of the save.
    pub saved_at: String,
    pub records: Vec<SavedRecord>,
    #[serde(default)]
    pub retry_budget: Option<SavedBudget>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRecord {
    pub task_id: String,
    pub retry_count: u64,
    pub last_retry_at: String,
    /// As reported: `last_retry_at` + the delay.
    pub next_retry_at: String,
    pub failure_reason: Option<String>,
    /// The monotonic due time as a wall-clock time at the save.
    pub due_at: String,
    #[serde(default)]
    pub gave_up: Option<String>,
    #[serde(default)]
    pub first_failure_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBudget {
    pub tokens: u64,
}

/// Why saved state cannot be restored.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotError(pub String);

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `mono` as a wall-clock time, by the two clocks' readings at `now`.
pub fn wall_of(now: Now, mono: MonoNanos) -> WallTime {
    let delta = if mono >= now.mono {
        ((mono - now.mono) / 1_000) as i64
    } else {
        -(((now.mono - mono) / 1_000) as i64)
    };
    now.wall.saturating_add_micros(delta)
}

/// The inverse of [`wall_of`], held within the monotonic clock's range.
pub fn mono_of(now: Now, wall: WallTime) -> MonoNanos {
    let delta_micros = i128::from(wall.micros()) - i128::from(now.wall.micros());
    let mono = i128::from(now.mono) + delta_micros * 1_000;
    mono.clamp(0, i128::from(u64::MAX)) as MonoNanos
}

/// The book's state at `now`.
pub fn capture(book: &RetryBook, now: Now) -> RetryState {
    let records = book
        .stored_records()
        .into_iter()
        .map(|r| SavedRecord {
            task_id: r.task_id.to_string(),
            retry_count: u64::from(r.retry_count),
            last_retry_at: r.last_retry_at.isoformat().as_str().to_owned(),
            next_retry_at: r.next_retry_at.isoformat().as_str().to_owned(),
            failure_reason: r.failure_reason.map(|s| s.to_string()),
            due_at: wall_of(now, r.due).isoformat().as_str().to_owned(),
            gave_up: r.gave_up.map(|g| g.name().to_owned()),
            first_failure_at: r
                .first_failure
                .map(|m| wall_of(now, m).isoformat().as_str().to_owned()),
        })
        .collect();
    RetryState {
        format: FORMAT.to_owned(),
        version: VERSION,
        saved_at: now.wall.isoformat().as_str().to_owned(),
        records,
        retry_budget: book
            .budget_status()
            .map(|b| SavedBudget { tokens: b.tokens }),
    }
}

/// Replaces the book's records with the saved ones, converting due times to
/// the monotonic clock at `now`. Nothing changes on error.
pub fn restore(book: &mut RetryBook, state: &RetryState, now: Now) -> Result<(), SnapshotError> {
    let records = check(state, now, book.policy().max_attempts())?;
    book.replace_records(&records, state.retry_budget.as_ref().map(|b| b.tokens));
    Ok(())
}

/// Checks that saved state says it is `what`, in a version this reads.
pub fn check_header(
    what: &str,
    (format, version): (&str, u32),
    (expected_format, expected_version): (&str, u32),
) -> Result<(), SnapshotError> {
    if format != expected_format {
        return Err(SnapshotError(format!(
            "not a {what}: format is {format:?}, expected {expected_format:?}"
        )));
    }
    if version != expected_version {
        return Err(SnapshotError(format!(
            "unsupported {what} version {version} (this version reads {expected_version})"
        )));
    }
    Ok(())
}

/// A saved wall-clock time, or an error naming the field.
pub fn saved_time(field: &str, text: &str) -> Result<WallTime, SnapshotError> {
    WallTime::parse_isoformat(text)
        .ok_or_else(|| SnapshotError(format!("{field} {text:?} is not an isoformat datetime")))
}

fn check(
    state: &RetryState,
    now: Now,
    max_attempts: u64,
) -> Result<Vec<StoredRecord>, SnapshotError> {
    check_header(
        "retry state",
        (&state.format, state.version),
        (FORMAT, VERSION),
    )?;
    saved_time("saved_at", &state.saved_at)?;
    let mut seen = HashSet::new();
    let mut records = Vec::with_capacity(state.records.len());
    for (i, r) in state.records.iter().enumerate() {
        let at = |what: &str| format!("records[{i}] ({:?}): {what}", r.task_id);
        if !seen.insert(r.task_id.as_str()) {
            return Err(SnapshotError(at("task_id appears twice")));
        }
        let time = |field: &str, text: &str| {
            WallTime::parse_isoformat(text).ok_or_else(|| {
                SnapshotError(at(&format!(
                    "{field} {text:?} is not an isoformat datetime"
                )))
            })
        };
        let retry_count = u32::try_from(r.retry_count).map_err(|_| {
            SnapshotError(at(&format!("retry_count {} is too large", r.retry_count)))
        })?;
        if r.retry_count == 0 || r.retry_count > max_attempts {
            return Err(SnapshotError(at(&format!(
                "retry_count {} is not between 1 and max_attempts ({max_attempts})",
                r.retry_count
            ))));
        }
        let last_retry_at = time("last_retry_at", &r.last_retry_at)?;
        let next_retry_at = time("next_retry_at", &r.next_retry_at)?;
        if next_retry_at < last_retry_at {
            return Err(SnapshotError(at(&format!(
                "next_retry_at {:?} is before last_retry_at {:?}",
                r.next_retry_at, r.last_retry_at
            ))));
        }
        let gave_up = match &r.gave_up {
            None => None,
            Some(name) => Some(GiveUp::parse(name).ok_or_else(|| {
                SnapshotError(at(&format!("gave_up {name:?} is not a known reason")))
            })?),
        };
        let first_failure = match &r.first_failure_at {
            Some(text) => mono_of(now, time("first_failure_at", text)?),
            None => mono_of(now, last_retry_at),
        };
        records.push(StoredRecord {
            task_id: TaskId::from(r.task_id.as_str()),
            retry_count,
            last_retry_at,
            next_retry_at,
            failure_reason: r.failure_reason.as_deref().map(Arc::from),
            due: mono_of(now, time("due_at", &r.due_at)?),
            gave_up,
            first_failure: Some(first_failure),
        });
    }
    Ok(records)
}

pub fn to_json(state: &RetryState) -> String {
    serde_json::to_string(state).expect("retry state serialises")
}

/// Parses saved JSON; the error says where it went wrong.
pub fn from_json(text: &str) -> Result<RetryState, SnapshotError> {
    parse_json(text, "retry state")
}

/// Parses saved JSON of any of our state formats (`what` names it).
pub fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &str,
) -> Result<T, SnapshotError> {
    serde_json::from_str(text).map_err(|e| {
        if e.is_eof() {
            return SnapshotError(format!("it ends early (truncated?): {e}"));
        }
        if e.is_syntax() {
            return SnapshotError(format!("it is not valid {what} (not JSON): {e}"));
        }
        // Well-formed JSON of the wrong shape: name the part that is wrong
        // rather than a position in text the caller may never have seen.
        let place = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|value| locate(&value))
            .unwrap_or_default();
        SnapshotError(format!(
            "it is not valid {what}: {place}{}",
            without_position(&e)
        ))
    })
}

/// serde's message without its " at line L column C".
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// The first list entry of a saved state that does not have its shape, as
/// `records[3] ("task-id"): ` (also inside a dispatcher state's `retry`).
fn locate(value: &serde_json::Value) -> Option<String> {
    fn entries<T: serde::de::DeserializeOwned>(
        value: &serde_json::Value,
        key: &str,
        prefix: &str,
    ) -> Option<String> {
        let list = value.get(key)?.as_array()?;
        list.iter().enumerate().find_map(|(i, entry)| {
            serde_json::from_value::<T>(entry.clone()).err().map(|_| {
                let id = entry.get("task_id").and_then(|t| t.as_str());
                match id {
                    Some(id) => format!("{prefix}{key}[{i}] ({id:?}): "),
                    None => format!("{prefix}{key}[{i}]: "),
                }
            })
        })
    }
    entries::<SavedRecord>(value, "records", "")
        .or_else(|| entries::<SavedRecord>(value.get("retry")?, "records", "retry."))
        .or_else(|| entries::<crate::dispatch::snapshot::SavedDelay>(value, "delayed", ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::backoff::BackoffPolicy;
    use crate::retry::state::RetryOptions;

    const SECOND: MonoNanos = 1_000_000_000;

    fn at(mono_seconds: u64, wall_seconds: i64) -> Now {
        Now {
            mono: mono_seconds * SECOND,
            wall: WallTime::from_micros(63_900_000_000_000_000 + wall_seconds * 1_000_000).unwrap(),
        }
    }

    #[test]
    fn a_round_trip_keeps_every_record_and_moves_due_times_to_the_new_clock() {
        let mut book = RetryBook::new(BackoffPolicy::new(3, 2.0, 10.0, 300.0).unwrap());
        book.record_failure("a", Some("exit 1"), at(100, 0));
        book.record_failure("b", None, at(100, 0));
        book.record_failure("b", None, at(105, 5));
        for _ in 0..3 {
            book.record_failure("c", Some("oom"), at(105, 5));
        }
        let saved = capture(&book, at(106, 6));
        let text = to_json(&saved);
        // A new process: its monotonic clock starts elsewhere.
        let mut restored = RetryBook::new(BackoffPolicy::new(3, 2.0, 10.0, 300.0).unwrap());
        restore(&mut restored, &from_json(&text).unwrap(), at(7, 6)).unwrap();
        assert_eq!(restored.all_info().len(), 3);
        for id in ["a", "b", "c"] {
            assert_eq!(restored.info(id), book.info(id), "{id}");
        }
        // "a" was due 4 s after the save; "b" 19 s after.
        assert!(restored.ready_for_retry(10 * SECOND).is_empty());
        assert_eq!(restored.ready_for_retry(11 * SECOND).len(), 1);
        assert_eq!(restored.ready_for_retry(26 * SECOND).len(), 2);
        assert!(!restored.should_retry("c", u64::MAX).allowed());
        assert_eq!(capture(&restored, at(7, 6)), saved);
    }

    #[test]
    fn broken_state_is_refused_and_changes_nothing() {
        let mut book = RetryBook::with_options(BackoffPolicy::default(), RetryOptions::default());
        book.record_failure("keep", None, at(0, 0));
        let good = to_json(&capture(&book, at(0, 0)));
        let truncated = &good[..good.len() / 2];
        assert!(from_json(truncated).unwrap_err().0.contains("ends early"));
        assert!(from_json("{\"format\": 1}").is_err());
        let mut shape = serde_json::from_str::<serde_json::Value>(&good).unwrap();
        shape["records"][0]["retry_count"] = "two".into();
        let err = from_json(&shape.to_string()).unwrap_err().0;
        assert!(
            err.starts_with("it is not valid retry state: records[0] (\"keep\"): invalid type"),
            "{err}"
        );
        assert!(!err.contains("line"), "{err}");
        let mut wrong = from_json(&good).unwrap();
        wrong.saved_at = "yesterday".into();
        assert!(restore(&mut book, &wrong, at(0, 0))
            .unwrap_err()
            .0
            .contains("saved_at"));
        let mut wrong = from_json(&good).unwrap();
        wrong.records[0].retry_count = 9;
        assert!(restore(&mut book, &wrong, at(0, 0))
            .unwrap_err()
            .0
            .contains("max_attempts (3)"));
        let mut wrong = from_json(&good).unwrap();
        wrong.records[0].next_retry_at = "2000-01-01T00:00:00".into();
        assert!(restore(&mut book, &wrong, at(0, 0))
            .unwrap_err()
            .0
            .contains("before last_retry_at"));
        let mut wrong = from_json(&good).unwrap();
        wrong.records[0].due_at = "yesterday".into();
        let err = restore(&mut book, &wrong, at(0, 0)).unwrap_err();
        assert_eq!(
            err.0,
            "records[0] (\"keep\"): due_at \"yesterday\" is not an isoformat datetime"
        );
        let mut twice = from_json(&good).unwrap();
        twice.records.push(twice.records[0].clone());
        twice.records[1].retry_count = 2;
        assert!(restore(&mut book, &twice, at(0, 0))
            .unwrap_err()
            .0
            .contains("twice"));
        let mut other = from_json(&good).unwrap();
        other.format = "something else".into();
        assert!(restore(&mut book, &other, at(0, 0)).is_err());
        assert_eq!(book.retry_count("keep"), 1);
    }
}
