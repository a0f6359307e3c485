"""The embedded local ports on their own, and wired to a DispatcherCore in
this process."""

import os
import threading
import time
from datetime import datetime

import pytest

from necrocode_dispatch import (
    AgentPool,
    DispatcherConfig,
    DispatcherCore,
    PoolType,
    Task,
    TaskState,
)
from necrocode_dispatch.local import (
    InMemoryTaskRegistry,
    JsonlEventRecorder,
    LocalSlotPool,
    SubprocessLauncher,
    _ExitGate,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")


def test_slot_pool_hands_out_numbered_slots_and_cleans_them(tmp_path):
    pool = LocalSlotPool(tmp_path, slots_per_repo=2)
    first = pool.allocate_slot("org/repo", metadata={"task_id": "t1"})
    second = pool.allocate_slot("org/repo")
    assert (first.slot_id, second.slot_id) == ("org%2Frepo-1", "org%2Frepo-2")
    assert first.path.is_dir() and first.path != second.path
    assert pool.allocate_slot("org/repo") is None
    assert pool.allocate_slot("other").slot_id == "other-1"
    (first.path / "build").mkdir()
    (first.path / "build" / "out.txt").write_text("x")
    (first.path / "file").write_text("y")
    pool.release_slot(first.slot_id)
    assert list(first.path.iterdir()) == []
    assert pool.allocate_slot("org/repo").slot_id == "org%2Frepo-1"
    assert pool.released == {"org%2Frepo-1": 1}


def test_registry_counts_finished_tasks_through_every_change():
    registry = InMemoryTaskRegistry([Task(id="a"), Task(id="b"), Task(id="c")])
    registry.add(Task(id="d", dependencies=["c"]))

    def by_scan():
        return all(registry.get_state(t) in (TaskState.DONE, TaskState.FAILED) for t in "abcd")

    steps = [
        ("a", TaskState.RUNNING),
        ("a", TaskState.DONE),
        ("a", TaskState.DONE),  # delivered twice: counted once
        ("b", TaskState.FAILED),
        ("b", TaskState.READY),  # retried after all
        ("b", TaskState.DONE),
        ("c", TaskState.FAILED),  # d is skipped: FAILED too
    ]
    for task_id, state in steps:
        registry.update_task_state("s", task_id, state, {})
        assert registry.all_finished() == by_scan(), (task_id, state)
    assert registry.all_finished()
    saved = registry.snapshot()
    fresh = InMemoryTaskRegistry([Task(id=t) for t in "abc"] + [Task(id="d", dependencies=["c"])])
    assert not fresh.all_finished()
    fresh.restore(saved)
    assert fresh.all_finished()
    saved["a"]["state"] = "running"  # running when saved: READY again
    again = InMemoryTaskRegistry([Task(id=t) for t in "abc"] + [Task(id="d", dependencies=["c"])])
    again.restore(saved)
    assert not again.all_finished()


def test_registry_wakes_a_waiter_when_the_last_task_finishes():
    registry = InMemoryTaskRegistry([Task(id="a"), Task(id="b", dependencies=["a"])])
    assert registry.wait_finished(0) is False
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(registry.wait_finished(30)))
    waiter.start()
    registry.update_task_state("s", "a", TaskState.DONE, {})
    assert woke == []  # b is READY now, not finished
    registry.update_task_state("s", "b", TaskState.FAILED, {})
    waiter.join(30)
    assert woke == [True]
    assert registry.wait_finished(0) is True


def test_registry_keeps_the_history_and_polls_ready_tasks():
    changes = []
    registry = InMemoryTaskRegistry(
        [Task(id="a"), Task(id="b")], listener=lambda *change: changes.append(change)
    )
    registry.update_task_state("s", "a", TaskState.RUNNING, {"runner_id": "r1"})
    assert [t.id for t in registry.poll_ready_tasks()] == ["b"]
    registry.update_task_state(spec_name="s", task_id="a", new_state="done", metadata={})
    assert [c.state for c in registry.get_history("a")] == [TaskState.RUNNING, TaskState.DONE]
    assert changes[0] == ("a", TaskState.RUNNING, {"runner_id": "r1"})
    assert not registry.all_finished()
    with pytest.raises(KeyError, match="'zzz'"):
        registry.update_task_state("s", "zzz", TaskState.DONE, {})
    with pytest.raises(ValueError, match="'a'"):
        registry.add(Task(id="a"))


def test_event_recorder_writes_json_lines(tmp_path):
    recorder = JsonlEventRecorder(tmp_path / "events.jsonl")
    recorder.record_task_assigned(
        spec_name="s",
        task_id="t",
        runner_id="r",
        slot_id=None,
        pool_name="p",
        timestamp=datetime(2025, 1, 2, 3, 4, 5),
    )
    recorder.record_task_failed("s", "t", "r", "boom", 3)
    recorder.close()
    first, second = JsonlEventRecorder.read(tmp_path / "events.jsonl")
    assert first["event"] == "task_assigned" and first["timestamp"] == "2025-01-02T03:04:05"
    assert second == {**second, "event": "task_failed", "failure_reason": "boom", "retry_count": 3}
    assert second["elapsed"] >= first["elapsed"] >= 0


def test_launcher_needs_a_dispatcher(tmp_path):
    launcher = SubprocessLauncher(tmp_path)
    with pytest.raises(RuntimeError, match="dispatcher"):
        launcher.launch(Task(id="t", metadata={"command": "true"}), None, None)


def test_commands_run_through_the_dispatcher_in_process(tmp_path):
    config = DispatcherConfig(
        poll_interval=0.01,
        retry_initial_delay=0.01,
        agent_pools=[AgentPool(name="local", type=PoolType.LOCAL_PROCESS, max_concurrency=2)],
    )
    tasks = [
        Task(id="ok", metadata={"command": 'echo "$NECROCODE_TASK_ID" > out.txt'}),
        Task(id="flaky", metadata={"command": '[ "$NECROCODE_ATTEMPT" = 2 ]'}),
    ]
    registry = InMemoryTaskRegistry(tasks)
    launcher = SubprocessLauncher(tmp_path / "logs", heartbeat_interval=0.05)
    slots = LocalSlotPool(tmp_path / "slots", slots_per_repo=2)
    dispatcher = DispatcherCore(
        config,
        task_source=registry,
        task_registry=registry,
        repo_pool_manager=slots,
        runner_launcher=launcher,
    )
    launcher.dispatcher = dispatcher
    dispatcher.start()
    try:
        deadline = time.monotonic() + 20
        while not registry.all_finished() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        dispatcher.stop(timeout=5)
        launcher.close()
    assert registry.get_state("ok") is TaskState.DONE
    assert registry.get_state("flaky") is TaskState.DONE
    flaky = [c.state for c in registry.get_history("flaky")]
    assert flaky == [TaskState.RUNNING, TaskState.READY, TaskState.RUNNING, TaskState.DONE]
    assert slots.busy() == []
    assert sum(slots.released.values()) == 3
    dispatcher._check_invariants()


def test_an_incremental_registry_polls_only_what_became_ready_since():
    registry = InMemoryTaskRegistry([Task(id="a"), Task(id="b")], incremental=True)
    assert [t.id for t in registry.poll_ready_tasks()] == ["a", "b"]
    assert registry.poll_ready_tasks() == []
    registry.update_task_state("spec", "a", TaskState.RUNNING, {})
    registry.update_task_state("spec", "a", TaskState.READY, {"retry_count": 1})
    registry.add(Task(id="c"))
    assert [t.id for t in registry.poll_ready_tasks()] == ["a", "c"]
    assert sorted(t.id for t in InMemoryTaskRegistry([Task(id="x")]).poll_ready_tasks()) == ["x"]


def test_the_exit_gate_waits_for_the_call_inside_then_lets_none_in():
    """What the launchers' threads call the dispatcher through: shut at
    interpreter exit, it waits for a call in progress and refuses the next."""
    gate = _ExitGate()
    inside, release, calls = threading.Event(), threading.Event(), []

    def report(name):
        calls.append(name)
        inside.set()
        release.wait()

    caller = threading.Thread(target=gate.call, args=(report, "first"))
    caller.start()
    assert inside.wait(10)
    shutting = threading.Thread(target=gate.shut, args=(10,))
    shutting.start()
    shutting.join(0.05)
    assert shutting.is_alive()  # still waiting for "first"
    release.set()
    shutting.join(10)
    caller.join(10)
    assert not shutting.is_alive()
    assert gate.call(report, "second") is False
    assert calls == ["first"]
