"""A pure-Python implementation of the same algorithms, for side-by-side
benchmarks: what users of NecroCode's dispatcher have today.

It behaves like SPEC §3-§4 where the benchmarks look: the same results, the
same checks of its arguments (a non-str task id is a TypeError), each call
atomic under a lock (the Rust core is thread-safe, so the reference must be
too), copies handed out rather than internal records, the same port calls
with the same keyword arguments, and logging calls at the same levels. It is
written the straightforward Python way: a dict of per-task records, a full
scan for ready tasks, a heap queue and dict counters.
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from necrocode_dispatch.models import AgentPool, PoolType, RunnerState, TaskState

retry_logger = logging.getLogger("reference.retry_manager")
dispatcher_logger = logging.getLogger("reference.dispatcher_core")


@dataclass
class RetryInfo:
    task_id: str
    retry_count: int = 0
    last_retry_at: datetime | None = None
    next_retry_at: datetime | None = None
    failure_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "retry_count": self.retry_count,
            "last_retry_at": self.last_retry_at.isoformat() if self.last_retry_at else None,
            "next_retry_at": self.next_retry_at.isoformat() if self.next_retry_at else None,
            "failure_reason": self.failure_reason,
        }


class RetryManager:
    def __init__(
        self,
        max_attempts: int = 3,
        backoff_base: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 300.0,
    ):
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.retry_info: dict[str, RetryInfo] = {}
        # Decisions use the monotonic clock, as SPEC §2 asks of both sides.
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()

    def _calculate_backoff_delay(self, retry_count: int) -> float:
        if retry_count <= 0:
            return self.initial_delay
        try:
            delay = self.initial_delay * (self.backoff_base ** (retry_count - 1))
        except OverflowError:
            return self.max_delay
        return min(delay, self.max_delay)

    def record_failure(self, task_id: str, failure_reason: str | None = None) -> RetryInfo:
        _check_task_id(task_id)
        if failure_reason is not None and not isinstance(failure_reason, str):
            raise TypeError(f"failure_reason must be a str or None, got {failure_reason!r}")
        with self._lock:
            info = self.retry_info.get(task_id)
            if info is None:
                info = self.retry_info[task_id] = RetryInfo(task_id=task_id)
            info.retry_count += 1
            now = datetime.now()
            delay = self._calculate_backoff_delay(info.retry_count)
            info.last_retry_at = now
            info.next_retry_at = now + timedelta(seconds=delay)
            info.failure_reason = failure_reason
            self._due[task_id] = time.monotonic() + delay
            result = copy.copy(info)
        retry_logger.info(
            "Recorded failure for task %s: retry_count=%d/%d, next_retry_at=%s, delay=%.1fs",
            task_id,
            result.retry_count,
            self.max_attempts,
            result.next_retry_at,
            delay,
        )
        retry_logger.debug("Calculated backoff delay for retry %d: %ss", result.retry_count, delay)
        if failure_reason is not None:
            retry_logger.debug("Failure reason for task %s: %s", task_id, failure_reason)
        if result.retry_count >= self.max_attempts:
            retry_logger.info("Task %s has reached max retry attempts", task_id)
        return result

    def should_retry(self, task_id: str) -> bool:
        _check_task_id(task_id)
        with self._lock:
            info = self.retry_info.get(task_id)
            if info is None:
                return True
            count = info.retry_count
            remaining = self._due[task_id] - time.monotonic()
        if count >= self.max_attempts:
            retry_logger.debug("Task %s has reached max retry attempts", task_id)
            return False
        if remaining > 0:
            retry_logger.debug("Task %s must wait %.1fs before retry", task_id, remaining)
            return False
        return True

    def get_retry_count(self, task_id: str) -> int:
        _check_task_id(task_id)
        with self._lock:
            info = self.retry_info.get(task_id)
            return info.retry_count if info else 0

    def clear_retry_info(self, task_id: str) -> None:
        _check_task_id(task_id)
        with self._lock:
            cleared = self.retry_info.pop(task_id, None) is not None
            if cleared:
                del self._due[task_id]
        if cleared:
            retry_logger.debug("Cleared retry info for task %s", task_id)

    def get_tasks_ready_for_retry(self) -> list[str]:
        """Tasks below the limit whose backoff has elapsed, earliest due first."""
        with self._lock:
            now = time.monotonic()
            due = self._due
            limit = self.max_attempts
            ready = [
                (due[task_id], task_id)
                for task_id, info in self.retry_info.items()
                if info.retry_count < limit and due[task_id] <= now
            ]
        ready.sort()
        return [task_id for _, task_id in ready]


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str):
        raise TypeError(f"task_id must be a str, got {type(task_id).__name__} {task_id!r}")


def _check_str(name: str, value: object, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")


# The dispatcher, as the original is built: a runner monitor, an agent pool
# manager and a metrics collector, each a small class with its own lock,
# composed by the dispatcher core.


@dataclass
class Runner:
    runner_id: str
    task_id: str
    spec_name: str
    pool_name: str
    slot_id: str | None
    started_at: datetime
    started_mono: float
    state: RunnerState = RunnerState.RUNNING


@dataclass
class RunnerInfo:
    runner: Runner
    last_heartbeat: float
    state: RunnerState = RunnerState.RUNNING


class RunnerMonitor:
    def __init__(self, heartbeat_timeout: float):
        self.heartbeat_timeout = heartbeat_timeout
        self.runners: dict[str, RunnerInfo] = {}
        self._lock = threading.Lock()

    def add_runner(self, runner: Runner) -> None:
        with self._lock:
            self.runners[runner.runner_id] = RunnerInfo(runner, time.monotonic())

    def remove_runner(self, runner_id: str) -> RunnerInfo | None:
        """The runner's info, once: the first caller owns its outcome."""
        with self._lock:
            return self.runners.pop(runner_id, None)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self.runners)


class AgentPoolManager:
    def __init__(self, pools: dict[str, int]):
        self.pools = {
            name: AgentPool(name=name, type=PoolType.LOCAL_PROCESS, max_concurrency=limit)
            for name, limit in pools.items()
        }
        self._lock = threading.Lock()

    def get_pool(self, name: str) -> AgentPool:
        pool = self.pools.get(name)
        if pool is None:
            raise KeyError(f"pool_name: no pool named {name!r}")
        return pool

    def least_loaded_with_room(self) -> AgentPool | None:
        with self._lock:
            candidates = [p for p in self.pools.values() if p.can_accept_task()]
            if not candidates:
                return None
            return min(candidates, key=lambda p: p.current_running / p.max_concurrency)

    def increment_running_count(self, name: str) -> bool:
        with self._lock:
            pool = self.get_pool(name)
            if not pool.can_accept_task():
                return False
            pool.current_running += 1
            return True

    def decrement_running_count(self, name: str) -> None:
        with self._lock:
            pool = self.get_pool(name)
            pool.current_running = max(0, pool.current_running - 1)


class MetricsCollector:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(
            (
                "tasks_enqueued",
                "tasks_assigned",
                "tasks_completed",
                "tasks_failed",
                "retries_scheduled",
            ),
            0,
        )

    def increment(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


class Dispatcher:
    """The dispatcher's assignment, failure and completion paths."""

    def __init__(
        self,
        pools: dict[str, int],
        *,
        max_global_concurrency: int = 10,
        max_attempts: int = 3,
        heartbeat_timeout: float = 60.0,
        task_registry: Any,
        repo_pool_manager: Any,
        runner_launcher: Any,
        event_recorder: Any,
    ):
        self.retry_manager = RetryManager(max_attempts=max_attempts)
        self.runner_monitor = RunnerMonitor(heartbeat_timeout)
        self.agent_pool_manager = AgentPoolManager(pools)
        self.metrics = MetricsCollector()
        self.max_global_concurrency = max_global_concurrency
        self.global_running = 0
        self._global_lock = threading.Lock()
        self.queue: list[tuple[int, float, int, Any]] = []  # (-priority, age, seq, task)
        self.queued: set[str] = set()
        self.delayed: list[tuple[float, str]] = []
        self._seq = 0
        self._queue_lock = threading.Lock()
        self.task_registry = task_registry
        self.repo_pool_manager = repo_pool_manager
        self.runner_launcher = runner_launcher
        self.event_recorder = event_recorder

    # -- capacity -----------------------------------------------------------------------

    def _reserve_global(self) -> bool:
        with self._global_lock:
            if self.global_running >= self.max_global_concurrency:
                return False
            self.global_running += 1
            return True

    def _release_global(self) -> None:
        with self._global_lock:
            self.global_running = max(0, self.global_running - 1)

    # -- assignment ---------------------------------------------------------------------

    def enqueue(self, task: Any) -> None:
        with self._queue_lock:
            if task.id in self.queued:
                return
            self._seq += 1
            heapq.heappush(self.queue, (-task.priority, time.time(), self._seq, task))
            self.queued.add(task.id)
        self.metrics.increment("tasks_enqueued")

    def assign_next(self) -> bool:
        """Assigns the queue's head if there is room; True when it launched."""
        pool = self.agent_pool_manager.least_loaded_with_room()
        if pool is None or not self._reserve_global():
            return False
        with self._queue_lock:
            if not self.queue:
                self._release_global()
                return False
            _, _, _, task = heapq.heappop(self.queue)
            self.queued.discard(task.id)
        self.agent_pool_manager.increment_running_count(pool.name)
        spec = task.metadata.get("spec_name", "unknown")
        slot = self.repo_pool_manager.allocate_slot(
            task.metadata.get("repo_name", spec),
            metadata={"task_id": task.id, "spec_name": spec, "pool_name": pool.name},
        )
        runner = self.runner_launcher.launch(task, slot, pool)
        now = datetime.now()
        self.task_registry.update_task_state(
            spec_name=spec,
            task_id=task.id,
            new_state=TaskState.RUNNING,
            metadata={
                "runner_id": runner.runner_id,
                "assigned_slot": slot.slot_id,
                "pool_name": pool.name,
                "started_at": now.isoformat(),
            },
        )
        self.event_recorder.record_task_assigned(
            spec_name=spec,
            task_id=task.id,
            runner_id=runner.runner_id,
            slot_id=slot.slot_id,
            pool_name=pool.name,
            timestamp=now,
        )
        self.event_recorder.record_runner_started(
            spec_name=spec,
            task_id=task.id,
            runner_id=runner.runner_id,
            slot_id=slot.slot_id,
            pool_name=pool.name,
            pid=None,
            container_id=None,
            job_name=None,
            timestamp=now,
        )
        self.runner_monitor.add_runner(
            Runner(runner.runner_id, task.id, spec, pool.name, slot.slot_id, now, time.monotonic())
        )
        self.metrics.increment("tasks_assigned")
        dispatcher_logger.info(
            "assigned task %r to pool %r (runner %r, slot %r)",
            task.id,
            pool.name,
            runner.runner_id,
            slot.slot_id,
        )
        return True

    def track_running(self, task: Any, runner_id: str, pool_name: str, slot_id: str) -> None:
        _check_str("runner_id", runner_id)
        _check_str("pool_name", pool_name)
        _check_str("slot_id", slot_id, optional=True)
        if not self._reserve_global():
            raise RuntimeError("the global limit is reached")
        if not self.agent_pool_manager.increment_running_count(pool_name):
            self._release_global()
            raise RuntimeError(f"pool {pool_name!r} is at its max_concurrency")
        spec = task.metadata.get("spec_name", "unknown")
        self.runner_monitor.add_runner(
            Runner(runner_id, task.id, spec, pool_name, slot_id, datetime.now(), time.monotonic())
        )
        self.metrics.increment("tasks_assigned")

    # -- outcomes -----------------------------------------------------------------------

    def handle_task_failure(
        self,
        task_id,
        spec_name=None,
        failure_reason="unknown",
        runner_id=None,
        slot_id=None,
        pool_name=None,
    ) -> bool:
        _check_task_id(task_id)
        for name, value in (
            ("spec_name", spec_name),
            ("failure_reason", failure_reason),
            ("runner_id", runner_id),
            ("slot_id", slot_id),
            ("pool_name", pool_name),
        ):
            _check_str(name, value, optional=True)
        info = self.runner_monitor.remove_runner(runner_id)
        if info is None:
            return False
        self._release(info.runner)
        self._fail(info.runner, failure_reason or "unknown")
        return True

    def _release(self, runner: Runner) -> None:
        self.agent_pool_manager.decrement_running_count(runner.pool_name)
        self._release_global()

    def _fail(self, runner: Runner, reason: str) -> None:
        if runner.slot_id is not None:
            self.repo_pool_manager.release_slot(runner.slot_id, cleanup=True)
        info = self.retry_manager.record_failure(runner.task_id, reason)
        if info.retry_count < self.retry_manager.max_attempts:
            with self._queue_lock:
                heapq.heappush(
                    self.delayed, (self.retry_manager._due[runner.task_id], runner.task_id)
                )
            self.task_registry.update_task_state(
                spec_name=runner.spec_name,
                task_id=runner.task_id,
                new_state=TaskState.READY,
                metadata={
                    "retry_count": info.retry_count,
                    "next_retry_at": info.next_retry_at.isoformat(),
                    "failure_reason": reason,
                },
            )
            self.metrics.increment("retries_scheduled")
        else:
            self.event_recorder.record_task_failed(
                spec_name=runner.spec_name,
                task_id=runner.task_id,
                runner_id=runner.runner_id,
                failure_reason=reason,
                retry_count=info.retry_count,
            )
            self.task_registry.update_task_state(
                spec_name=runner.spec_name,
                task_id=runner.task_id,
                new_state=TaskState.FAILED,
                metadata={
                    "reason": reason,
                    "retries": info.retry_count,
                    "runner_id": runner.runner_id,
                },
            )
            self.retry_manager.clear_retry_info(runner.task_id)
            self.metrics.increment("tasks_failed")

    def promote_due(self) -> int:
        """Moves due retries back to the queue."""
        now = time.monotonic()
        promoted = []
        with self._queue_lock:
            while self.delayed and self.delayed[0][0] <= now:
                promoted.append(heapq.heappop(self.delayed)[1])
        return len(promoted)

    def handle_runner_completion(
        self,
        runner_id,
        task_id=None,
        spec_name=None,
        success=None,
        slot_id=None,
        pool_name=None,
        failure_reason=None,
    ) -> bool:
        _check_str("runner_id", runner_id)
        for name, value in (
            ("task_id", task_id),
            ("spec_name", spec_name),
            ("slot_id", slot_id),
            ("pool_name", pool_name),
            ("failure_reason", failure_reason),
        ):
            _check_str(name, value, optional=True)
        if not isinstance(success, bool):
            raise TypeError(f"success must be a bool, got {success!r}")
        info = self.runner_monitor.remove_runner(runner_id)
        if info is None:
            return False
        runner = info.runner
        self._release(runner)
        elapsed = time.monotonic() - runner.started_mono
        self.event_recorder.record_runner_finished(
            spec_name=runner.spec_name,
            task_id=runner.task_id,
            runner_id=runner_id,
            slot_id=runner.slot_id,
            success=success,
            execution_time_seconds=elapsed,
            failure_reason=None if success else failure_reason,
        )
        if not success:
            self._fail(runner, failure_reason or "unknown")
            return True
        self.event_recorder.record_task_completed(
            spec_name=runner.spec_name,
            task_id=runner.task_id,
            runner_id=runner_id,
            execution_time_seconds=elapsed,
        )
        if runner.slot_id is not None:
            self.repo_pool_manager.release_slot(runner.slot_id, cleanup=True)
        self.task_registry.update_task_state(
            spec_name=runner.spec_name,
            task_id=runner.task_id,
            new_state=TaskState.DONE,
            metadata={"runner_id": runner_id, "completed_at": datetime.now().isoformat()},
        )
        self.retry_manager.clear_retry_info(runner.task_id)
        self.metrics.increment("tasks_completed")
        dispatcher_logger.info("task %r completed by runner %r", runner.task_id, runner_id)
        return True

    @property
    def runners(self) -> dict[str, RunnerInfo]:
        return self.runner_monitor.runners
