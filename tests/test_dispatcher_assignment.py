"""The original assignment and main-loop scenarios: slot allocation, launch,
RUNNING report, events, the failure paths, start/stop and priority changes."""

import logging
import threading
import time
from datetime import datetime
from types import SimpleNamespace
from unittest.mock import Mock

import pytest

from necrocode_dispatch import AgentPool, SchedulingPolicy, SystemClock, TaskState

from .dispatcher_helpers import START, make_dispatcher, task
from .fakes import Slots, build, make_task


def test_assignment_success():
    dispatcher, _ = make_dispatcher()
    t = task("t1", spec="spec-a")
    t.metadata["repo_name"] = "repo-x"
    dispatcher.task_source.poll_ready_tasks.return_value = [t]
    slot = SimpleNamespace(slot_id="slot-7")
    dispatcher.repo_pool_manager.allocate_slot.return_value = slot
    dispatcher.runner_launcher.launch.return_value = SimpleNamespace(
        runner_id="runner-1", pid=4242, container_id=None, job_name=None
    )

    result = dispatcher.tick()

    assert result["enqueued"] == 1 and result["assigned"] == 1
    alloc = dispatcher.repo_pool_manager.allocate_slot.call_args
    assert alloc.args == ("repo-x",)
    assert alloc.kwargs["metadata"] == {
        "task_id": "t1",
        "spec_name": "spec-a",
        "pool_name": "local",
    }
    launched_task, launched_slot, pool = dispatcher.runner_launcher.launch.call_args.args
    assert launched_task is t and launched_slot is slot
    assert isinstance(pool, AgentPool) and pool.name == "local"
    update = dispatcher.task_registry.update_task_state.call_args.kwargs
    assert update["task_id"] == "t1" and update["spec_name"] == "spec-a"
    assert update["new_state"] is TaskState.RUNNING
    assert update["metadata"] == {
        "runner_id": "runner-1",
        "assigned_slot": "slot-7",
        "pool_name": "local",
        "started_at": START.isoformat(),
    }
    events = dispatcher.event_recorder
    events.record_task_assigned.assert_called_once_with(
        spec_name="spec-a",
        task_id="t1",
        runner_id="runner-1",
        slot_id="slot-7",
        pool_name="local",
        timestamp=START,
    )
    events.record_runner_started.assert_called_once_with(
        spec_name="spec-a",
        task_id="t1",
        runner_id="runner-1",
        slot_id="slot-7",
        pool_name="local",
        pid=4242,
        container_id=None,
        job_name=None,
        timestamp=START,
    )
    assert dispatcher.get_task_place("t1") == "running"
    assert dispatcher.get_global_running_count() == 1
    assert dispatcher.get_status()["metrics"]["tasks_assigned"] == 1
    # The tracked runner's outcome is applied through the usual path.
    assert dispatcher.handle_runner_completion("runner-1", success=True)
    assert dispatcher.repo_pool_manager.released == {"slot-7": 1}
    dispatcher._check_invariants()


class TaggedId(str):
    """A `str` subclass, as a port might return for an id."""


def test_reports_pass_on_the_ids_the_ports_gave_and_one_str_per_name():
    dispatcher, _ = make_dispatcher(pools=(("local", 4),))
    first, second = task("t1"), task("t2")
    for t in (first, second):
        t.metadata["repo_name"] = "repo-x"
    dispatcher.task_source.poll_ready_tasks.return_value = [first, second]
    # Made at run time, so that no two are one interned constant.
    slots = [SimpleNamespace(slot_id="".join(["slot-", str(i)])) for i in (1, 2)]
    dispatcher.repo_pool_manager.allocate_slot = Mock(side_effect=slots)
    runners = [
        SimpleNamespace(runner_id="".join(["runner-", "1"])),
        SimpleNamespace(runner_id=TaggedId("runner-2")),
    ]
    dispatcher.runner_launcher.launch.side_effect = runners

    assert dispatcher.tick()["assigned"] == 2

    started = [c.kwargs for c in dispatcher.event_recorder.record_runner_started.call_args_list]
    updates = [c.kwargs for c in dispatcher.task_registry.update_task_state.call_args_list]
    allocations = dispatcher.repo_pool_manager.allocate_slot.call_args_list
    # The launcher's and the slot pool's own `str` objects, not copies.
    assert started[0]["runner_id"] is runners[0].runner_id
    assert updates[0]["metadata"]["runner_id"] is runners[0].runner_id
    assert [s["slot_id"] for s in started] == ["slot-1", "slot-2"]
    assert all(s["slot_id"] is slot.slot_id for s, slot in zip(started, slots, strict=True))
    # A subclass is passed on as a plain `str` with its text.
    assert started[1]["runner_id"] == "runner-2"
    assert type(started[1]["runner_id"]) is str
    # The same task id everywhere an assignment passes it.
    assert allocations[0].kwargs["metadata"]["task_id"] is started[0]["task_id"]
    assert updates[0]["task_id"] is started[0]["task_id"]
    # Names are made once for all assignments.
    assert started[0]["pool_name"] is started[1]["pool_name"]
    assert started[0]["spec_name"] is started[1]["spec_name"]
    assert allocations[0].args[0] is allocations[1].args[0] == "repo-x"
    assert [u["metadata"]["pool_name"] for u in updates] == ["local", "local"]
    # A launch's two events share one `datetime`, as the original's `now`.
    assigned = dispatcher.event_recorder.record_task_assigned.call_args_list
    assert assigned[0].kwargs["timestamp"] is started[0]["timestamp"] == START


def test_no_slot_keeps_the_task_queued_and_counts_nothing():
    dispatcher, _ = make_dispatcher()
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t1")]
    dispatcher.repo_pool_manager.allocate_slot.return_value = None

    result = dispatcher.tick()

    assert result["assigned"] == 0 and result["no_slot"] == 1
    dispatcher.runner_launcher.launch.assert_not_called()
    dispatcher.task_registry.update_task_state.assert_not_called()
    assert dispatcher.get_queued_task_ids() == ["t1"]
    assert dispatcher.get_global_running_count() == 0
    status = dispatcher.get_status()
    assert all(p["current_running"] == 0 for p in status["pool_statuses"])
    assert status["metrics"]["tasks_assigned"] == 0
    dispatcher._check_invariants()


def test_slot_allocation_raising_keeps_the_task_queued_and_is_logged(caplog):
    dispatcher, _ = make_dispatcher()
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t1")]
    dispatcher.repo_pool_manager.allocate_slot.side_effect = OSError("disk full")

    with caplog.at_level(logging.ERROR, logger="necrocode_dispatch"):
        result = dispatcher.tick()

    assert result["no_slot"] == 1
    assert any(
        "allocate_slot" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records
    )
    dispatcher.runner_launcher.launch.assert_not_called()
    assert dispatcher.get_queued_task_ids() == ["t1"]
    assert dispatcher.get_global_running_count() == 0
    # Once slots are back, the task is assigned.
    dispatcher.repo_pool_manager.allocate_slot.side_effect = None
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id="s1")
    dispatcher.runner_launcher.launch.return_value = SimpleNamespace(runner_id="r1")
    assert dispatcher.tick()["assigned"] == 1


def test_launch_raising_releases_the_slot_and_takes_the_failure_path(caplog):
    dispatcher, ports = build([make_task("t1")])
    ports.launcher.fail_tasks.add("t1")

    with caplog.at_level(logging.ERROR, logger="necrocode_dispatch"):
        result = dispatcher.tick()

    assert result["launch_failed"] == 1 and result["assigned"] == 0
    assert ports.slots.released == {"slot-1": 1}
    state, metadata = ports.registry.history["t1"][-1]
    assert state is TaskState.READY
    assert metadata["retry_count"] == 1
    assert metadata["failure_reason"] == "launch failed: RuntimeError: no executor available"
    assert dispatcher.get_task_place("t1") == "delayed"
    assert dispatcher.get_global_running_count() == 0
    assert any("launch failed" in r.getMessage() for r in caplog.records)
    dispatcher._check_invariants()


def test_a_runner_without_runner_id_is_a_failed_launch():
    dispatcher, _ = make_dispatcher()
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t1")]
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id="s1")
    dispatcher.runner_launcher.launch.return_value = SimpleNamespace(pid=1)
    assert dispatcher.tick()["launch_failed"] == 1
    assert dispatcher.repo_pool_manager.released == {"s1": 1}
    assert dispatcher.get_task_place("t1") == "delayed"


def test_ids_that_are_not_str_are_refused_naming_the_attribute(caplog):
    dispatcher, _ = make_dispatcher()
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t1")]
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id="s1")
    dispatcher.runner_launcher.launch.return_value = SimpleNamespace(runner_id=42)
    assert dispatcher.tick()["launch_failed"] == 1
    reason = dispatcher.retry_manager.get_retry_info("t1").failure_reason
    assert "runner.runner_id must be a str" in reason and "42" in reason
    # A slot id that is not a str: a failed allocation, logged; the slot is
    # handed back at once.
    dispatcher, _ = make_dispatcher()
    dispatcher.task_source.poll_ready_tasks.return_value = [task("t2")]
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id=7)
    with caplog.at_level(logging.ERROR, logger="necrocode_dispatch"):
        assert dispatcher.tick()["assigned"] == 0
    assert any("slot.slot_id must be a str, got int 7" in r.getMessage() for r in caplog.records)
    dispatcher.repo_pool_manager.release_slot.assert_called_once_with(7, cleanup=True)


def test_a_completion_reported_before_launch_returns_is_applied():
    dispatcher, ports = build([make_task("t1")])

    def finish_at_once(launch):
        assert dispatcher.handle_runner_completion(
            launch.runner_id, task_id=launch.task_id, success=True
        )

    ports.launcher.on_launch = finish_at_once
    assert dispatcher.tick()["assigned"] == 1
    states = [s for s, _ in ports.registry.history["t1"]]
    assert states == [TaskState.RUNNING, TaskState.DONE]
    assert dispatcher.get_task_place("t1") is None
    assert ports.slots.each_released_once()
    dispatcher._check_invariants()


def test_main_loop_iteration_polls_the_source_and_schedules():
    dispatcher, ports = build([make_task("t1"), make_task("t2")])
    source = Mock(wraps=ports.registry)
    dispatcher.task_source = source
    result = dispatcher.tick()
    source.poll_ready_tasks.assert_called_once_with()
    assert result["enqueued"] == 2 and result["assigned"] == 2
    assert ports.launcher.order() == ["t1", "t2"]
    # The next pass sees both as running: the poll returns nothing new.
    assert dispatcher.tick()["enqueued"] == 0


def test_without_a_launcher_tasks_stay_queued():
    dispatcher, _ = build([make_task("t1")])
    dispatcher.runner_launcher = None
    assert dispatcher.tick()["assigned"] == 0
    assert dispatcher.get_queued_task_ids() == ["t1"]


def loop_threads():
    return [t for t in threading.enumerate() if t.name == "necrocode-dispatch-loop"]


def test_the_background_loop_polls_and_assigns():
    dispatcher, _, _ = started_with_one_runner()
    try:
        assert dispatcher.running is True
        loops = loop_threads()
        assert len(loops) == 1 and loops[0].daemon
    finally:
        dispatcher.handle_runner_completion("runner-1", success=True)
        dispatcher.stop(timeout=5)
    assert dispatcher.running is False
    assert loop_threads() == []


def test_stop_when_not_running_does_nothing(caplog):
    dispatcher, _ = build()
    with caplog.at_level(logging.WARNING, logger="necrocode_dispatch"):
        dispatcher.stop()
    assert dispatcher.running is False
    assert any("not running" in r.getMessage() for r in caplog.records)


def test_start_twice_runs_one_loop():
    dispatcher, _ = build(poll_interval=0.01)
    dispatcher.start()
    dispatcher.start()
    try:
        assert len(loop_threads()) == 1
    finally:
        dispatcher.stop(timeout=1)


# An hour between polls: stop() must wake the loop, not wait it out.
@pytest.mark.parametrize("poll_interval", [0.01, 3600])
def test_waiting_for_runners_with_none_running_returns_at_once(poll_interval):
    dispatcher, ports = build(poll_interval=poll_interval)
    dispatcher.start()
    began = time.monotonic()
    dispatcher.stop(timeout=60)
    assert time.monotonic() - began < 5
    assert ports.launcher.stopped == []


def started_with_one_runner(**config):
    """A started dispatcher whose loop has launched runner-1 for task t1."""
    launched = threading.Event()
    config.setdefault("poll_interval", 0.01)
    dispatcher, ports = build([make_task("t1")], **config)
    ports.launcher.on_launch = lambda _: launched.set()
    dispatcher.start()
    assert launched.wait(10)
    # launch() has returned and the runner is tracked once RUNNING is reported.
    deadline = time.monotonic() + 10
    while not any(state is TaskState.RUNNING for state, _ in ports.registry.history["t1"]):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    launched.clear()
    return dispatcher, ports, launched


def test_stop_waits_for_a_runner_that_finishes_in_time():
    dispatcher, ports, _ = started_with_one_runner()
    finisher = threading.Timer(
        0.2, lambda: dispatcher.handle_runner_completion("runner-1", success=True)
    )
    finisher.start()
    dispatcher.stop(timeout=30)
    finisher.join()
    assert ports.launcher.stopped == []
    assert ports.registry.states["t1"] is TaskState.DONE
    assert ports.slots.each_released_once()


def test_waiting_times_out_and_forces_the_stop():
    dispatcher, ports, _ = started_with_one_runner()
    began = time.monotonic()
    dispatcher.stop(timeout=0.2)
    assert time.monotonic() - began >= 0.2

    assert ports.launcher.stopped == ["runner-1"]
    assert ports.slots.released == {"slot-1": 1}
    state, metadata = ports.registry.history["t1"][-1]
    assert state is TaskState.READY and metadata == {"interrupted": True}
    assert dispatcher.get_global_running_count() == 0
    assert dispatcher.get_status()["metrics"]["runners_force_stopped"] == 1
    assert dispatcher.retry_manager.get_retry_count("t1") == 0
    # The runner's late report changes nothing.
    assert dispatcher.handle_runner_completion("runner-1", success=True) is False
    assert ports.slots.released == {"slot-1": 1}
    dispatcher._check_invariants()


def test_the_loop_wakes_for_a_due_retry_before_the_next_poll():
    # An hour between polls, but the retry is due after 50 ms.
    dispatcher, ports, launched = started_with_one_runner(
        clock=SystemClock(), poll_interval=3600, retry_initial_delay=0.05
    )
    try:
        dispatcher.handle_runner_completion("runner-1", success=False, failure_reason="exit 1")
        assert launched.wait(10)
        first, second = ports.launcher.launches
        assert second.task_id == "t1" and second.at - first.at >= 0.05
    finally:
        dispatcher.stop(timeout=0)


def test_stop_uses_the_configured_grace_period():
    dispatcher, ports, _ = started_with_one_runner(graceful_shutdown_timeout=0.1)
    dispatcher.stop()
    assert ports.launcher.stopped == ["runner-1"]


def test_an_interrupted_task_is_assigned_again_after_a_restart():
    dispatcher, ports, launched = started_with_one_runner()
    dispatcher.stop(timeout=0)
    assert dispatcher.get_queued_task_ids() == ["t1"]
    assert dispatcher.tick()["assigned"] == 0, "stopped: nothing is assigned"
    dispatcher.start()
    try:
        assert launched.wait(10)
        assert ports.launcher.order() == ["t1", "t1"]
    finally:
        dispatcher.handle_runner_completion("runner-2", success=True)
        dispatcher.stop(timeout=5)


def test_dynamic_priority_change_reorders_the_queue():
    dispatcher, ports = build(
        [make_task("a", priority=1), make_task("b", priority=2), make_task("c", priority=3)],
        global_limit=1,
    )
    dispatcher.runner_launcher = None  # only queue this pass
    dispatcher.tick()
    assert dispatcher.get_queued_task_ids() == ["c", "b", "a"]
    assert dispatcher.update_task_priority("spec-a", "a", 10) is True
    assert dispatcher.get_queued_task_ids() == ["a", "c", "b"]
    assert dispatcher.update_task_priority("spec-a", "missing", 10) is False
    dispatcher.runner_launcher = ports.launcher
    dispatcher.tick()
    assert ports.launcher.order() == ["a"]


def test_set_scheduling_policy_and_priority_switches():
    dispatcher, ports = build(
        [
            make_task("old-low", priority=0, created_at=datetime(2025, 1, 1)),
            make_task("new-high", priority=9, created_at=datetime(2025, 1, 2)),
        ]
    )
    dispatcher.runner_launcher = None
    dispatcher.tick()
    assert dispatcher.get_queued_task_ids() == ["new-high", "old-low"]
    dispatcher.disable_priority_scheduling()
    assert dispatcher.get_status()["scheduling_policy"] == "fifo"
    assert ports.config.scheduling_policy is SchedulingPolicy.FIFO
    assert dispatcher.get_queued_task_ids() == ["old-low", "new-high"]
    dispatcher.enable_priority_scheduling()
    assert dispatcher.get_status()["scheduling_policy"] == "priority"
    assert dispatcher.get_queued_task_ids() == ["new-high", "old-low"]
    dispatcher.set_scheduling_policy(SchedulingPolicy.FAIR_SHARE)
    assert dispatcher.get_status()["scheduling_policy"] == "fair-share"
    dispatcher.set_scheduling_policy("skill-based")
    assert ports.config.scheduling_policy is SchedulingPolicy.SKILL_BASED


def test_disabled_pools_get_nothing_until_enabled():
    dispatcher, _ = build([make_task("t1")], pools=(("only", 2),))
    dispatcher.disable_pool("only")
    assert dispatcher.tick()["assigned"] == 0
    assert dispatcher.get_status()["pool_statuses"][0]["enabled"] is False
    dispatcher.enable_pool("only")
    assert dispatcher.tick()["assigned"] == 1


def test_tasks_without_a_free_slot_wait_in_the_queue():
    slots = Slots(free=1)
    dispatcher, _ = build([make_task(f"t{i}") for i in range(3)], slots=slots)
    result = dispatcher.tick()
    assert result["assigned"] == 1 and result["no_slot"] == 2
    assert dispatcher.get_queued_task_ids() == ["t1", "t2"]
    dispatcher._check_invariants()


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError), ("soon", TypeError)]
)
def test_stop_rejects_a_bad_timeout_and_keeps_running(timeout, error):
    dispatcher, _ = build(poll_interval=0.01)
    dispatcher.start()
    try:
        with pytest.raises(error, match="timeout"):
            dispatcher.stop(timeout=timeout)
        assert dispatcher.running is True
    finally:
        dispatcher.stop(timeout=1)


def test_each_assignment_reports_its_own_spec_and_repo_among_many_names():
    # More names than the dispatcher keeps `str` objects for: the kept ones
    # are replaced, never confused.
    dispatcher, _ = make_dispatcher(pools=(("local", 40),), global_limit=40)
    tasks = [task(f"t{i}", spec=f"spec-{i % 20}") for i in range(40)]
    for i, t in enumerate(tasks):
        t.metadata["repo_name"] = f"repo-{i % 20}"
    dispatcher.task_source.poll_ready_tasks.return_value = tasks
    dispatcher.repo_pool_manager.allocate_slot.side_effect = lambda repo, metadata: SimpleNamespace(
        slot_id=f"slot-{metadata['task_id']}"
    )
    dispatcher.runner_launcher.launch.side_effect = lambda t, slot, pool: SimpleNamespace(
        runner_id=f"runner-{t.id}"
    )

    assert dispatcher.tick()["assigned"] == 40

    started = dispatcher.event_recorder.record_runner_started.call_args_list
    assert sorted((c.kwargs["task_id"], c.kwargs["spec_name"]) for c in started) == sorted(
        (t.id, t.metadata["spec_name"]) for t in tasks
    )
    allocations = dispatcher.repo_pool_manager.allocate_slot.call_args_list
    assert sorted((c.kwargs["metadata"]["task_id"], c.args[0]) for c in allocations) == sorted(
        (t.id, t.metadata["repo_name"]) for t in tasks
    )


class _BrokenId:
    """A polled object whose `id` raises."""

    @property
    def id(self):
        raise RuntimeError("registry row is corrupt")


def test_polled_objects_without_a_usable_id_are_logged_and_skipped(caplog):
    dispatcher, _ = make_dispatcher()
    good = task("good")
    dispatcher.task_source.poll_ready_tasks.return_value = [
        _BrokenId(),
        SimpleNamespace(metadata={}),
        good,
    ]
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id="s-good")
    dispatcher.runner_launcher.launch.return_value = SimpleNamespace(runner_id="r-good")
    with caplog.at_level(logging.ERROR):
        counts = dispatcher.tick()
    assert counts["enqueued"] == 1 and counts["assigned"] == 1
    assert dispatcher.get_task_place("good") == "running"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "registry row is corrupt" in errors[0]
    assert "'id'" in errors[1]


def test_assignment_and_completion_info_records_follow_the_level():
    # The dispatcher makes its per-task INFO records only when the logger's
    # cache does not say INFO is off; any level change brings them back.
    logger = logging.getLogger("necrocode_dispatch.dispatcher_core")
    parent = logging.getLogger("necrocode_dispatch")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    dispatcher, _ = make_dispatcher()
    launched = []

    def launch(t, slot, pool):
        launched.append(f"r{len(launched)}")
        return SimpleNamespace(runner_id=launched[-1])

    dispatcher.runner_launcher.launch.side_effect = launch
    dispatcher.repo_pool_manager.allocate_slot.return_value = SimpleNamespace(slot_id="slot-1")

    def cycles(n):
        seen.clear()
        for _ in range(n):
            t = task(f"t{len(launched)}")
            dispatcher.task_source.poll_ready_tasks.return_value = [t]
            assert dispatcher.tick()["assigned"] == 1
            assert dispatcher.handle_runner_completion(launched[-1], t.id, "spec-a", True)
        assigned = sum(m.startswith("assigned task") for m in seen)
        completed = sum("completed by runner" in m for m in seen)
        return assigned, completed

    try:
        logger.setLevel(logging.INFO)
        assert cycles(3) == (3, 3)
        logger.setLevel(logging.WARNING)
        assert cycles(3) == (0, 0)
        logger.setLevel(logging.NOTSET)
        parent.setLevel(logging.INFO)
        assert cycles(3) == (3, 3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        parent.setLevel(logging.NOTSET)


# Short ids are kept inline in the core, long ones shared (the limit is 15
# UTF-8 bytes); each kind, and each length around the limit, passes whole.
ID_KINDS = ["a", "t" * 14, "t" * 15, "t" * 16, "t" * 40, "é" * 7, "é" * 8, "任务-" + "x" * 9]


def test_ids_of_every_length_pass_whole_through_a_retry_cycle():
    dispatcher, clock = make_dispatcher(pools=(("local", len(ID_KINDS)),), global_limit=20)
    tasks = [task(i) for i in ID_KINDS]
    dispatcher.repo_pool_manager.allocate_slot.side_effect = lambda repo, metadata: SimpleNamespace(
        slot_id=f"slot-{metadata['task_id']}"
    )
    dispatcher.runner_launcher.launch.side_effect = lambda t, slot, pool: SimpleNamespace(
        runner_id=f"runner-{t.id}"
    )
    source = dispatcher.task_source.poll_ready_tasks
    source.return_value = tasks
    assert dispatcher.tick()["assigned"] == len(ID_KINDS)
    source.return_value = []
    for i in ID_KINDS:
        dispatcher.handle_task_failure(i, "spec-a", "exit 1", runner_id=f"runner-{i}")
    assert {r["task_id"] for r in dispatcher.get_status()["delayed"]} == set(ID_KINDS)
    clock.advance(3600)
    source.return_value = tasks
    assert dispatcher.tick()["assigned"] == len(ID_KINDS)
    for i in ID_KINDS:
        dispatcher.handle_runner_completion(f"runner-{i}", i, "spec-a", True)

    states: dict[str, list[str]] = {}
    for c in dispatcher.task_registry.update_task_state.call_args_list:
        states.setdefault(c.kwargs["task_id"], []).append(c.kwargs["new_state"].value)
    assert states == {i: ["running", "ready", "running", "done"] for i in ID_KINDS}
    assert dispatcher.repo_pool_manager.released == {f"slot-{i}": 2 for i in ID_KINDS}
    completed = dispatcher.event_recorder.record_task_completed.call_args_list
    assert sorted(c.kwargs["task_id"] for c in completed) == sorted(ID_KINDS)
    assert all(c.kwargs["runner_id"] == f"runner-{c.kwargs['task_id']}" for c in completed)
    assert dispatcher.get_status()["running_tasks"] == 0
