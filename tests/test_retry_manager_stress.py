"""Many Python threads on one RetryManager: nothing lost, no error, no deadlock."""

import random
import threading
import time
from collections import Counter

from necrocode_dispatch import ManualClock, RetryManager

THREADS = 8
CALLS_PER_THREAD = 10_000
TASKS = [f"task-{i}" for i in range(50)]


def run_in_threads(worker, timeout: float = 120) -> None:
    """Runs `worker(i)` in THREADS threads at once; fails on a thread still
    running after `timeout` (a deadlock) or on anything a worker raised."""
    errors = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:  # reported below, with the thread that raised it
            errors.append((index, exc))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a worker is stuck: deadlock"
    assert errors == []


def test_concurrent_mixed_calls_lose_no_failure():
    clock = ManualClock()
    manager = RetryManager(max_attempts=5, initial_delay=0.5, clock=clock)
    barrier = threading.Barrier(THREADS)
    recorded = [Counter() for _ in range(THREADS)]

    def worker(index: int) -> None:
        rng = random.Random(index)
        mine = recorded[index]
        barrier.wait()
        for i in range(CALLS_PER_THREAD):
            task = rng.choice(TASKS)
            op = rng.randrange(12)
            if op < 4:
                info = manager.record_failure(task, f"t{index}-{i}")
                mine[task] += 1
                assert info.task_id == task and info.retry_count >= 1
            elif op == 4:
                manager.should_retry(task)
            elif op == 5:
                assert manager.get_retry_count(task) >= 0
            elif op == 6:
                info = manager.get_retry_info(task)
                assert info is None or info.next_retry_at >= info.last_retry_at
            elif op == 7:
                ready = manager.get_tasks_ready_for_retry()
                assert len(ready) == len(set(ready))
            elif op == 8:
                # Scratch tasks are cleared; they never count.
                manager.record_failure(f"scratch-{index}")
                manager.clear_retry_info(f"scratch-{index}")
            elif op == 9:
                clock.advance(0.25)
            elif op == 10:
                manager.max_attempts = rng.choice([3, 5, 8])
            else:
                assert manager._calculate_backoff_delay(rng.randrange(100)) <= 300.0
                len(manager)
                _ = task in manager

    run_in_threads(worker)

    expected = sum(recorded, Counter())
    assert sum(expected.values()) > THREADS * CALLS_PER_THREAD // 4
    for task in TASKS:
        assert manager.get_retry_count(task) == expected[task], task
    tracked = set(manager.get_all_retry_info())
    assert tracked == {t for t in TASKS if expected[t]}
    assert len(manager) == len(tracked)


def test_the_retry_budget_is_never_spent_twice_under_concurrent_failures():
    """8 threads fail distinct tasks at once against one budget: exactly
    capacity / cost retries are granted, every other failure is refused, and
    the level never leaves 0..capacity, whatever the interleaving."""
    capacity, cost = 500, 5
    manager = RetryManager(
        max_attempts=100,
        clock=ManualClock(),
        retry_budget={"capacity": capacity, "retry_cost": cost},
    )
    barrier = threading.Barrier(THREADS)
    seen_levels: list[int] = []
    errors = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for i in range(2_000):
                manager.record_failure(f"w{index}-{i}", "exit 1")
                if i % 97 == 0:
                    seen_levels.append(manager.get_status()["retry_budget"]["tokens"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    budget = manager.get_status()["retry_budget"]
    granted = capacity // cost
    assert budget["tokens"] == 0
    assert budget["refused"] == THREADS * 2_000 - granted
    assert len(manager.get_tasks_ready_for_retry()) == 0  # none due yet
    manager.clock.advance(10)
    assert len(manager.get_tasks_ready_for_retry()) == granted
    assert all(0 <= level <= capacity for level in seen_levels)

    # Successes from many threads refill it to exactly its capacity.
    ready = manager.get_tasks_ready_for_retry()
    chunks = [ready[i::THREADS] for i in range(THREADS)]

    def succeed(ids: list[str]) -> None:
        for task_id in ids:
            manager.record_success(task_id)

    threads = [threading.Thread(target=succeed, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert manager.get_status()["retry_budget"]["tokens"] == capacity


def test_on_the_system_clock_a_retry_is_never_allowed_early():
    """The system clock answers a task far from due from a cheaper, lagging
    reading: many threads failing tasks and asking at once must still never
    see True before the backoff has passed (time.monotonic() is the clock's
    exact reading), and must see it soon after."""
    delay = 0.03
    manager = RetryManager(max_attempts=1_000, initial_delay=delay, backoff_base=1.0)
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        barrier.wait()
        for round_ in range(5):
            task = f"w{index}-{round_}"
            failed_at = time.monotonic()
            manager.record_failure(task, "exit 1")
            while not manager.should_retry(task):
                assert time.monotonic() - failed_at < 5, "still backing off after 5 s"
            allowed_at = time.monotonic()
            assert allowed_at - failed_at >= delay, (task, allowed_at - failed_at)
            # Far from due again: answered from the lagging reading.
            manager.record_failure(task, "exit 1")
            assert not manager.should_retry(task) or time.monotonic() - allowed_at >= delay

    run_in_threads(worker, timeout=60)
