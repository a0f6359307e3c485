"""The original RetryManager test scenarios, on a ManualClock (none sleeps)."""

from datetime import timedelta

import pytest

from necrocode_dispatch import ManualClock, RetryInfo, RetryManager
from necrocode_dispatch.retry_manager import RetryInfo as CompatRetryInfo
from necrocode_dispatch.retry_manager import RetryManager as CompatRetryManager

from .conftest import START


def test_compat_module_reexports_the_rust_types():
    assert CompatRetryManager is RetryManager
    assert CompatRetryInfo is RetryInfo
    assert RetryManager.__module__ == "necrocode_dispatch._core"


def test_initialization():
    manager = RetryManager(max_attempts=5, backoff_base=3.0, initial_delay=2.0, max_delay=60.0)
    assert manager.max_attempts == 5
    assert manager.backoff_base == 3.0
    assert manager.initial_delay == 2.0
    assert manager.max_delay == 60.0
    assert len(manager) == 0


def test_initialization_defaults():
    manager = RetryManager()
    assert (manager.max_attempts, manager.backoff_base) == (3, 2.0)
    assert (manager.initial_delay, manager.max_delay) == (1.0, 300.0)


def test_positional_arguments():
    manager = RetryManager(4, 1.5, 0.5, 10.0)
    assert (manager.max_attempts, manager.backoff_base) == (4, 1.5)
    assert (manager.initial_delay, manager.max_delay) == (0.5, 10.0)


def test_retry_count_of_a_new_task_is_zero(manager):
    assert manager.get_retry_count("task-1") == 0
    assert manager.get_retry_info("task-1") is None
    assert "task-1" not in manager


def test_record_failure_increments_count(manager):
    manager.record_failure("task-1", "boom")
    assert manager.get_retry_count("task-1") == 1
    manager.record_failure("task-1", "boom")
    assert manager.get_retry_count("task-1") == 2
    assert "task-1" in manager
    assert manager.get_retry_count("task-2") == 0


def test_should_retry_below_limit_after_backoff(manager, clock):
    manager.record_failure("task-1", "boom")
    clock.advance(1.0)
    assert manager.should_retry("task-1") is True


def test_should_retry_for_an_unknown_task(manager):
    assert manager.should_retry("never-failed") is True


def test_should_not_retry_at_limit(manager, clock):
    for _ in range(3):
        manager.record_failure("task-1", "boom")
    clock.advance(10_000)
    assert manager.get_retry_count("task-1") == 3
    assert manager.should_retry("task-1") is False


def test_should_not_retry_during_backoff(manager, clock):
    manager.record_failure("task-1", "boom")  # delay 1 s
    assert manager.should_retry("task-1") is False
    clock.advance(0.999999)
    assert manager.should_retry("task-1") is False
    clock.advance(0.000001)
    assert manager.should_retry("task-1") is True
    manager.record_failure("task-1", "boom")  # delay 2 s
    clock.advance(1.5)
    assert manager.should_retry("task-1") is False
    clock.advance(0.5)
    assert manager.should_retry("task-1") is True


def test_backoff_delays_for_counts_zero_to_five_with_base_two(manager):
    delays = [manager._calculate_backoff_delay(n) for n in range(6)]
    assert delays == [1.0, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_backoff_is_capped_at_max_delay():
    manager = RetryManager(max_attempts=20, backoff_base=2.0, initial_delay=1.0, max_delay=10.0)
    assert manager._calculate_backoff_delay(4) == 8.0
    assert manager._calculate_backoff_delay(5) == 10.0
    assert manager._calculate_backoff_delay(15) == 10.0


def test_retry_info_contents(manager, clock):
    clock.advance(5)
    info = manager.record_failure("task-1", "Connection timeout")
    assert isinstance(info, RetryInfo)
    assert info.task_id == "task-1"
    assert info.retry_count == 1
    assert info.last_retry_at == START + timedelta(seconds=5)
    assert info.next_retry_at == START + timedelta(seconds=6)
    assert info.failure_reason == "Connection timeout"
    assert manager.get_retry_info("task-1") == info


def test_next_retry_at_is_last_retry_at_plus_delay(manager):
    for n in range(1, 4):
        info = manager.record_failure("task-1")
        delay = manager._calculate_backoff_delay(n)
        assert info.next_retry_at == info.last_retry_at + timedelta(seconds=delay)


def test_clear_retry_info(manager):
    manager.record_failure("task-1", "boom")
    manager.clear_retry_info("task-1")
    assert manager.get_retry_count("task-1") == 0
    assert manager.get_retry_info("task-1") is None
    assert len(manager) == 0
    manager.clear_retry_info("task-1")  # unknown: no error
    manager.clear_retry_info("never-seen")


def test_get_all_retry_info(manager):
    manager.record_failure("task-1", "a")
    manager.record_failure("task-2", "b")
    manager.record_failure("task-2", "c")
    all_info = manager.get_all_retry_info()
    assert set(all_info) == {"task-1", "task-2"}
    assert all_info["task-1"].retry_count == 1
    assert all_info["task-2"].retry_count == 2
    assert all_info["task-2"].failure_reason == "c"


def test_get_tasks_ready_for_retry(manager, clock):
    manager.record_failure("task-1", "boom")
    manager.record_failure("task-2", "boom")
    manager.record_failure("task-2", "boom")  # due in 2 s
    assert manager.get_tasks_ready_for_retry() == []
    clock.advance(1.0)
    assert manager.get_tasks_ready_for_retry() == ["task-1"]
    clock.advance(1.0)
    assert manager.get_tasks_ready_for_retry() == ["task-1", "task-2"]


def test_ready_list_excludes_tasks_at_the_limit(manager, clock):
    for _ in range(3):
        manager.record_failure("exhausted", "boom")
    manager.record_failure("retryable", "boom")
    clock.advance(3600)
    assert manager.get_tasks_ready_for_retry() == ["retryable"]


def test_to_dict_serialisation(manager, clock):
    clock.advance(0.25)
    info = manager.record_failure("task-1", "Test error")
    data = info.to_dict()
    assert data == {
        "task_id": "task-1",
        "retry_count": 1,
        "last_retry_at": info.last_retry_at.isoformat(),
        "next_retry_at": info.next_retry_at.isoformat(),
        "failure_reason": "Test error",
    }
    assert list(data) == [
        "task_id",
        "retry_count",
        "last_retry_at",
        "next_retry_at",
        "failure_reason",
    ]
    assert data["last_retry_at"] == "2025-03-14T09:26:53.839793"


def test_to_dict_without_times_and_with_whole_seconds():
    assert RetryInfo("t").to_dict() == {
        "task_id": "t",
        "retry_count": 0,
        "last_retry_at": None,
        "next_retry_at": None,
        "failure_reason": None,
    }
    whole = START.replace(microsecond=0)
    info = RetryInfo("t", last_retry_at=whole)
    assert info.to_dict()["last_retry_at"] == whole.isoformat() == "2025-03-14T09:26:53"


def test_several_failures_keep_the_last_reason(manager):
    manager.record_failure("task-1", "Error 1")
    manager.record_failure("task-1", "Error 2")
    manager.record_failure("task-1", "Error 3")
    info = manager.get_retry_info("task-1")
    assert info.retry_count == 3
    assert info.failure_reason == "Error 3"
    manager.record_failure("task-1")
    assert manager.get_retry_info("task-1").failure_reason is None


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (2.0, [1.0, 2.0, 4.0, 8.0, 16.0]),
        (3.0, [1.0, 3.0, 9.0, 27.0, 81.0]),
        (1.5, [1.0, 1.5, 2.25, 3.375, 5.0625]),
    ],
)
def test_different_backoff_bases(base, expected):
    manager = RetryManager(backoff_base=base, initial_delay=1.0, max_delay=1000.0)
    assert [manager._calculate_backoff_delay(n) for n in range(1, 6)] == expected


def test_dispatcher_style_retry_loop(clock):
    """Fail, wait out each backoff, fail again, until the limit; then clear."""
    manager = RetryManager(max_attempts=3, clock=clock)
    waited = []
    while manager.should_retry("task-1"):
        info = manager.record_failure("task-1", "flaky")
        delay = (info.next_retry_at - info.last_retry_at).total_seconds()
        waited.append(delay)
        clock.advance(delay)
    assert waited == [1.0, 2.0, 4.0]
    assert manager.get_tasks_ready_for_retry() == []
    manager.clear_retry_info("task-1")
    assert manager.should_retry("task-1")


def test_manual_clock_readings(clock):
    assert clock.now() == START
    assert clock.monotonic() == 0.0
    clock.advance(2.5)
    assert clock.now() == START + timedelta(seconds=2.5)
    assert clock.monotonic() == 2.5
    assert ManualClock().now().year >= 2025


def test_retry_infos_stay_their_own_when_freed_ones_are_reused():
    # RetryInfo objects are recycled through a free list: the ones still held
    # keep their values while freed ones are made into new records.
    manager = RetryManager(max_attempts=5)
    kept = []
    for i in range(300):
        info = manager.record_failure(f"t{i}", f"reason {i}")
        if i % 3 == 0:
            kept.append((i, info))
        del info
    for i in range(300, 600):
        manager.record_failure(f"t{i}", f"reason {i}")
    assert len(kept) == 100
    for i, info in kept:
        assert (info.task_id, info.retry_count, info.failure_reason) == (f"t{i}", 1, f"reason {i}")
        assert info == manager.get_retry_info(f"t{i}")
