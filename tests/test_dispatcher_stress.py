"""8 Python threads report completions, failures and timeouts for the same
runners at once: each runner's outcome is applied exactly once."""

import random
import threading

import pytest

from .dispatcher_helpers import make_dispatcher, run

RUNNERS = 4000
THREADS = 8

# The core keeps ids of up to 15 bytes inline and shares longer ones: both
# kinds are copied and dropped by every thread here.
SHORT = ("t{}", "r{}")
LONG = ("a-task-with-a-long-id-{}", "a-runner-with-a-long-id-{}")


@pytest.mark.parametrize("forms", [SHORT, LONG], ids=["short ids", "long ids"])
def test_concurrent_outcomes_release_every_slot_exactly_once(forms):
    task_form, runner_form = forms

    def task_id(i: int) -> str:
        return task_form.format(i)

    def runner_id(i: int) -> str:
        return runner_form.format(i)

    dispatcher, clock = make_dispatcher(
        max_attempts=3, pools=(("local", RUNNERS), ("docker", RUNNERS)), global_limit=2 * RUNNERS
    )
    for i in range(RUNNERS):
        run(dispatcher, task_id(i), runner_id=runner_id(i), pool="local" if i % 2 else "docker")
    assert dispatcher.get_global_running_count() == RUNNERS
    clock.advance(61)  # every runner is past its heartbeat timeout too

    barrier = threading.Barrier(THREADS + 1)
    applied = [0] * THREADS
    errors = []
    swept = [0]

    def reporter(index: int) -> None:
        rng = random.Random(index)
        order = list(range(RUNNERS))
        rng.shuffle(order)
        try:
            barrier.wait()
            for i in order:
                op = rng.randrange(4)
                if op == 0:
                    ok = dispatcher.handle_runner_completion(runner_id(i), success=True)
                elif op == 1:
                    ok = dispatcher.handle_runner_completion(
                        runner_id(i), success=False, failure_reason="exit 1"
                    )
                elif op == 2:
                    ok = dispatcher.handle_task_failure(
                        task_id(i), "spec-a", "boom", runner_id=runner_id(i)
                    )
                else:
                    ok = dispatcher._handle_runner_timeout(runner_id(i))
                applied[index] += ok
        except BaseException as exc:
            errors.append(exc)

    def watcher() -> None:
        barrier.wait()
        while any(t.is_alive() for t in threads):
            assert dispatcher.get_global_running_count() >= 0
            swept[0] += dispatcher.check_heartbeats()
            dispatcher.get_status()

    threads = [threading.Thread(target=reporter, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    watcher()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []

    released = dispatcher.repo_pool_manager.released
    assert sum(applied) + swept[0] == RUNNERS  # each runner's outcome applied once
    assert set(released) == {f"slot-{task_id(i)}" for i in range(RUNNERS)}
    assert set(released.values()) == {1}
    status = dispatcher.get_status()
    assert status["global_running_count"] == status["running_tasks"] == 0
    assert all(p["current_running"] == 0 for p in status["pool_statuses"])
    dispatcher._check_invariants()
    places = [dispatcher.get_task_place(task_id(i)) for i in range(RUNNERS)]
    assert set(places) <= {None, "delayed"}
    assert len(status["delayed"]) == places.count("delayed")
