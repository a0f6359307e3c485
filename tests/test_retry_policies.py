"""Retry policies beyond the original (issue 7): jitter, failure classes,
max retry duration and the retry budget, on the RetryManager and through
the dispatcher. Every test runs on a ManualClock."""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from necrocode_dispatch import ManualClock, RetryManager, TaskState

from .fakes import build, make_task

START = datetime(2026, 1, 1, 9, 0, 0)


def manager(**options) -> RetryManager:
    return RetryManager(clock=ManualClock(START), **options)


def waited(info) -> float:
    """The delay a RetryInfo reports: next_retry_at - last_retry_at."""
    return (info.next_retry_at - info.last_retry_at).total_seconds()


def ks_statistic(samples: list[float], low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the samples and uniform(low, high)."""
    xs = sorted(samples)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        cdf = min(1.0, max(0.0, (x - low) / (high - low)))
        d = max(d, abs(cdf - i / n), abs((i + 1) / n - cdf))
    return d


# ---- jitter -----------------------------------------------------------------------


def test_the_default_keeps_the_original_exact_delays():
    m = manager(initial_delay=2.0)
    assert m.jitter == "none" and m.seed is None
    assert [waited(m.record_failure("t")) for _ in range(3)] == [2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    ("jitter", "low", "high"),
    [("full", 0.0, 8.0), ("equal", 4.0, 8.0)],
)
def test_full_and_equal_jitter_are_uniform_over_their_range(jitter, low, high):
    # The fourth failure's backoff is 1 * 2**3 = 8 s.
    m = manager(max_attempts=10, jitter=jitter, seed=2026)
    delays = []
    for i in range(2000):
        for _ in range(3):
            m.record_failure(f"t{i}")
        delays.append(waited(m.record_failure(f"t{i}")))
    assert all(low <= d <= high for d in delays)
    # 1.36 / sqrt(n): the 5 % critical value; the seed makes this exact.
    assert ks_statistic(delays, low, high) < 1.36 / math.sqrt(len(delays))
    # Not a constant in disguise: both halves of the range are used.
    middle = (low + high) / 2
    assert sum(d < middle for d in delays) > 800 and sum(d > middle for d in delays) > 800


def test_decorrelated_jitter_grows_from_the_previous_wait_and_stays_capped():
    m = manager(max_attempts=100, initial_delay=1.0, max_delay=20.0, jitter="decorrelated", seed=5)
    previous = 1.0
    delays = []
    for _ in range(60):
        d = waited(m.record_failure("t"))
        assert 1.0 <= d <= min(20.0, previous * 3) + 1e-6
        delays.append(d)
        previous = d
    assert max(delays) > 10  # it does grow towards the cap


def test_a_seed_reproduces_the_delays_and_another_seed_does_not():
    def delays(**options):
        m = manager(max_attempts=10, jitter="full", **options)
        return [waited(m.record_failure(f"t{i}")) for i in range(50)]

    assert delays(seed=7) == delays(seed=7)
    assert delays(seed=7) != delays(seed=8)
    assert delays() != delays()  # unseeded: from the OS's randomness


def test_should_retry_waits_for_the_jittered_delay():
    clock = ManualClock(START)
    m = RetryManager(clock=clock, jitter="full", seed=1, initial_delay=10.0)
    d = waited(m.record_failure("t"))
    assert 0 < d < 10
    clock.advance(d - 0.001)
    assert not m.should_retry("t") and m.get_tasks_ready_for_retry() == []
    clock.advance(0.001)
    assert m.should_retry("t") and m.get_tasks_ready_for_retry() == ["t"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"jitter": "fast"},
            "jitter must be one of 'none', 'full', 'equal', 'decorrelated', got 'fast'",
        ),
        ({"jitter": 1}, "jitter must be a str, got int 1"),
        ({"seed": 2**70}, "seed must be an int that fits in 64 bits"),
        ({"max_retry_duration": 0}, "max_retry_duration must be a finite number of seconds > 0"),
        ({"policies": {"x": {"backoff_base": 0}}}, "policies['x']: backoff_base must be"),
        ({"policies": {"x": {"retries": 1}}}, "policies['x']: unknown setting 'retries'"),
        ({"policies": {"x": 3}}, "policies['x'] must be a dict of settings, got int 3"),
        ({"retry_budget": -1}, "retry_budget must be an int capacity >= 0, a dict or None"),
        ({"retry_budget": {"retry_cost": 0}}, "retry_budget: retry_cost must be an int >= 1"),
        ({"retry_budget": {"tokens": 3}}, "retry_budget: unknown setting 'tokens'"),
        ({"non_retryable": [1]}, "non_retryable item must be a str, got int 1"),
    ],
)
def test_bad_options_are_named_with_their_value(options, message):
    with pytest.raises((ValueError, TypeError)) as err:
        manager(**options)
    assert message in str(err.value)


# ---- failure classes ----------------------------------------------------------------


def test_non_retryable_reasons_fail_at_once_by_name_or_class():
    m = manager(non_retryable=["auth", "exit code 2"])
    assert m.non_retryable == ("auth", "exit code 2")
    for task, reason in (("a", "auth"), ("b", "auth: token expired"), ("c", "exit code 2: denied")):
        info = m.record_failure(task, reason)
        assert info.retry_count == 1
        assert not m.should_retry(task)
    # Only the name or "name: ..." matches.
    m.record_failure("d", "authority unreachable")
    m.record_failure("e", "exit code 23")
    m.clock.advance(10)
    assert m.get_tasks_ready_for_retry() == ["d", "e"]
    assert m.should_retry("d")


def test_a_reason_policy_overrides_the_limit_and_the_delays():
    m = manager(max_attempts=2, policies={"timeout": {"max_attempts": 4, "initial_delay": 30}})
    assert m.policies == {"timeout": {"max_attempts": 4, "initial_delay": 30.0}}
    delays = [waited(m.record_failure("slow", "timeout: after 600 s")) for _ in range(3)]
    assert delays == [30.0, 60.0, 120.0]  # the manager's base of 2 still applies
    m.clock.advance(120)
    assert m.should_retry("slow")
    m.record_failure("slow", "timeout")
    assert not m.should_retry("slow")  # the fourth failure reaches the policy's limit
    # Other reasons keep the manager's settings.
    assert [waited(m.record_failure("t", "exit 1")) for _ in range(2)] == [1.0, 2.0]
    assert not m.should_retry("t")


def test_a_policy_follows_later_changes_of_the_settings_it_leaves_out():
    m = manager(policies={"timeout": {"initial_delay": 5}})
    m.backoff_base = 3.0
    assert [waited(m.record_failure("t", "timeout")) for _ in range(2)] == [5.0, 15.0]


def test_retries_stop_once_the_first_failure_is_older_than_max_retry_duration():
    m = manager(max_attempts=100, initial_delay=10, backoff_base=1, max_retry_duration=60)
    assert m.max_retry_duration == 60.0
    for _ in range(6):  # failures at 0, 10, ..., 50 s
        m.record_failure("t", "exit 1")
        assert m.should_retry("t") is False  # backing off
        m.clock.advance(10)
        assert m.should_retry("t")
    m.record_failure("t", "exit 1")  # at 60 s: the first failure is 60 s old
    m.clock.advance(1000)
    assert not m.should_retry("t")
    assert m.get_tasks_ready_for_retry() == []
    assert m.get_retry_count("t") == 7


# ---- the retry budget ---------------------------------------------------------------


def test_the_budget_trips_under_a_burst_refuses_retries_and_recovers():
    m = manager(max_attempts=5, retry_budget={"capacity": 20, "retry_cost": 5})
    assert m.get_status()["retry_budget"] == {
        "capacity": 20,
        "retry_cost": 5,
        "success_refill": 1,
        "tokens": 20,
        "exhausted": False,
        "refused": 0,
    }
    for i in range(6):  # a burst: six tasks fail at once
        m.record_failure(f"t{i}", "exit 1")
    budget = m.get_status()["retry_budget"]
    assert (budget["tokens"], budget["exhausted"], budget["refused"]) == (0, True, 2)
    m.clock.advance(10)
    assert m.get_tasks_ready_for_retry() == ["t0", "t1", "t2", "t3"]
    assert not m.should_retry("t4") and not m.should_retry("t5")
    # While empty, every further failure is final.
    m.record_failure("t0", "exit 1")
    assert not m.should_retry("t0")
    # Successes refill it: a retried task gives its retry back.
    m.record_success("t1")
    assert m.get_retry_info("t1") is None
    assert m.get_status()["retry_budget"]["tokens"] == 5
    m.record_failure("t6", "exit 1")
    m.clock.advance(10)
    assert m.should_retry("t6")
    # First-try successes refill one token each.
    for i in range(5):
        m.record_success(f"fresh{i}")
    assert m.get_status()["retry_budget"]["tokens"] == 5


def test_an_int_budget_is_its_capacity_with_the_aws_costs():
    assert manager(retry_budget=500).retry_budget["retry_cost"] == 5
    assert manager().retry_budget is None
    assert manager().get_status() == {"tracked": 0, "retry_budget": None}


# ---- through the dispatcher ------------------------------------------------------------


def run_and_fail(dispatcher, ports, task_id, reason):
    """Assigns `task_id` (queued) and reports its failure."""
    dispatcher.tick()
    launch = next(x for x in reversed(ports.launcher.launches) if x.task_id == task_id)
    return dispatcher.handle_runner_completion(
        launch.runner_id, task_id, "spec-a", False, failure_reason=reason
    )


def test_the_dispatcher_reads_the_options_from_its_config():
    tasks = [make_task(f"t{i}") for i in range(4)]
    dispatcher, ports = build(
        tasks,
        retry_non_retryable=["auth"],
        retry_budget={"capacity": 5, "retry_cost": 5},
        retry_jitter="equal",
        retry_seed=3,
    )
    m = dispatcher.retry_manager
    assert (m.jitter, m.seed, m.non_retryable) == ("equal", 3, ("auth",))
    run_and_fail(dispatcher, ports, "t0", "auth: bad token")
    run_and_fail(dispatcher, ports, "t1", "exit 1")  # takes the only retry
    run_and_fail(dispatcher, ports, "t2", "exit 1")  # the budget is empty
    failed = dict(
        (task, meta["reason"])
        for task in ("t0", "t2")
        for state, meta in ports.registry.history[task]
        if state is TaskState.FAILED
    )
    assert failed == {
        "t0": "auth: bad token (not retried: non-retryable failure)",
        "t2": "exit 1 (not retried: retry budget exhausted)",
    }
    assert ports.registry.states["t1"] is TaskState.READY
    status = dispatcher.get_status()
    assert status["retry_budget"]["refused"] == 1
    assert status["retries_by_reason"] == {"exit 1": 1}
    assert status["permanent_failures_by_reason"] == {"auth": 1, "exit 1": 1}
    # Completing t1 after its retry refills the budget.
    ports.clock.advance(10)
    dispatcher.tick()
    launch = ports.launcher.launches[-1]
    assert launch.task_id == "t1"
    dispatcher.handle_runner_completion(launch.runner_id, "t1", "spec-a", True)
    assert dispatcher.get_status()["retry_budget"]["tokens"] == 5


def test_assigning_a_config_changes_the_options():
    dispatcher, ports = build([make_task("t")])
    assert dispatcher.retry_manager.non_retryable == ()
    ports.config.retry_non_retryable = ["oom"]
    dispatcher.config = ports.config
    assert dispatcher.retry_manager.non_retryable == ("oom",)
    run_and_fail(dispatcher, ports, "t", "oom")
    assert ports.registry.states["t"] is TaskState.FAILED
    ports.config.retry_jitter = "sometimes"
    with pytest.raises(ValueError, match=r"config\.retry_jitter must be one of"):
        dispatcher.config = ports.config
    assert dispatcher.retry_manager.non_retryable == ("oom",)
