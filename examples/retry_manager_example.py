"""A walk through RetryManager: failures, backoff, the limit, clearing, serialisation.

Runs instantly: a ManualClock stands in for time, so waiting is `clock.advance()`.

    python examples/retry_manager_example.py
"""

import json
from datetime import datetime

from necrocode_dispatch import ManualClock, RetryInfo, RetryManager


def main() -> None:
    clock = ManualClock(datetime(2025, 1, 1, 9, 0, 0))
    manager = RetryManager(max_attempts=3, backoff_base=2.0, initial_delay=1.0, clock=clock)
    print(f"{manager!r}\n")

    print("1. A runner fails; each failure doubles the wait before the next attempt.")
    while manager.should_retry("task-42"):
        info = manager.record_failure("task-42", "runner exited with code 1")
        wait = (info.next_retry_at - info.last_retry_at).total_seconds()
        print(
            f"   failure #{info.retry_count} at {info.last_retry_at:%H:%M:%S}, "
            f"next attempt at {info.next_retry_at:%H:%M:%S} (waits {wait:g}s)"
        )
        print(f"   ready right away? {manager.should_retry('task-42')}")
        clock.advance(wait)

    print(f"\n2. After {manager.get_retry_count('task-42')} failures the limit is reached:")
    print(f"   should_retry -> {manager.should_retry('task-42')}")
    print(f"   ready for retry -> {manager.get_tasks_ready_for_retry()}")

    print("\n3. Backoff is capped at max_delay, however many failures:")
    for count in (1, 5, 9, 10, 5000):
        print(f"   failure #{count}: {manager._calculate_backoff_delay(count):g}s")

    print("\n4. Serialise the retry state, and read it back:")
    data = manager.get_retry_info("task-42").to_dict()
    print("   " + json.dumps(data))
    assert RetryInfo.from_dict(data) == manager.get_retry_info("task-42")

    print("\n5. Several tasks: the ready list is ordered by due time.")
    manager.record_failure("slow", "timeout")
    manager.record_failure("slow", "timeout")  # waits 2 s
    manager.record_failure("quick", "flaky")  # waits 1 s
    clock.advance(2)
    print(f"   ready for retry -> {manager.get_tasks_ready_for_retry()}")

    print("\n6. On success the dispatcher clears a task's retry info.")
    for task in ("task-42", "slow", "quick"):
        manager.clear_retry_info(task)
    print(f"   tracked tasks -> {len(manager)}")


if __name__ == "__main__":
    main()
