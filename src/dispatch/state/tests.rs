use super::*;
use crate::retry::backoff::BackoffPolicy;
use std::collections::VecDeque;

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
        names: TaskNames::shared("spec".into(), "repo".into(), None),
        priority: 0,
        created_at: None,
    }
}

fn pool(name: &str, max: u64) -> PoolState {
    PoolState::new(name, "local-process", max)
}

fn state() -> DispatcherState<&'static str> {
    DispatcherState::new(
        Limits {
            max_global_concurrency: 3,
            heartbeat_timeout: 60 * SECOND,
        },
        Pools::new([pool("p", 2), pool("q", 2)]),
        Scheduler::new(Policy::Priority, SkillMapping::default()),
    )
}

fn runner(id: &str) -> NewRunner {
    NewRunner {
        runner_id: id.into(),
        slot_id: Some(format!("slot-{id}").into()),
        started_at: None,
        details: RunnerDetails::default(),
    }
}

/// The single reports `effects` stand for (a completion's parts included).
fn singles(effects: &[Effect<&'static str>]) -> Vec<Effect<&'static str>> {
    effects
        .iter()
        .flat_map(|e| match e {
            Effect::Started(start) => start.remaining_reports(),
            Effect::Completed(c) => c.remaining_reports(),
            single => vec![single.clone()],
        })
        .collect()
}

fn released(effects: &[Effect<&'static str>]) -> Vec<String> {
    singles(effects)
        .iter()
        .filter_map(|e| match e {
            Effect::ReleaseSlot { slot_id, .. } => Some(slot_id.to_string()),
            _ => None,
        })
        .collect()
}

fn reported(effects: &[Effect<&'static str>]) -> Vec<ReportedState> {
    singles(effects)
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
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(0))
        .unwrap();
    s.track_running(meta("t2"), None, "p", runner("r2"), at(0))
        .unwrap();
    assert_eq!(
        s.track_running(meta("t3"), None, "p", runner("r3"), at(0)),
        Err(Refusal::PoolFull("p".into()))
    );
    assert!(matches!(
        s.track_running(meta("t3"), None, "nope", runner("r3"), at(0)),
        Err(Refusal::UnknownPool(_))
    ));
    assert!(matches!(
        s.track_running(meta("t1"), None, "q", runner("r9"), at(0)),
        Err(Refusal::TaskAlreadyHeld { .. })
    ));
    s.track_running(meta("t3"), None, "q", runner("r3"), at(0))
        .unwrap();
    assert_eq!(
        s.track_running(meta("t4"), None, "q", runner("r4"), at(0)),
        Err(Refusal::GlobalLimitReached(3))
    );
    assert_eq!(s.global_running(), 3);
    s.check_invariants().unwrap();
}

#[test]
fn first_failure_releases_once_and_delays_until_the_backoff() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(0))
        .unwrap();
    let out = s
        .fail_task("t1", None, "boom", Some("r1"), &mut book, at(10))
        .unwrap();
    assert!(out.applied);
    assert_eq!(released(&out.effects), ["slot-r1"]);
    assert_eq!(reported(&out.effects), [ReportedState::Ready]);
    assert_eq!(s.global_running(), 0);
    assert_eq!(s.place_of("t1"), Some(&Place::delayed(11 * SECOND)));
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
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(0))
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
        s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(0))
            .unwrap();
        let (first, second) = if completion_first {
            let a = s.complete("r1", None, true, false, None, &mut book, at(100));
            let b = s.time_out("r1", &mut book, at(100));
            (a, b)
        } else {
            let a = s.time_out("r1", &mut book, at(100));
            let b = s.complete("r1", None, true, false, None, &mut book, at(100));
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
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(5))
        .unwrap();
    let out = s.complete("r1", None, true, false, None, &mut book, at(7));
    // One report for the four port calls, then the handle.
    assert_eq!(out.effects.len(), 2);
    assert!(matches!(out.effects[0], Effect::Completed(_)));
    let kinds: Vec<&str> = singles(&out.effects)
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
fn an_outcome_for_one_task_is_taken_at_once_and_its_handle_set_apart() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(5))
        .unwrap();
    let out = s.complete("r1", None, true, false, None, &mut book, at(7));
    match s.file_and_take(out.effects) {
        Filing::Taken {
            task,
            reports,
            discard,
        } => {
            assert_eq!(&*task, "t1");
            assert_eq!(discard, Some("h1"));
            assert_eq!(reports.len(), 1);
            assert_eq!(reports.iter().map(Report::parts).sum::<usize>(), 4);
            assert!(reports.iter().all(|e| !matches!(e, Effect::Discard(_))));
            // The lane stays busy until the delivery ends: a report filed
            // meanwhile waits behind the ones taken.
            let later = vec![Effect::StopRunner {
                task_id: "t1".into(),
                runner_id: "r1".into(),
            }];
            assert!(matches!(s.file_and_take(later), Filing::Filed(_)));
            assert!(s.finish_reports("t1", 4, VecDeque::new(), 0));
        }
        Filing::Filed(_) => panic!("one task's outcome is taken at once"),
    }
}

#[test]
fn an_outcome_of_another_shape_is_filed_lane_by_lane() {
    let mut s = state();
    let effects = vec![
        Effect::StopRunner {
            task_id: "a".into(),
            runner_id: "ra".into(),
        },
        Effect::Discard("ha"),
        Effect::StopRunner {
            task_id: "b".into(),
            runner_id: "rb".into(),
        },
        Effect::Discard("hb"),
    ];
    match s.file_and_take(effects) {
        Filing::Filed(filed) => {
            let lanes: Vec<&str> = filed.lanes.iter().map(|l| &**l).collect();
            assert_eq!(lanes, ["a", "b"]);
            assert_eq!(filed.discards, ["ha", "hb"]);
        }
        Filing::Taken { .. } => panic!("two tasks' reports are not taken at once"),
    }
    // Two tasks' reports, no handle: each goes to its own lane.
    let two = vec![
        Effect::StopRunner {
            task_id: "c".into(),
            runner_id: "rc".into(),
        },
        Effect::StopRunner {
            task_id: "d".into(),
            runner_id: "rd".into(),
        },
    ];
    match s.file_and_take(two) {
        Filing::Filed(filed) => {
            let lanes: Vec<&str> = filed.lanes.iter().map(|l| &**l).collect();
            assert_eq!(lanes, ["c", "d"]);
        }
        Filing::Taken { .. } => panic!("two tasks' reports are not taken at once"),
    }
    // A task whose lane exists has its reports filed behind the waiting ones.
    let again = vec![Effect::StopRunner {
        task_id: "a".into(),
        runner_id: "ra2".into(),
    }];
    assert!(matches!(s.file_and_take(again), Filing::Filed(_)));
    assert_eq!(s.take_reports("a", 0, false).map(|r| r.len()), Some(2));
}

#[test]
fn heartbeats_keep_runners_alive_and_silence_times_them_out() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), Some("h1"), "p", runner("r1"), at(0))
        .unwrap();
    s.track_running(meta("t2"), Some("h2"), "p", runner("r2"), at(0))
        .unwrap();
    assert!(s.heartbeat("r2", at(50)));
    let outcomes = s.check_heartbeats(&mut book, at(61));
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        outcomes[0]
            .failure
            .as_ref()
            .unwrap()
            .1
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
    s.track_running(meta("r"), Some("hr"), "p", runner("r1"), at(0))
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
fn the_delayed_index_follows_each_task_through_slot_reuse_and_repeated_failures() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    for id in ["a", "b", "c"] {
        s.offer(meta(id), id, at(0)).unwrap();
        s.fail_task(id, None, "x", None, &mut book, at(0)).unwrap();
    }
    // "b" fails for good and leaves: its slot is free for the next task.
    while s.place_of("b").is_some() {
        s.fail_task("b", None, "x", None, &mut book, at(0)).unwrap();
    }
    s.offer(meta("d"), "d", at(0)).unwrap();
    s.fail_task("d", None, "x", None, &mut book, at(0)).unwrap();
    // A delayed task failing again moves to its new due time.
    s.fail_task("a", None, "x", None, &mut book, at(5)).unwrap();
    s.check_invariants().unwrap();
    let ids = |s: &DispatcherState<&'static str>| -> Vec<String> {
        s.delayed_tasks()
            .iter()
            .map(|(id, ..)| id.to_string())
            .collect()
    };
    // "c" and "d" are due together (in no promised order), "a" later.
    let mut order = ids(&s);
    assert_eq!(order.pop().as_deref(), Some("a"));
    order.sort();
    assert_eq!(order, ["c", "d"]);
    let first_due = s.next_due().unwrap();
    assert_eq!(s.promote_due(first_due), 2);
    assert_eq!(ids(&s), ["a"]);
    assert_eq!(s.place_of("d"), Some(&Place::Queued));
    assert_eq!(s.place_of("b"), None);
    s.check_invariants().unwrap();
}

#[test]
fn a_runner_of_another_task_is_refused() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t1"), None, "p", runner("r1"), at(0))
        .unwrap();
    assert!(matches!(
        s.fail_task("t2", None, "x", Some("r1"), &mut book, at(0)),
        Err(Refusal::RunnerOfAnotherTask { .. })
    ));
    assert_eq!(s.runners().len(), 1);
    assert_eq!(book.len(), 0);
}

fn queued(s: &mut DispatcherState<&'static str>, id: &'static str, priority: i64, at_s: u64) {
    let meta = TaskMeta {
        priority,
        ..meta(id)
    };
    s.offer(meta, id, at(at_s)).unwrap();
}

fn reserved_ids(reservations: &[Reservation<&'static str>]) -> Vec<String> {
    reservations.iter().map(|r| r.meta.id.to_string()).collect()
}

#[test]
fn scheduling_reserves_capacity_in_priority_order_up_to_the_global_limit() {
    let mut s = state(); // global limit 3, pools p and q with 2 each
    queued(&mut s, "low", 1, 0);
    queued(&mut s, "high-new", 5, 2);
    queued(&mut s, "high-old", 5, 1);
    queued(&mut s, "mid", 3, 3);
    let r = s.schedule();
    assert_eq!(reserved_ids(&r), ["high-old", "high-new", "mid"]);
    assert_eq!(s.global_running(), 3);
    assert_eq!(s.place_of("low"), Some(&Place::Queued));
    assert!(matches!(s.place_of("mid"), Some(Place::Assigning { .. })));
    // Reservations count as running: nothing more fits.
    assert!(s.schedule().is_empty());
    s.check_invariants().unwrap();
}

#[test]
fn the_queue_follows_each_task_through_slot_reuse_priority_changes_and_requeues() {
    let mut s = state(); // global limit 3
    let mut book = RetryBook::new(BackoffPolicy::default());
    for (id, priority) in [("a", 1), ("b", 2), ("c", 3)] {
        queued(&mut s, id, priority, 0);
    }
    // "c" fails for good and leaves; "d" takes its slot.
    while s.place_of("c").is_some() {
        s.fail_task("c", None, "x", None, &mut book, at(0)).unwrap();
    }
    queued(&mut s, "d", 0, 0);
    assert!(s.set_priority("d", 9));
    assert!(s.set_priority("a", 5));
    s.check_invariants().unwrap();
    let ids = |s: &DispatcherState<&'static str>| -> Vec<String> {
        s.queued_ids().iter().map(|id| id.to_string()).collect()
    };
    assert_eq!(ids(&s), ["d", "a", "b"]);
    // The policy changes: the queue is rebuilt from the held tasks.
    s.set_policy(Policy::Fifo);
    assert_eq!(ids(&s), ["a", "b", "d"]);
    s.set_policy(Policy::Priority);
    let mut r = s.schedule();
    assert_eq!(reserved_ids(&r), ["d", "a", "b"]);
    let a = r.remove(1);
    assert!(s.abort_assignment("a", a.payload).applied);
    assert_eq!(ids(&s), ["a"]);
    s.check_invariants().unwrap();
}

#[test]
fn fifo_ignores_priority() {
    let mut s = state();
    s.set_policy(Policy::Fifo);
    queued(&mut s, "old", 0, 0);
    queued(&mut s, "urgent", 9, 1);
    assert_eq!(reserved_ids(&s.schedule()), ["old", "urgent"]);
}

#[test]
fn abort_puts_the_task_back_in_its_place_and_counts_nothing() {
    let mut s = state();
    queued(&mut s, "a", 1, 0);
    queued(&mut s, "b", 2, 0);
    let mut r = s.schedule();
    let b = r.remove(0);
    assert_eq!(b.meta.id.as_ref(), "b");
    assert!(s.abort_assignment("b", b.payload).applied);
    assert_eq!(s.queued_ids(), [TaskId::from("b")]);
    assert_eq!(s.global_running(), 1);
    assert_eq!(
        s.status(&RetryBook::new(BackoffPolicy::default()), true)
            .metrics
            .tasks_assigned,
        0
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_failed_launch_releases_the_slot_and_takes_the_failure_path() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    let r = s.schedule().pop().unwrap();
    let out = s.fail_assignment(
        "t1",
        r.payload,
        Some("slot-1".into()),
        "launch failed: no docker",
        &mut book,
        at(5),
    );
    assert!(out.applied);
    assert_eq!(released(&out.effects), ["slot-1"]);
    assert_eq!(reported(&out.effects), [ReportedState::Ready]);
    assert_eq!(s.global_running(), 0);
    assert_eq!(s.place_of("t1"), Some(&Place::delayed(6 * SECOND)));
    assert_eq!(
        book.info("t1").unwrap().failure_reason.as_deref(),
        Some("launch failed: no docker")
    );
    s.check_invariants().unwrap();
}

#[test]
fn confirming_tracks_the_runner_and_reports_running_with_events() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    let r = s.schedule().pop().unwrap();
    let out = s.confirm_assignment("t1", r.payload, runner("r1"), &mut book, at(3));
    assert!(out.applied);
    // One report for the three port calls.
    assert_eq!(out.effects.len(), 1);
    assert_eq!(out.effects.iter().map(Report::parts).sum::<usize>(), 3);
    assert_eq!(reported(&out.effects), [ReportedState::Running]);
    let singles = singles(&out.effects);
    assert!(matches!(
        &singles[0],
        Effect::ReportState {
            metadata: StateMetadata::Running { runner_id, assigned_slot: Some(slot), .. },
            ..
        } if runner_id.as_ref() == "r1" && slot.as_ref() == "slot-r1"
    ));
    assert!(matches!(singles[1], Effect::TaskAssigned { .. }));
    assert!(matches!(singles[2], Effect::RunnerStarted { .. }));
    assert_eq!(s.runner_of("t1"), Some(&RunnerId::from("r1")));
    assert_eq!(s.runners().len(), 1);
    s.check_invariants().unwrap();
}

#[test]
fn a_completion_reported_during_the_launch_is_applied_on_confirmation() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    let r = s.schedule().pop().unwrap();
    // The runner finished before launch() returned.
    assert!(
        s.complete("r1", Some("t1"), true, false, None, &mut book, at(1))
            .applied
    );
    assert!(
        !s.complete("r1", Some("t1"), true, false, None, &mut book, at(1))
            .applied
    );
    let out = s.confirm_assignment("t1", r.payload, runner("r1"), &mut book, at(2));
    assert_eq!(
        reported(&out.effects),
        [ReportedState::Running, ReportedState::Done]
    );
    assert_eq!(released(&out.effects), ["slot-r1"]);
    assert_eq!(s.place_of("t1"), None);
    assert_eq!(s.global_running(), 0);
    s.check_invariants().unwrap();
}

#[test]
fn an_early_report_of_an_aborted_launch_is_not_applied_to_the_next_one() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    let first = s.schedule().pop().unwrap();
    assert!(
        s.complete(
            "r1",
            Some("t1"),
            false,
            false,
            Some("boom"),
            &mut book,
            at(1)
        )
        .applied
    );
    // No slot: the launch never happened, the task goes back to the queue
    // and its early report with it.
    assert!(s.abort_assignment("t1", first.payload).applied);
    assert_eq!(s.place_of("t1"), Some(&Place::Queued));
    s.check_invariants().unwrap();
    let second = s.schedule().pop().unwrap();
    let out = s.confirm_assignment("t1", second.payload, runner("r2"), &mut book, at(2));
    assert_eq!(reported(&out.effects), [ReportedState::Running]);
    assert_eq!(s.runner_of("t1"), Some(&RunnerId::from("r2")));
    assert_eq!(book.retry_count("t1"), 0);
    s.check_invariants().unwrap();
    // A report during a launch that then fails is dropped with it too.
    let mut s = state();
    queued(&mut s, "t2", 0, 0);
    let r = s.schedule().pop().unwrap();
    assert!(
        s.fail_task("t2", None, "crash", None, &mut book, at(1))
            .unwrap()
            .applied
    );
    s.fail_assignment("t2", r.payload, None, "no docker", &mut book, at(2));
    assert!(matches!(s.place_of("t2"), Some(Place::Delayed { .. })));
    assert_eq!(book.retry_count("t2"), 1);
    s.check_invariants().unwrap();
}

#[test]
fn a_failure_reported_during_the_launch_is_applied_on_confirmation() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    let r = s.schedule().pop().unwrap();
    assert!(
        s.fail_task("t1", None, "crash", None, &mut book, at(1))
            .unwrap()
            .applied
    );
    assert_eq!(book.retry_count("t1"), 0, "recorded only once applied");
    let out = s.confirm_assignment("t1", r.payload, runner("r1"), &mut book, at(2));
    assert_eq!(
        reported(&out.effects),
        [ReportedState::Running, ReportedState::Ready]
    );
    assert_eq!(book.retry_count("t1"), 1);
    assert!(matches!(s.place_of("t1"), Some(Place::Delayed { .. })));
    s.check_invariants().unwrap();
}

#[test]
fn force_stop_interrupts_runners_and_requeues_their_tasks() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    queued(&mut s, "t1", 0, 0);
    queued(&mut s, "t2", 0, 0);
    let mut r = s.schedule();
    let second = r.pop().unwrap();
    let first = r.pop().unwrap();
    s.confirm_assignment("t1", first.payload, runner("r1"), &mut book, at(1));
    let out = s.force_stop(at(2));
    assert!(matches!(out.effects[0], Effect::StopRunner { .. }));
    assert_eq!(released(&out.effects), ["slot-r1"]);
    assert!(out.effects.iter().any(|e| matches!(
        e,
        Effect::ReportState {
            metadata: StateMetadata::Interrupted,
            ..
        }
    )));
    assert_eq!(s.place_of("t1"), Some(&Place::Queued));
    assert_eq!(
        book.retry_count("t1"),
        0,
        "an interruption is not a failure"
    );
    // A runner launched after the forced stop is stopped as soon as it is tracked.
    let late = s.confirm_assignment("t2", second.payload, runner("r2"), &mut book, at(3));
    assert!(late
        .effects
        .iter()
        .any(|e| matches!(e, Effect::StopRunner { runner_id, .. } if runner_id.as_ref() == "r2")));
    assert_eq!(s.global_running(), 0);
    assert!(s.schedule().is_empty(), "stopped: nothing is assigned");
    s.resume();
    assert_eq!(s.schedule().len(), 2);
    s.check_invariants().unwrap();
}

#[test]
fn a_duplicate_runner_id_from_the_launcher_fails_the_assignment() {
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::default());
    s.track_running(meta("t0"), Some("h0"), "p", runner("r1"), at(0))
        .unwrap();
    queued(&mut s, "t1", 0, 0);
    let r = s.schedule().pop().unwrap();
    let out = s.confirm_assignment("t1", r.payload, runner("r1"), &mut book, at(1));
    assert_eq!(reported(&out.effects), [ReportedState::Ready]);
    assert_eq!(released(&out.effects), ["slot-r1"]);
    assert_eq!(s.global_running(), 1);
    s.check_invariants().unwrap();
}

#[test]
fn a_restored_delay_takes_the_polled_task_and_queues_it_when_due() {
    let mut s = state();
    assert!(s.hold_delayed("t".into(), "spec".into(), 30 * SECOND, at(0)));
    assert!(!s.hold_delayed("t".into(), "spec".into(), 40 * SECOND, at(0)));
    let mut polled = meta("t");
    polled.priority = 7;
    assert!(s.offer(polled, "handle", at(1)).is_ok());
    assert_eq!(s.place_of("t"), Some(&Place::delayed(30 * SECOND)));
    assert_eq!(s.promote_due(29 * SECOND), 0);
    assert_eq!(s.promote_due(30 * SECOND), 1);
    let reserved = s.schedule();
    assert_eq!(reserved.len(), 1);
    // The polled task's own details replaced the placeholder's.
    assert_eq!(reserved[0].meta.priority, 7);
    assert_eq!(reserved[0].payload, "handle");
}

#[test]
fn a_dispatcher_snapshot_round_trip_keeps_retries_and_delays() {
    use crate::dispatch::snapshot::{capture, from_json, restore, to_json};
    let mut s = state();
    let mut book = RetryBook::new(BackoffPolicy::new(3, 2.0, 10.0, 300.0).unwrap());
    s.offer(meta("t"), "handle", at(0)).unwrap();
    let reserved = s.schedule();
    s.confirm_assignment(
        &reserved[0].meta.id,
        "handle",
        runner("r1"),
        &mut book,
        at(0),
    );
    s.complete(
        "r1",
        Some("t"),
        false,
        false,
        Some("exit 1"),
        &mut book,
        at(0),
    );
    assert_eq!(s.next_due(), Some(10 * SECOND));
    let text = to_json(&capture(&s, &book, at(4)));
    // Another process, whose monotonic clock reads 100 s at the same wall time.
    let mut later = state();
    let mut later_book = RetryBook::new(BackoffPolicy::new(3, 2.0, 10.0, 300.0).unwrap());
    let now = Now {
        mono: 100 * SECOND,
        wall: at(4).wall,
    };
    restore(&mut later, &mut later_book, &from_json(&text).unwrap(), now).unwrap();
    assert_eq!(later.place_of("t"), Some(&Place::delayed(106 * SECOND)));
    assert_eq!(later_book.retry_count("t"), 1);
    assert_eq!(later_book.info("t"), book.info("t"));
    // A dispatcher already holding tasks is refused, unchanged.
    let err = restore(&mut later, &mut later_book, &from_json(&text).unwrap(), now).unwrap_err();
    assert!(
        err.0.contains("holds no task yet; this one holds 1"),
        "{err}"
    );
    assert_eq!(later_book.retry_count("t"), 1);
}

#[test]
fn a_held_task_takes_64_bytes() {
    // SPEC §6, memory per task held: names shared, the age kept in
    // `created_at` (a handle is one pointer, as a Python object's), the
    // place in 12 bytes (a runner by its slot), the arrival number in 4.
    assert_eq!(std::mem::size_of::<Place>(), 12);
    assert_eq!(
        std::mem::size_of::<Option<HeldTask<std::ptr::NonNull<u8>>>>(),
        64
    );
}

#[test]
fn a_due_time_keeps_every_bit() {
    for at in [
        0,
        1,
        u64::from(u32::MAX),
        1 << 32,
        11 * SECOND,
        u64::MAX - 1,
        u64::MAX,
    ] {
        assert_eq!(Due::new(at).get(), at);
    }
}

#[test]
fn arrival_numbers_that_run_out_start_again_in_the_same_order() {
    let mut s = state();
    s.next_seq = u32::MAX - 2;
    // Equal priority and age: arrival order alone decides.
    for id in ["a", "b", "c", "d", "e"] {
        queued(&mut s, id, 0, 1);
    }
    let ids: Vec<String> = s.queued_ids().iter().map(|id| id.to_string()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "e"]);
    // Renumbered when "c" arrived: a, b as 0, 1; then c, d, e.
    assert_eq!(s.next_seq, 5);
    s.check_invariants().unwrap();
    let picked = reserved_ids(&s.schedule());
    assert_eq!(picked, ["a", "b", "c"]);
}
