"""The event-driven loop (issue 14, item 1): a finishing runner or a task
source with new tasks brings a pass at once, none is lost under many
reporting threads, and an idle dispatcher does not spin."""

import queue
import resource
import threading
import time

from necrocode_dispatch import (
    AgentPool,
    DispatcherConfig,
    DispatcherCore,
    PoolType,
    SystemClock,
    TaskState,
)
from necrocode_dispatch.local import InMemoryTaskRegistry

from .fakes import build, make_task

LONG_POLL = 30.0  # the loop must not be waiting for this


def wait_for(condition, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def test_a_finished_runner_brings_the_next_task_at_once():
    dispatcher, ports = build(
        [make_task("a"), make_task("b")],
        pools=(("local", 1),),
        clock=SystemClock(),
        poll_interval=LONG_POLL,
        heartbeat_timeout=600,
    )
    dispatcher.start()
    try:
        assert wait_for(lambda: len(ports.launcher.launches) == 1)
        first = ports.launcher.launches[0]
        dispatcher.handle_runner_completion(first.runner_id, task_id=first.task_id, success=True)
        # Far sooner than the 30 s poll: only the wakeup can bring it.
        assert wait_for(lambda: len(ports.launcher.launches) == 2, within=10.0)
    finally:
        dispatcher.stop(timeout=0)


def test_a_source_with_a_waker_brings_its_new_tasks_at_once():
    registry = InMemoryTaskRegistry()
    launched = []
    launcher = type(
        "L",
        (),
        {
            "launch": lambda self, t, s, p: (
                launched.append(t.id) or type("R", (), {"runner_id": t.id})()
            )
        },
    )()
    dispatcher = DispatcherCore(
        DispatcherConfig(
            poll_interval=LONG_POLL,
            agent_pools=[AgentPool(name="local", type=PoolType.LOCAL_PROCESS, max_concurrency=1)],
        ),
        task_source=registry,
        task_registry=registry,
        runner_launcher=launcher,
    )
    dispatcher.start()
    try:
        time.sleep(0.05)  # the first pass found nothing; the loop sleeps
        registry.add(make_task("new"))
        assert wait_for(lambda: launched == ["new"], within=10.0)
    finally:
        dispatcher.stop(timeout=0)


def test_no_wakeup_is_lost_under_eight_reporting_threads():
    """300 tasks through one slot-limited pool with a 30 s poll interval:
    only wakeups can move them, so a lost one would stall the run."""
    tasks = [make_task(f"t{i:03}") for i in range(300)]
    dispatcher, ports = build(
        tasks,
        pools=(("local", 4),),
        global_limit=4,
        clock=SystemClock(),
        poll_interval=LONG_POLL,
        heartbeat_timeout=600,
    )
    in_flight = queue.Queue()
    ports.launcher.on_launch = in_flight.put
    stop = threading.Event()

    def reporter():
        while not stop.is_set():
            try:
                launch = in_flight.get(timeout=0.01)
            except queue.Empty:
                continue
            dispatcher.handle_runner_completion(
                launch.runner_id, task_id=launch.task_id, success=True
            )

    threads = [threading.Thread(target=reporter) for _ in range(8)]
    for t in threads:
        t.start()
    dispatcher.start()
    try:
        assert wait_for(lambda: len(ports.registry.in_state(TaskState.DONE)) == 300, within=30)
    finally:
        dispatcher.stop(timeout=5)
        stop.set()
        for t in threads:
            t.join()
    assert len(ports.launcher.launches) == 300
    dispatcher._check_invariants()


def test_an_idle_running_dispatcher_does_not_spin():
    dispatcher, _ = build(clock=SystemClock(), poll_interval=1.0)
    dispatcher.start()
    try:
        time.sleep(0.2)
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic()
        time.sleep(2.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.monotonic() - wall
    finally:
        dispatcher.stop(timeout=0)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Two passes in 2 s; the whole process (pytest included) stays far
    # under a percent of a core.
    assert cpu / elapsed < 0.01, f"{cpu / elapsed:.2%} of a core while idle"
