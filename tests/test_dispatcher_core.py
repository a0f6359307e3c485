"""The original DispatcherCore scenarios (failures, completions, retries,
timeouts, status) with Mock ports and a ManualClock."""

import json
import logging

import pytest

from necrocode_dispatch import (
    DispatcherConfig,
    DispatcherCore,
    PoolNotFoundError,
    RetryManager,
    TaskAssignmentError,
    TaskState,
)
from necrocode_dispatch.dispatcher_core import DispatcherCore as CompatDispatcherCore

from .dispatcher_helpers import last_state_update, make_dispatcher, run, task


def test_init_without_config():
    dispatcher = DispatcherCore()
    assert isinstance(dispatcher.config, DispatcherConfig)
    assert dispatcher.running is False
    assert isinstance(dispatcher.retry_manager, RetryManager)
    assert dispatcher.retry_manager.max_attempts == 3
    assert dispatcher.get_global_running_count() == 0
    assert CompatDispatcherCore is DispatcherCore


def test_init_with_config():
    config = DispatcherConfig(
        retry_max_attempts=5,
        retry_backoff_base=3.0,
        retry_initial_delay=2.0,
        retry_max_delay=60.0,
        max_global_concurrency=4,
    )
    dispatcher = DispatcherCore(config)
    rm = dispatcher.retry_manager
    assert (rm.max_attempts, rm.backoff_base, rm.initial_delay, rm.max_delay) == (5, 3.0, 2.0, 60.0)
    assert dispatcher.config is config
    assert dispatcher.get_status()["max_global_concurrency"] == 4


def test_retry_manager_shares_the_dispatcher_clock():
    dispatcher, clock = make_dispatcher()
    assert dispatcher.clock is clock
    assert dispatcher.retry_manager.clock is clock


def test_first_failure_is_recorded_released_once_and_delayed():
    dispatcher, clock = make_dispatcher()
    pool = dispatcher.repo_pool_manager
    run(dispatcher, "t1")
    assert (
        dispatcher.handle_task_failure(
            "t1", "spec-a", "boom", runner_id="runner-t1", slot_id="slot-t1", pool_name="local"
        )
        is True
    )
    assert dispatcher.retry_manager.get_retry_count("t1") == 1
    assert pool.released == {"slot-t1": 1}
    assert dispatcher.get_global_running_count() == 0
    task_id, state, metadata = last_state_update(dispatcher.task_registry)
    assert (task_id, state) == ("t1", TaskState.READY)
    assert metadata["retry_count"] == 1
    assert metadata["failure_reason"] == "boom"
    assert (
        metadata["next_retry_at"]
        == dispatcher.retry_manager.get_retry_info("t1").to_dict()["next_retry_at"]
    )
    # Not assignable before the backoff ...
    assert dispatcher.get_task_place("t1") == "delayed"
    clock.advance(0.999)
    assert dispatcher.tick()["retries_ready"] == 0
    assert dispatcher.get_queued_task_ids() == []
    # ... assignable after.
    clock.advance(0.001)
    assert dispatcher.tick()["retries_ready"] == 1
    assert dispatcher.get_queued_task_ids() == ["t1"]
    dispatcher._check_invariants()


def test_failure_at_the_limit_reports_failed_and_clears_retry_info():
    dispatcher, clock = make_dispatcher(max_attempts=2)
    run(dispatcher, "t1", runner_id="r0")
    dispatcher.handle_task_failure("t1", "spec-a", "boom", runner_id="r0")
    clock.advance(1)
    dispatcher.tick()
    assert dispatcher.get_queued_task_ids() == ["t1"]
    # A failure reported for a queued task takes it out of the queue; this one
    # reaches the limit.
    dispatcher.handle_task_failure("t1", "spec-a", "final")
    task_id, state, metadata = last_state_update(dispatcher.task_registry)
    assert (task_id, state) == ("t1", TaskState.FAILED)
    assert metadata == {"reason": "final", "retries": 2, "runner_id": None}
    dispatcher.event_recorder.record_task_failed.assert_called_once_with(
        spec_name="spec-a", task_id="t1", runner_id=None, failure_reason="final", retry_count=2
    )
    assert dispatcher.retry_manager.get_retry_info("t1") is None
    assert dispatcher.get_task_place("t1") is None
    assert dispatcher.get_queued_task_ids() == []
    dispatcher._check_invariants()


def test_failure_at_the_limit_names_the_runner():
    dispatcher, _ = make_dispatcher(max_attempts=1)
    run(dispatcher, "t1", runner_id="r1")
    dispatcher.handle_task_failure("t1", "spec-a", "boom", runner_id="r1")
    _, state, metadata = last_state_update(dispatcher.task_registry)
    assert state == TaskState.FAILED
    assert metadata == {"reason": "boom", "retries": 1, "runner_id": "r1"}
    assert dispatcher.repo_pool_manager.released == {"slot-t1": 1}


def test_successful_completion():
    dispatcher, clock = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    dispatcher.retry_manager.record_failure("t1", "earlier")
    clock.advance(12.5)
    assert dispatcher.handle_runner_completion("r1", "t1", "spec-a", True, "slot-t1", "local")
    assert dispatcher.get_status()["running_tasks"] == 0
    assert dispatcher.repo_pool_manager.released == {"slot-t1": 1}
    task_id, state, metadata = last_state_update(dispatcher.task_registry)
    assert (task_id, state) == ("t1", TaskState.DONE)
    assert metadata["runner_id"] == "r1"
    assert metadata["completed_at"] == clock.now().isoformat()
    recorder = dispatcher.event_recorder
    recorder.record_runner_finished.assert_called_once_with(
        spec_name="spec-a",
        task_id="t1",
        runner_id="r1",
        slot_id="slot-t1",
        success=True,
        execution_time_seconds=12.5,
        failure_reason=None,
    )
    recorder.record_task_completed.assert_called_once_with(
        spec_name="spec-a", task_id="t1", runner_id="r1", execution_time_seconds=12.5
    )
    assert dispatcher.retry_manager.get_retry_info("t1") is None
    assert dispatcher.get_task_place("t1") is None


def test_failed_completion_records_and_delays():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    assert dispatcher.handle_runner_completion("r1", success=False, failure_reason="exit 1")
    dispatcher.event_recorder.record_runner_finished.assert_called_once()
    kwargs = dispatcher.event_recorder.record_runner_finished.call_args.kwargs
    assert (kwargs["success"], kwargs["failure_reason"]) == (False, "exit 1")
    assert dispatcher.retry_manager.get_retry_count("t1") == 1
    assert dispatcher.get_task_place("t1") == "delayed"
    assert dispatcher.repo_pool_manager.released == {"slot-t1": 1}


def test_exponential_backoff_through_the_dispatcher():
    dispatcher, clock = make_dispatcher(max_attempts=5)
    run(dispatcher, "t1", runner_id="r1")
    dispatcher.handle_task_failure("t1", "spec-a", "flaky", runner_id="r1")
    waits = []
    for _ in range(4):
        info = dispatcher.retry_manager.get_retry_info("t1")
        waits.append((info.next_retry_at - info.last_retry_at).total_seconds())
        clock.advance(waits[-1])
        dispatcher.tick()
        assert dispatcher.get_task_place("t1") == "queued"
        dispatcher.handle_task_failure("t1", "spec-a", "flaky")
    assert waits == [1.0, 2.0, 4.0, 8.0]


def test_retry_info_in_status():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "t1")
    dispatcher.handle_task_failure("t1", "spec-a", "Test failure")
    status = dispatcher.get_status()
    assert status["retry_info"]["t1"]["retry_count"] == 1
    assert status["retry_info"]["t1"]["failure_reason"] == "Test failure"
    assert status["delayed"] == [
        {"task_id": "t1", "next_retry_at": status["retry_info"]["t1"]["next_retry_at"]}
    ]


def test_status_lists_every_delayed_task_and_retry_record():
    dispatcher, clock = make_dispatcher()
    for task_id, reason in (("a", "exit 1"), ("b", "exit 1"), ("c", "timeout")):
        run(dispatcher, task_id)
        dispatcher.handle_task_failure(task_id, "spec-a", reason)
        clock.advance(0.25)
    dispatcher.retry_manager.clear_retry_info("c")  # delayed, its record gone
    # Another task's record, maybe where c's was: c's entry must not borrow it.
    dispatcher.retry_manager.record_failure("d", "exit 9")
    status = dispatcher.get_status()
    info = status["retry_info"]
    assert list(info) == ["a", "b", "d"]
    assert info["a"] == {
        "task_id": "a",
        "retry_count": 1,
        "last_retry_at": "2025-06-01T12:00:00",
        "next_retry_at": "2025-06-01T12:00:01",
        "failure_reason": "exit 1",
    }
    assert info["b"]["next_retry_at"] == "2025-06-01T12:00:01.250000"
    # Earliest due first, each with the time its record gives; a task whose
    # record was cleared still shows.
    delayed = status["delayed"]
    assert [d["task_id"] for d in delayed] == ["a", "b", "c"]
    assert [d["next_retry_at"] for d in delayed[:2]] == [
        info["a"]["next_retry_at"],
        info["b"]["next_retry_at"],
    ]
    assert delayed[2] == {"task_id": "c", "next_retry_at": "9999-12-31T23:59:59.999999"}
    # Copies: changing one report changes neither the state nor the next one.
    info["a"]["retry_count"] = 99
    delayed[0]["task_id"] = "changed"
    again = dispatcher.get_status()
    assert again["retry_info"]["a"]["retry_count"] == 1
    assert again["delayed"][0]["task_id"] == "a"


def test_runner_timeout_with_retry():
    dispatcher, clock = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1", spec="my-spec")
    clock.advance(61)
    assert dispatcher.check_heartbeats() == 1
    task_id, state, metadata = last_state_update(dispatcher.task_registry)
    assert (task_id, state, metadata["failure_reason"]) == ("t1", TaskState.READY, "timeout")
    assert dispatcher.task_registry.update_task_state.call_args.kwargs["spec_name"] == "my-spec"
    assert dispatcher.repo_pool_manager.released == {"slot-t1": 1}
    assert dispatcher.get_status()["metrics"]["runner_timeouts"] == 1


def test_heartbeats_keep_a_runner_alive():
    dispatcher, clock = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    clock.advance(50)
    assert dispatcher.update_heartbeat("r1") is True
    clock.advance(50)
    assert dispatcher.check_heartbeats() == 0
    assert dispatcher.update_heartbeat("nobody") is False


def test_runner_timeout_at_the_limit():
    dispatcher, _ = make_dispatcher(max_attempts=1)
    run(dispatcher, "t1", runner_id="r1", spec="my-spec")
    assert dispatcher._handle_runner_timeout("r1", None) is True
    _, state, metadata = last_state_update(dispatcher.task_registry)
    assert state == TaskState.FAILED
    assert metadata == {"reason": "timeout", "retries": 1, "runner_id": "r1"}
    assert dispatcher.task_registry.update_task_state.call_args.kwargs["spec_name"] == "my-spec"


def test_status_structure_is_json():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "t1")
    run(dispatcher, "t2", pool="docker")
    dispatcher.handle_task_failure("t2", "spec-a", "x")
    status = dispatcher.get_status()
    assert json.loads(json.dumps(status)) == status
    assert set(status) == {
        "running",
        "scheduling_policy",
        "queue_size",
        "delayed",
        "running_tasks",
        "global_running_count",
        "max_global_concurrency",
        "pool_statuses",
        "metrics",
        "retry_info",
        "retry_budget",
        "retries_by_reason",
        "permanent_failures_by_reason",
        "backoff_delays",
        "pending_reports",
        "pending_report_tasks",
        "deadlock_info",
        "delayed_count",
    }
    assert status["scheduling_policy"] == "priority"
    assert status["running_tasks"] == status["global_running_count"] == 1
    local = next(p for p in status["pool_statuses"] if p["pool_name"] == "local")
    assert (local["current_running"], local["max_concurrency"], local["utilization"]) == (
        1,
        4,
        0.25,
    )


def test_limits_refuse_without_change():
    dispatcher, _ = make_dispatcher(pools=(("local", 1),), global_limit=10)
    run(dispatcher, "t1")
    with pytest.raises(TaskAssignmentError, match="local"):
        run(dispatcher, "t2")
    with pytest.raises(PoolNotFoundError, match="nope"):
        run(dispatcher, "t3", pool="nope")
    assert dispatcher.get_global_running_count() == 1
    dispatcher._check_invariants()


# --- invariants this part touches -----------------------------------------


@pytest.mark.parametrize("completion_first", [True, False])
def test_timeout_and_completion_race_applies_one_outcome(completion_first):
    dispatcher, clock = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    clock.advance(61)
    if completion_first:
        first = dispatcher.handle_runner_completion("r1", "t1", "spec-a", True, "slot-t1", "local")
        second = dispatcher._handle_runner_timeout("r1")
    else:
        first = dispatcher._handle_runner_timeout("r1")
        second = dispatcher.handle_runner_completion("r1", "t1", "spec-a", True, "slot-t1", "local")
    assert (first, second) == (True, False)
    assert dispatcher.repo_pool_manager.released == {"slot-t1": 1}
    assert dispatcher.get_global_running_count() == 0
    assert dispatcher.get_status()["pool_statuses"][0]["current_running"] == 0
    assert dispatcher.handle_task_failure("t1", "spec-a", "late", runner_id="r1") is False
    dispatcher._check_invariants()


@pytest.mark.parametrize(
    "port, method",
    [
        ("repo_pool_manager", "release_slot"),
        ("task_registry", "update_task_state"),
        ("event_recorder", "record_task_failed"),
    ],
)
def test_a_raising_port_leaves_state_consistent_and_is_logged(port, method, caplog):
    dispatcher, _ = make_dispatcher(max_attempts=1)
    getattr(getattr(dispatcher, port), method).side_effect = RuntimeError("port down")
    run(dispatcher, "t1", runner_id="r1")
    with caplog.at_level(logging.ERROR, logger="necrocode_dispatch.dispatcher_core"):
        assert dispatcher.handle_task_failure("t1", "spec-a", "boom", runner_id="r1") is True
    assert any("port down" in r.getMessage() for r in caplog.records)
    assert dispatcher.get_global_running_count() == 0
    assert dispatcher.get_task_place("t1") is None
    dispatcher._check_invariants()


def test_a_poll_returning_a_delayed_or_running_task_is_ignored():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "running")
    run(dispatcher, "delayed")
    dispatcher.handle_task_failure("delayed", "spec-a", "x")
    dispatcher.task_source.poll_ready_tasks.return_value = [
        task("running"),
        task("delayed"),
        task("new"),
    ]
    result = dispatcher.tick()
    assert (result["enqueued"], result["ignored"]) == (1, 2)
    assert dispatcher.get_queued_task_ids() == ["new"]
    assert dispatcher.tick()["ignored"] == 3  # "new" is queued now
    dispatcher._check_invariants()


def test_a_finished_task_is_forgotten_and_can_come_back():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    dispatcher.handle_runner_completion("r1", success=True)
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t1")]
    assert dispatcher.tick()["enqueued"] == 1


# --- bad input --------------------------------------------------------------


def test_bad_input_is_rejected_without_change():
    dispatcher, _ = make_dispatcher()
    run(dispatcher, "t1", runner_id="r1")
    before = dispatcher.get_status()
    with pytest.raises(TypeError, match="task_id"):
        dispatcher.handle_task_failure(42, "spec-a")
    with pytest.raises(TypeError, match="runner_id"):
        dispatcher.handle_runner_completion(7, success=True)
    with pytest.raises(TypeError, match="success"):
        dispatcher.handle_runner_completion("r1", success="yes")
    with pytest.raises(TypeError, match="success"):
        dispatcher.handle_runner_completion("r1")
    with pytest.raises(TypeError, match="new_priority"):
        dispatcher.update_task_priority("spec-a", "t1", "high")
    with pytest.raises(TypeError, match="runner_id"):
        dispatcher.update_heartbeat(None)
    with pytest.raises(PoolNotFoundError, match="nope"):
        dispatcher.disable_pool("nope")
    with pytest.raises(ValueError, match="runner_id"):
        dispatcher.handle_task_failure("other-task", "spec-a", runner_id="r1")
    with pytest.raises(TypeError, match="retry_manager"):
        dispatcher.retry_manager = "not a manager"
    assert dispatcher.get_status() == before
    assert dispatcher.update_task_priority("spec-a", "t1", -5) is True  # negatives are fine


def test_status_without_per_task_lists_keeps_the_counts():
    dispatcher, _ = make_dispatcher()
    for i in range(3):
        dispatcher.handle_task_failure(f"t{i}", "spec-a", "x")
    full = dispatcher.get_status()
    light = dispatcher.get_status(include_tasks=False)
    assert len(full["delayed"]) == full["delayed_count"] == light["delayed_count"] == 3
    assert light["delayed"] == [] and light["retry_info"] == {}
    assert set(light) == set(full)
    assert "necrocode_dispatch_delayed_tasks 3" in dispatcher.export_prometheus()
