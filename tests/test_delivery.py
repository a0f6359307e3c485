"""Reports reach the ports in order and at least once (SPEC §9), and stale
reports change nothing (SPEC §4.5 #4): issue 12, findings 2, 3, 7 and 8."""

import queue
import random
import threading
import time
from types import SimpleNamespace

import pytest

from necrocode_dispatch import SystemClock, TaskState

from .fakes import Registry, build, make_task


class FlakyRegistry(Registry):
    """A registry whose `update_task_state` raises, before changing anything,
    while `refuse(task_id, state)` says so."""

    def __init__(self, tasks=(), refuse=None):
        super().__init__(tasks)
        self.refuse = refuse or (lambda task_id, state: False)
        self.refusals = 0

    def update_task_state(self, spec_name, task_id, new_state, metadata):
        if self.refuse(task_id, new_state):
            self.refusals += 1
            raise ConnectionError(f"registry unavailable ({task_id} -> {new_state.value})")
        super().update_task_state(spec_name, task_id, new_state, metadata)


def states(registry, task_id):
    return [s for s, _ in registry.history[task_id]]


def test_a_completion_during_a_slow_running_report_is_delivered_after_it():
    """Finding 2: the runner's own thread reports DONE while the loop thread
    is still inside the registry's RUNNING update; the registry ends DONE."""
    entered_running = threading.Event()
    release_running = threading.Event()

    class SlowRegistry(Registry):
        def update_task_state(self, spec_name, task_id, new_state, metadata):
            if new_state is TaskState.RUNNING:
                entered_running.set()
                assert release_running.wait(5)
            super().update_task_state(spec_name, task_id, new_state, metadata)

    registry = SlowRegistry([make_task("a")])
    dispatcher, ports = build()
    dispatcher.task_source = dispatcher.task_registry = registry
    reported = []

    def finish_at_once(launch):
        def report():
            assert entered_running.wait(5)
            reported.append(
                dispatcher.handle_runner_completion(
                    launch.runner_id, task_id=launch.task_id, success=True
                )
            )
            release_running.set()

        threading.Thread(target=report).start()

    ports.launcher.on_launch = finish_at_once
    dispatcher.tick()
    assert reported == [True]
    assert states(registry, "a") == [TaskState.RUNNING, TaskState.DONE]
    assert registry.states["a"] is TaskState.DONE
    assert dispatcher.get_status()["pending_reports"] == 0


def test_a_report_the_registry_refuses_is_delivered_again_after_a_backoff():
    """Finding 3: a transient error on DONE no longer leaves the task RUNNING."""
    down = [True]
    registry = FlakyRegistry([make_task("a")], refuse=lambda t, s: s is TaskState.DONE and down[0])
    dispatcher, ports = build()
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    assert dispatcher.handle_runner_completion(runner, task_id="a", success=True) is True
    status = dispatcher.get_status()
    assert (status["pending_reports"], status["pending_report_tasks"]) == (1, 1)
    assert status["metrics"]["report_delivery_failures"] == 1
    assert registry.states["a"] is TaskState.RUNNING
    # Not before its backoff (0.05 s on the dispatcher's clock).
    dispatcher.tick()
    assert registry.refusals == 1
    down[0] = False
    ports.clock.advance(0.05)
    dispatcher.tick()
    assert registry.states["a"] is TaskState.DONE
    assert dispatcher.get_status()["pending_reports"] == 0


def test_a_poll_of_a_task_whose_terminal_report_is_pending_is_ignored():
    """Finding 3: a refused DONE must not restart the finished task, even when
    the task source still lists it as ready."""
    registry = FlakyRegistry([make_task("a")], refuse=lambda t, s: s is TaskState.DONE)
    dispatcher, ports = build()
    dispatcher.task_registry = registry
    source = SimpleNamespace(poll_ready_tasks=lambda: [registry.tasks["a"]])
    dispatcher.task_source = source
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    for _ in range(5):
        ports.clock.advance(10)
        counts = dispatcher.tick()
        assert counts["ignored"] == 1 and counts["enqueued"] == 0
    assert len(ports.launcher.launches) == 1
    assert dispatcher.get_task_place("a") is None
    registry.refuse = lambda t, s: False
    ports.clock.advance(10)
    dispatcher.tick()  # delivers DONE; then the source hands "a" back, and it runs anew
    assert states(registry, "a") == [TaskState.RUNNING, TaskState.DONE, TaskState.RUNNING]
    assert len(ports.launcher.launches) == 2


def test_a_refused_retry_report_is_delivered_and_the_task_polled_again():
    """Finding 3: the READY of a retry is delivered again until it lands, so
    the task comes back through the registry."""
    registry = FlakyRegistry(
        [make_task("a")],
        refuse=lambda t, s: s is TaskState.READY and registry.refusals < 2,
    )
    dispatcher, ports = build(retry_initial_delay=1.0)
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=False, failure_reason="x")
    assert registry.states["a"] is TaskState.RUNNING
    ports.clock.advance(0.05)
    dispatcher.tick()
    ports.clock.advance(0.1)
    dispatcher.tick()
    assert registry.refusals == 2
    assert registry.states["a"] is TaskState.READY
    ports.clock.advance(1.0)
    dispatcher.tick()
    assert [launch.task_id for launch in ports.launcher.launches] == ["a", "a"]
    assert states(registry, "a") == [TaskState.RUNNING, TaskState.READY, TaskState.RUNNING]


class FailingRecorder:
    """An event recorder that notes each event's name, and raises for
    `failing` while `fail` is set."""

    def __init__(self, failing):
        self.failing = failing
        self.fail = True
        self.calls = []

    def __getattr__(self, name):
        def record(**kwargs):
            if name == self.failing and self.fail:
                raise OSError("disk full")
            self.calls.append(name)

        return record


def test_events_of_a_task_keep_their_order_behind_a_refused_one():
    """A failed event delivery holds back the task's later reports."""
    recorder = FailingRecorder("record_runner_started")
    dispatcher, ports = build([make_task("a")])
    dispatcher.event_recorder = recorder
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    assert recorder.calls == ["record_task_assigned"]
    assert ports.registry.states["a"] is TaskState.RUNNING
    recorder.fail = False
    ports.clock.advance(1)
    dispatcher.tick()
    assert recorder.calls == [
        "record_task_assigned",
        "record_runner_started",
        "record_runner_finished",
        "record_task_completed",
    ]
    assert ports.registry.states["a"] is TaskState.DONE


def test_stop_tries_pending_reports_once_more_and_keeps_the_rest():
    registry = FlakyRegistry([make_task("a")], refuse=lambda t, s: s is TaskState.DONE)
    dispatcher, ports = build()
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.start()
    deadline = time.monotonic() + 5
    while not ports.launcher.launches and time.monotonic() < deadline:
        time.sleep(0.005)
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    refusals = registry.refusals
    dispatcher.stop(timeout=1)
    assert registry.refusals > refusals
    assert dispatcher.get_status()["pending_reports"] == 1


# -- stale reports (finding 8) ---------------------------------------------------


def test_a_failure_reported_after_done_changes_nothing():
    dispatcher, ports = build([make_task("a")])
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    history = list(ports.registry.history["a"])
    assert dispatcher.handle_task_failure("a", "spec-a", "late") is False
    assert dispatcher.handle_task_failure("a", "spec-a", "late", runner_id=runner) is False
    assert dispatcher.handle_runner_completion(runner, task_id="a", success=False) is False
    assert ports.registry.history["a"] == history
    assert dispatcher.get_task_place("a") is None
    assert dispatcher.retry_manager.get_retry_count("a") == 0
    dispatcher.tick()
    assert len(ports.launcher.launches) == 1


def test_a_failure_reported_after_failed_changes_nothing():
    dispatcher, ports = build([make_task("a")], retry_max_attempts=1)
    ports.launcher.fail_tasks.add("a")
    dispatcher.tick()
    assert ports.registry.states["a"] is TaskState.FAILED
    assert dispatcher.handle_task_failure("a", "spec-a", "late") is False
    assert dispatcher.retry_manager.get_retry_count("a") == 0


def test_a_finished_task_handed_back_by_the_registry_runs_anew():
    dispatcher, ports = build([make_task("a")])
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    ports.registry.states["a"] = TaskState.READY  # e.g. a user re-queued it
    dispatcher.tick()
    assert [launch.task_id for launch in ports.launcher.launches] == ["a", "a"]
    # Now held again: a failure is applied.
    assert dispatcher.handle_task_failure("a", "spec-a", "boom") is True


def test_a_failure_for_a_task_never_seen_is_still_applied():
    dispatcher, ports = build()
    assert dispatcher.handle_task_failure("never-seen", "spec-a", "boom") is True
    assert ports.registry.history["never-seen"][0][0] is TaskState.READY
    assert dispatcher.get_task_place("never-seen") == "delayed"


def test_a_completion_reported_during_launch_without_a_task_id_is_applied():
    dispatcher, ports = build([make_task("a")])
    ports.launcher.on_launch = lambda launch: dispatcher.handle_runner_completion(
        launch.runner_id, success=True
    )
    dispatcher.tick()
    assert ports.registry.states["a"] is TaskState.DONE
    assert states(ports.registry, "a") == [TaskState.RUNNING, TaskState.DONE]
    assert dispatcher.get_global_running_count() == 0


def test_a_completion_for_an_unknown_runner_outside_a_launch_is_ignored():
    dispatcher, _ = build()
    assert dispatcher.handle_runner_completion("ghost", success=True) is False


# -- malformed port results (finding 7) --------------------------------------------


def test_a_slot_without_a_str_id_is_released_at_once():
    dispatcher, ports = build([make_task("a")])
    released = []
    ports.slots.allocate_slot = lambda repo_name, metadata=None: SimpleNamespace(slot_id=42)
    ports.slots.release_slot = lambda slot_id, cleanup=True: released.append(slot_id)
    counts = dispatcher.tick()
    assert counts["no_slot"] == 1
    assert released == [42]
    assert dispatcher.get_global_running_count() == 0
    assert dispatcher.get_task_place("a") == "queued"


def test_a_runner_without_a_str_id_is_stopped_and_the_launch_fails():
    dispatcher, ports = build([make_task("a")])
    stopped = []
    ports.launcher.launch = lambda task, slot, pool: SimpleNamespace(runner_id=7)
    ports.launcher.stop = stopped.append
    counts = dispatcher.tick()
    assert counts["launch_failed"] == 1
    assert stopped == [7]
    assert ports.slots.each_released_once()
    history = ports.registry.history["a"]
    assert history[-1][0] is TaskState.READY
    assert "runner_id" in history[-1][1]["failure_reason"]


# -- fault injection (acceptance 2) --------------------------------------------------


@pytest.mark.parametrize("seed", [1])
def test_500_tasks_through_a_registry_failing_30_percent_of_updates(seed):
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def refuse(task_id, state):
        with rng_lock:
            return rng.random() < 0.3

    tasks = [make_task(f"t{i:03}", spec=f"spec-{i % 3}") for i in range(500)]
    registry = FlakyRegistry(tasks, refuse=refuse)
    dispatcher, ports = build(
        pools=(("local", 8), ("docker", 4)),
        global_limit=12,
        clock=SystemClock(),
        poll_interval=0.01,
        retry_max_attempts=3,
        retry_initial_delay=0.005,
        retry_max_delay=0.02,
        heartbeat_timeout=600,
    )
    dispatcher.task_source = dispatcher.task_registry = registry
    done_runs = []  # task ids whose runner reported success
    in_flight = queue.Queue()
    ports.launcher.on_launch = in_flight.put
    stop = threading.Event()

    def reporter(index):
        r = random.Random(seed * 100 + index)
        while not stop.is_set():
            try:
                launch = in_flight.get(timeout=0.01)
            except queue.Empty:
                continue
            success = r.random() < 0.7
            if success:
                done_runs.append(launch.task_id)
            dispatcher.handle_runner_completion(
                launch.runner_id,
                task_id=launch.task_id,
                success=success,
                failure_reason=None if success else "flaky",
            )

    threads = [threading.Thread(target=reporter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    dispatcher.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            finished = registry.in_state(TaskState.DONE) + registry.in_state(TaskState.FAILED)
            if len(finished) == 500 and dispatcher.get_status()["pending_reports"] == 0:
                break
            time.sleep(0.02)
    finally:
        dispatcher.stop(timeout=5)
        stop.set()
        for t in threads:
            t.join()
    assert registry.refusals > 100
    assert sorted(registry.in_state(TaskState.DONE) + registry.in_state(TaskState.FAILED)) == [
        t.id for t in tasks
    ]
    for task in tasks:
        seen = states(registry, task.id)
        # RUNNING, then READY and RUNNING again per retry, then the end.
        assert seen[-1] in (TaskState.DONE, TaskState.FAILED), (task.id, seen)
        before = seen[:-1]
        assert len(before) % 2 == 1, (task.id, seen)
        assert all(s is TaskState.RUNNING for s in before[0::2]), (task.id, seen)
        assert all(s is TaskState.READY for s in before[1::2]), (task.id, seen)
        assert seen.count(TaskState.DONE) + seen.count(TaskState.FAILED) == 1
    # Nothing reported done ran again.
    assert len(done_runs) == len(set(done_runs)) == len(registry.in_state(TaskState.DONE))
    assert ports.slots.each_released_once()
    dispatcher._check_invariants()
    assert dispatcher.get_global_running_count() == 0


def test_pending_reports_are_in_the_snapshot_and_delivered_first_after_a_restore():
    """SPEC §9: a DONE that never reached the registry survives a restart; the
    task, READY again in a restored registry, is not run a second time."""
    registry = FlakyRegistry([make_task("a")], refuse=lambda t, s: s is TaskState.DONE)
    dispatcher, ports = build()
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    saved = dispatcher.snapshot()
    kinds = [(r["report"], r.get("state")) for r in saved["pending_reports"]]
    # The events and the slot release landed before the registry refused.
    assert kinds == [("state", "done")]
    # A new process: the registry restored the running task as READY.
    restored_registry = Registry([make_task("a")])
    fresh, fresh_ports = build()
    fresh.task_source = fresh.task_registry = restored_registry
    fresh.restore(saved)
    assert fresh.get_status()["pending_reports"] == 1
    fresh.tick()
    assert restored_registry.states["a"] is TaskState.DONE
    assert restored_registry.history["a"][0][1]["runner_id"] == runner
    assert fresh_ports.launcher.launches == []
    assert fresh.get_status()["pending_reports"] == 0


def test_a_restored_running_report_is_dropped_and_the_task_runs_again():
    """A RUNNING whose delivery was pending names a runner of the dead process:
    delivering it after a restart would leave the task RUNNING with nothing
    running it. Its events still land (before the first poll), and the task
    comes back through the source."""
    registry = FlakyRegistry([make_task("a")], refuse=lambda t, s: s is TaskState.RUNNING)
    dispatcher, _ = build()
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.tick()
    saved = dispatcher.snapshot()
    assert [r.get("state") for r in saved["pending_reports"]] == ["running", None, None]
    restored_registry = Registry([make_task("a")])  # READY again after the restart
    fresh, fresh_ports = build()
    fresh.task_source = fresh.task_registry = restored_registry
    fresh.restore(saved)
    fresh.tick()
    assert [launch.task_id for launch in fresh_ports.launcher.launches] == ["a"]
    assert states(restored_registry, "a") == [TaskState.RUNNING]
    assert fresh.get_status()["pending_reports"] == 0


def test_a_completion_refused_midway_resumes_at_the_refused_call():
    """A completion is four port calls (runner finished, task completed, slot
    released, DONE). When one raises, those before it are not made again,
    and the rest wait their turn: counted one per call still to make."""
    recorder = FailingRecorder("record_task_completed")
    dispatcher, ports = build([make_task("a")])
    dispatcher.event_recorder = recorder
    dispatcher.tick()
    runner = ports.launcher.launches[0].runner_id
    recorder.calls.clear()
    assert dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    assert recorder.calls == ["record_runner_finished"]
    assert not ports.slots.released
    status = dispatcher.get_status()
    assert (status["pending_reports"], status["pending_report_tasks"]) == (3, 1)
    saved = [(r["report"], r.get("state")) for r in dispatcher.snapshot()["pending_reports"]]
    assert saved == [("task_completed", None), ("release_slot", None), ("state", "done")]
    recorder.fail = False
    ports.clock.advance(1)
    dispatcher.tick()
    assert recorder.calls == ["record_runner_finished", "record_task_completed"]
    assert ports.slots.each_released_once()
    assert ports.registry.states["a"] is TaskState.DONE
    assert dispatcher.get_status()["pending_reports"] == 0
