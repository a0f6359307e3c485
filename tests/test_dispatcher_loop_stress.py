"""The dispatcher under load: the background loop (or several threads calling
`tick()` at once) assigns while 8 Python threads report completions and
failures, some twice. Every invariant of SPEC §4.5 must hold; `stop()`, called
with runners in flight, must return within a second of the last one finishing."""

import queue
import random
import threading
import time

from necrocode_dispatch import SystemClock, TaskState

from .fakes import build, make_task

THREADS = 8
TASKS = 400
POOLS = (("local", 6), ("docker", 3))
GLOBAL_LIMIT = 8


def test_stop_returns_promptly_after_the_last_runner_under_concurrent_reports():
    dispatcher, ports = build(
        [make_task(f"t{i:03}", spec=f"spec-{i % 4}", priority=i % 3) for i in range(TASKS)],
        pools=POOLS,
        global_limit=GLOBAL_LIMIT,
        clock=SystemClock(),
        poll_interval=0.005,
        retry_max_attempts=3,
        retry_initial_delay=0.005,
        retry_max_delay=0.02,
        heartbeat_timeout=600,
    )
    in_flight = queue.Queue()
    seen = []  # (pool, its running count, global running) as each launch saw them

    def on_launch(launch):
        seen.append((launch.pool, launch.pool_running, dispatcher.get_global_running_count()))
        in_flight.put(launch)

    ports.launcher.on_launch = on_launch
    stop_reporting = threading.Event()
    last_report = [0.0]
    applied = [0] * THREADS
    errors = []

    def reporter(index):
        rng = random.Random(index)
        try:
            while not (stop_reporting.is_set() and in_flight.empty()):
                try:
                    launch = in_flight.get(timeout=0.01)
                except queue.Empty:
                    continue
                time.sleep(rng.uniform(0.001, 0.02))  # the runner works
                dispatcher.update_heartbeat(launch.runner_id)
                roll = rng.random()
                for _ in range(2 if roll < 0.2 else 1):  # some report twice
                    if roll < 0.6:
                        ok = dispatcher.handle_runner_completion(
                            launch.runner_id, task_id=launch.task_id, success=True
                        )
                    elif roll < 0.8:
                        ok = dispatcher.handle_runner_completion(
                            launch.runner_id,
                            task_id=launch.task_id,
                            success=False,
                            failure_reason="exit 1",
                        )
                    else:
                        ok = dispatcher.handle_task_failure(
                            launch.task_id, "spec", "crashed", runner_id=launch.runner_id
                        )
                    applied[index] += ok
                last_report[0] = max(last_report[0], time.monotonic())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reporter, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    dispatcher.start()
    deadline = time.monotonic() + 60
    while len(ports.launcher.launches) < TASKS // 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert dispatcher.get_global_running_count() > 0, "runners are in flight at stop()"

    dispatcher.stop(timeout=30)
    stopped_at = time.monotonic()
    stop_reporting.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a reporter thread hangs"

    assert errors == []
    assert stopped_at - last_report[0] < 1.0
    assert ports.launcher.stopped == [], "every runner finished within the grace period"
    # Each launch's outcome was applied exactly once despite the duplicates.
    assert sum(applied) == len(ports.launcher.launches)
    assert ports.slots.each_released_once()
    limits = dict(POOLS)
    assert all(0 < running <= limits[pool] for pool, running, _ in seen)
    assert all(0 < running <= GLOBAL_LIMIT for _, _, running in seen)
    assert dispatcher.get_global_running_count() == 0
    status = dispatcher.get_status()
    assert all(p["current_running"] == 0 for p in status["pool_statuses"])
    assert status["running"] is False
    dispatcher._check_invariants()
    # Nothing was assigned after stop(): the launch count no longer moves.
    launched = len(ports.launcher.launches)
    time.sleep(0.05)
    assert len(ports.launcher.launches) == launched
    assert ports.registry.in_state(TaskState.RUNNING) == []


def test_concurrent_ticks_never_overbook_a_pool():
    dispatcher, ports = build(
        [make_task(f"t{i:03}", spec=f"spec-{i % 4}") for i in range(TASKS)],
        pools=POOLS,
        global_limit=GLOBAL_LIMIT,
        clock=SystemClock(),
        retry_max_attempts=2,
        retry_initial_delay=0.001,
        retry_max_delay=0.001,
    )
    limits = dict(POOLS)
    seen = []
    lock = threading.Lock()
    running = []

    def on_launch(launch):
        seen.append((launch.pool, launch.pool_running, dispatcher.get_global_running_count()))
        with lock:
            running.append(launch)

    ports.launcher.on_launch = on_launch
    errors = []

    def worker(index):
        rng = random.Random(index)
        try:
            for _ in range(400):
                if index % 2:
                    dispatcher.tick()
                    continue
                with lock:
                    launch = running.pop(rng.randrange(len(running))) if running else None
                if launch is None:
                    time.sleep(0.0005)
                elif rng.random() < 0.7:
                    # A report can come before launch() has returned; with the
                    # task id it is kept until the runner is tracked.
                    dispatcher.handle_runner_completion(
                        launch.runner_id, task_id=launch.task_id, success=True
                    )
                else:
                    dispatcher.handle_task_failure(launch.task_id, runner_id=launch.runner_id)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert errors == []
    assert len(seen) > GLOBAL_LIMIT
    assert all(0 < n <= limits[pool] for pool, n, _ in seen)
    assert all(0 < n <= GLOBAL_LIMIT for _, _, n in seen)
    for launch in running:
        dispatcher.handle_runner_completion(launch.runner_id, success=True)
    assert dispatcher.get_global_running_count() == 0
    assert ports.slots.each_released_once()
    dispatcher._check_invariants()
