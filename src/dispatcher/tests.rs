use super::*;
use crate::backoff::BackoffPolicy;

const SECOND: MonoNanos = 1_000_000_000;

fn at(seconds: u64) -> Now {
    Now {
        mono: seconds * SECOND,
        wall: WallTime::from_micros(63_000_000_000_000_000 + seconds as i64 * 1_000_000).unwrap(),
    }
}

fn meta(id: &str) -> TaskMeta {
    TaskMeta {
        id: id.into(),
        spec_name: "spec".into(),
        repo_name: "repo".into(),
        priority: 0,
        created_at: None,
        required_skill: None,
    }
}

fn pool(name: &str, max: u64) -> PoolState {
    PoolState {
        name: name.into(),
        kind: "local-process".into(),
        max_concurrency: max,
        running: 0,
        enabled: true,
    }
}

fn state() -> DispatcherState<&'static str> {
    DispatcherState::new(
        Limits {
            max_global_concurrency: 3,
            heartbeat_timeout: 60 * SECOND,
        },
        Pools::new([pool("p", 2), pool("q", 2)]),
        true,
    )
}

fn runner(id: &str, pool: &str) -> NewRunner {
    NewRunner {
        runner_id: id.into(),
        pool_name: pool.into(),
        slot_id: Some(format!("slot-{id}").into()),
        started_at: None,
        details: RunnerDetails::default(),
    }
}

fn released(effects: &[Effect<&str>]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ReleaseSlot { slot_id } => Some(slot_id.to_string()),
            _ => None,
        })
        .collect()
}

fn reported(effects: &[Effect<&str>]) -> Vec<ReportedState> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ReportState { state, .. } => Some(*state),
            _ => None,
        })
        .collect()
}

#[test]
fn tracking_reserves_capacity_and_refuses_without_change() {
    let mut s = state();
    s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(0))
        .unwrap();
    s.track_running(meta("t2"), None, runner("r2", "p"), at(0))
        .unwrap();
    assert_eq!(
        s.track_running(meta("t3"), None, runner("r3", "p"), at(0)),
        Err(Refusal::PoolFull("p".into()))
    );
    assert!(matches!(
        s.track_running(meta("t3"), None, runner("r3", "nope"), at(0)),
        Err(Refusal::UnknownPool(_))
    ));
    assert!(matches!(
        s.track_running(meta("t1"), None, runner("r9", "q"), at(0)),
        Err(Refusal::TaskAlreadyHeld { .. })
    ));
    s.track_running(meta("t3"), None, runner("r3", "q"), at(0))
        .unwrap();
    assert_eq!(
        s.track_running(meta("t4"), None, runner("r4", "q"), at(0)),
        Err(Refusal::GlobalLimitReached(3))
    );
    assert_eq!(s.global_running(), 3);
    s.check_invariants().unwrap();
}

#[test]
fn first_failure_releases_once_and_delays_until_the_backoff() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(0))
        .unwrap();
    let out = s
        .fail_task("t1", None, "boom", Some("r1"), &mut book, at(10))
        .unwrap();
    assert!(out.applied);
    assert_eq!(released(&out.effects), ["slot-r1"]);
    assert_eq!(reported(&out.effects), [ReportedState::Ready]);
    assert_eq!(s.global_running(), 0);
    assert_eq!(s.place_of("t1"), Some(&Place::Delayed { due: 11 * SECOND }));
    assert_eq!(s.promote_due(10 * SECOND + SECOND - 1), 0);
    assert_eq!(s.promote_due(11 * SECOND), 1);
    assert_eq!(s.place_of("t1"), Some(&Place::Queued));
    // A second report for the same runner changes nothing.
    let again = s
        .fail_task("t1", None, "boom", Some("r1"), &mut book, at(12))
        .unwrap();
    assert!(!again.applied);
    assert_eq!(book.retry_count("t1"), 1);
    s.check_invariants().unwrap();
}

#[test]
fn failure_at_the_limit_fails_the_task_and_forgets_it() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default().with_max_attempts(1));
    s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(0))
        .unwrap();
    let out = s
        .fail_task("t1", None, "boom", Some("r1"), &mut book, at(1))
        .unwrap();
    assert_eq!(reported(&out.effects), [ReportedState::Failed]);
    assert!(out
        .effects
        .iter()
        .any(|e| matches!(e, Effect::TaskFailed { retry_count: 1, .. })));
    assert!(out
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Discard("h1"))));
    assert_eq!(s.place_of("t1"), None);
    assert!(!book.contains("t1"));
}

#[test]
fn completion_and_timeout_race_applies_one_outcome() {
    for completion_first in [true, false] {
        let mut s = state();
        let mut book = RetryBook::new(BackoffPolicy::default());
        s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(0))
            .unwrap();
        let (first, second) = if completion_first {
            let a = s.complete("r1", true, None, &mut book, at(100));
            let b = s.time_out("r1", &mut book, at(100));
            (a, b)
        } else {
            let a = s.time_out("r1", &mut book, at(100));
            let b = s.complete("r1", true, None, &mut book, at(100));
            (a, b)
        };
        assert!(first.applied && !second.applied);
        assert_eq!(released(&first.effects), ["slot-r1"]);
        assert!(second.effects.is_empty());
        assert_eq!(s.global_running(), 0);
        assert_eq!(s.pools().get(0).running, 0);
        s.check_invariants().unwrap();
    }
}

#[test]
fn successful_completion_reports_done_and_clears_retries() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    book.record_failure("t1", Some("earlier"), at(0));
    s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(5))
        .unwrap();
    let out = s.complete("r1", true, None, &mut book, at(7));
    let kinds: Vec<&str> = out
        .effects
        .iter()
        .map(|e| match e {
            Effect::RunnerFinished {
                execution_time_seconds,
                ..
            } => {
                assert_eq!(*execution_time_seconds, 2.0);
                "finished"
            }
            Effect::TaskCompleted { .. } => "completed",
            Effect::ReleaseSlot { .. } => "release",
            Effect::ReportState { .. } => "report",
            Effect::Discard(_) => "discard",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["finished", "completed", "release", "report", "discard"]
    );
    assert!(!book.contains("t1"));
    assert_eq!(s.place_of("t1"), None);
}

#[test]
fn heartbeats_keep_runners_alive_and_silence_times_them_out() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), Some("h1"), runner("r1", "p"), at(0))
        .unwrap();
    s.track_running(meta("t2"), Some("h2"), runner("r2", "p"), at(0))
        .unwrap();
    assert!(s.heartbeat("r2", at(50)));
    let outcomes = s.check_heartbeats(&mut book, at(61));
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        outcomes[0]
            .failure
            .as_ref()
            .unwrap()
            .info
            .failure_reason
            .as_deref(),
        Some("timeout")
    );
    assert_eq!(s.runners().len(), 1);
    assert!(s.check_heartbeats(&mut book, at(61)).is_empty());
    s.check_invariants().unwrap();
}

#[test]
fn polls_of_held_tasks_are_ignored() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    assert!(s.offer(meta("q"), "hq", at(0)).is_ok());
    assert_eq!(s.offer(meta("q"), "again", at(0)), Err("again"));
    s.track_running(meta("r"), Some("hr"), runner("r1", "p"), at(0))
        .unwrap();
    assert_eq!(s.offer(meta("r"), "again", at(0)), Err("again"));
    s.fail_task("r", None, "x", None, &mut book, at(0)).unwrap();
    assert!(matches!(s.place_of("r"), Some(Place::Delayed { .. })));
    assert_eq!(s.offer(meta("r"), "again", at(0)), Err("again"));
    s.check_invariants().unwrap();
}

#[test]
fn a_delayed_task_without_handle_is_forgotten_when_due_unless_polled() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.fail_task("ghost", Some("spec"), "x", None, &mut book, at(0))
        .unwrap();
    s.fail_task("kept", Some("spec"), "x", None, &mut book, at(0))
        .unwrap();
    assert!(s.offer(meta("kept"), "hk", at(0)).is_ok());
    assert_eq!(s.promote_due(10 * SECOND), 1);
    assert_eq!(s.place_of("ghost"), None);
    assert_eq!(s.place_of("kept"), Some(&Place::Queued));
    s.check_invariants().unwrap();
}

#[test]
fn a_runner_of_another_task_is_refused() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), None, runner("r1", "p"), at(0))
        .unwrap();
    assert!(matches!(
        s.fail_task("t2", None, "x", Some("r1"), &mut book, at(0)),
        Err(Refusal::RunnerOfAnotherTask { .. })
    ));
    assert_eq!(s.runners().len(), 1);
    assert_eq!(book.len(), 0);
}
