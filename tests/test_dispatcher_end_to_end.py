"""200 tasks through working fake ports on a ManualClock: runners fail at
random (seeded) and are completed by the test. Every task must end DONE or
FAILED, no retry may start before its backoff has elapsed, and every slot
must be released exactly once."""

import random
from collections import defaultdict

from necrocode_dispatch import SchedulingPolicy, TaskState

from .fakes import build, make_task

TASKS = 200
MAX_ATTEMPTS = 3


def backoff(retry_count: int) -> float:
    return min(1.0 * 2.0 ** (retry_count - 1), 300.0)


def run_to_the_end(policy, seed):
    rng = random.Random(seed)
    tasks = [
        make_task(f"t{i:03}", spec=f"spec-{i % 5}", priority=rng.randrange(3)) for i in range(TASKS)
    ]
    dispatcher, ports = build(
        tasks,
        pools=(("local", 6), ("docker", 3)),
        global_limit=8,
        retry_max_attempts=MAX_ATTEMPTS,
        policy=policy,
    )
    clock = ports.clock
    running = []
    ports.launcher.on_launch = running.append
    failures = defaultdict(list)  # task id -> monotonic times of its failures

    finished = 0
    for _ in range(20_000):
        dispatcher.tick()
        rng.shuffle(running)
        reported = running[: rng.randint(0, len(running))]
        for launch in reported:
            running.remove(launch)
            roll = rng.random()
            if roll < 0.6:
                assert dispatcher.handle_runner_completion(launch.runner_id, success=True)
                continue
            if roll < 0.8:
                assert dispatcher.handle_runner_completion(
                    launch.runner_id, success=False, failure_reason="exit 1"
                )
            else:
                assert dispatcher.handle_task_failure(
                    launch.task_id, "ignored", "crashed", runner_id=launch.runner_id
                )
            failures[launch.task_id].append(clock.monotonic())
        finished = len(ports.registry.in_state(TaskState.DONE)) + len(
            ports.registry.in_state(TaskState.FAILED)
        )
        if finished == TASKS:
            break
        clock.advance(rng.choice([0.1, 0.25, 0.5, 1.0, 3.0]))
    return dispatcher, ports, failures, finished


def check_run(dispatcher, ports, failures, finished):
    assert finished == TASKS
    launches = defaultdict(list)
    for launch in ports.launcher.launches:
        launches[launch.task_id].append(launch.at)

    retried = 0
    for task_id, state in ports.registry.states.items():
        fails = failures[task_id]
        if state is TaskState.FAILED:
            assert len(fails) == MAX_ATTEMPTS
            assert ports.registry.history[task_id][-1][1]["retries"] == MAX_ATTEMPTS
        else:
            assert state is TaskState.DONE
            assert len(fails) < MAX_ATTEMPTS
        # Attempt k+1 starts no earlier than failure k plus its backoff.
        starts = launches[task_id]
        assert len(starts) == len(fails) + (state is TaskState.DONE)
        for k, failed_at in enumerate(fails[: len(starts) - 1], start=1):
            assert starts[k] >= failed_at + backoff(k) - 1e-9, (task_id, k)
            retried += 1
    assert retried > 50, "the seed should make many tasks retry"
    assert ports.registry.in_state(TaskState.FAILED), "and some fail for good"

    assert ports.slots.each_released_once()
    assert len(ports.slots.allocated) == len(ports.launcher.launches)
    status = dispatcher.get_status()
    assert status["global_running_count"] == 0
    assert status["queue_size"] == 0 and status["delayed"] == []
    assert status["retry_info"] == {}
    assert all(p["current_running"] == 0 for p in status["pool_statuses"])
    dispatcher._check_invariants()


def test_200_tasks_priority():
    check_run(*run_to_the_end(SchedulingPolicy.PRIORITY, seed=7))


def test_200_tasks_fair_share():
    check_run(*run_to_the_end(SchedulingPolicy.FAIR_SHARE, seed=11))
