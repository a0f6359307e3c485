"""Type stubs for the compiled module ``necrocode_dispatch._core``."""

import os
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypeAlias, final

from typing_extensions import Self, disjoint_base

__all__ = [
    "DeadlockDetectedError",
    "DispatcherCore",
    "DispatcherError",
    "JsonLineLog",
    "ManualClock",
    "PoolNotFoundError",
    "RetryInfo",
    "RetryManager",
    "RunnerLaunchError",
    "SlotAllocationError",
    "SystemClock",
    "TaskAssignmentError",
    "_DispatchLoop",
    "_Waker",
    "__version__",
    "_after_fork_in_child",
    "_stop_loops_at_exit",
    "check_dependencies",
    "empty_directory",
    "spawn_shell",
    "write_atomically",
]

__version__: str

@final
class SystemClock:
    """The operating system's clocks."""

    def __new__(cls) -> Self: ...
    def now(self) -> datetime:
        """The naive local wall-clock time, as ``datetime.now()``."""
    def monotonic(self) -> float:
        """Seconds of the monotonic clock, as ``time.monotonic()``."""

@final
class ManualClock:
    """A test clock whose readings move only by ``advance(seconds)``."""

    def __new__(cls, start: datetime | None = None) -> Self: ...
    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...
    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds`` (finite, >= 0)."""
    def set_wall_time(self, now: datetime) -> None:
        """Set the wall-clock reading alone, as a system clock jump would."""

_Clock: TypeAlias = SystemClock | ManualClock

@final
class RetryInfo:
    """Retry information of one task."""

    task_id: str
    retry_count: int
    last_retry_at: datetime | None
    next_retry_at: datetime | None
    failure_reason: str | None

    def __new__(
        cls,
        task_id: str,
        retry_count: int = 0,
        last_retry_at: datetime | None = None,
        next_retry_at: datetime | None = None,
        failure_reason: str | None = None,
    ) -> Self: ...
    def to_dict(self) -> dict[str, Any]: ...
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetryInfo: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __copy__(self) -> RetryInfo: ...
    def __deepcopy__(self, memo: Any) -> RetryInfo: ...

@final
class RetryManager:
    """Retry bookkeeping with exponential backoff, safe to share between threads."""

    max_attempts: int
    backoff_base: float
    initial_delay: float
    max_delay: float

    def __new__(
        cls,
        max_attempts: int = 3,
        backoff_base: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 300.0,
        *,
        clock: _Clock | None = None,
        jitter: str | None = None,
        seed: int | None = None,
        non_retryable: str | Iterable[str] | None = None,
        policies: dict[str, dict[str, float]] | None = None,
        max_retry_duration: float | None = None,
        retry_budget: int | dict[str, int] | None = None,
    ) -> Self: ...
    @property
    def clock(self) -> _Clock: ...
    @property
    def jitter(self) -> str: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def non_retryable(self) -> tuple[str, ...]: ...
    @property
    def policies(self) -> dict[str, dict[str, float]]: ...
    @property
    def max_retry_duration(self) -> float | None: ...
    @property
    def retry_budget(self) -> dict[str, Any] | None: ...
    def get_status(self) -> dict[str, Any]: ...
    def record_success(self, task_id: str) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    def load(self, path: str | os.PathLike[str]) -> None: ...
    def record_failure(self, task_id: str, failure_reason: str | None = None) -> RetryInfo: ...
    def should_retry(self, task_id: str) -> bool: ...
    def get_retry_count(self, task_id: str) -> int: ...
    def get_retry_info(self, task_id: str) -> RetryInfo | None: ...
    def clear_retry_info(self, task_id: str) -> None: ...
    def get_all_retry_info(self) -> dict[str, RetryInfo]: ...
    def get_tasks_ready_for_retry(self) -> list[str]: ...
    def _calculate_backoff_delay(self, retry_count: int) -> float: ...
    def __len__(self) -> int: ...
    def __contains__(self, task_id: object, /) -> bool: ...

class DispatcherError(Exception): ...
class TaskAssignmentError(DispatcherError): ...
class SlotAllocationError(DispatcherError): ...
class RunnerLaunchError(DispatcherError): ...
class PoolNotFoundError(DispatcherError): ...
class DeadlockDetectedError(DispatcherError): ...

@disjoint_base
class DispatcherCore:
    """The dispatcher state machine; ports are injected Python objects."""

    config: Any
    retry_manager: RetryManager
    running: bool
    task_source: Any
    task_registry: Any
    repo_pool_manager: Any
    runner_launcher: Any
    event_recorder: Any
    task_state_type: Any

    def __new__(
        cls,
        config: Any = None,
        *,
        task_source: Any = None,
        task_registry: Any = None,
        repo_pool_manager: Any = None,
        runner_launcher: Any = None,
        event_recorder: Any = None,
        clock: _Clock | None = None,
        task_state_type: Any = None,
    ) -> Self: ...
    @property
    def clock(self) -> _Clock: ...
    def track_running(
        self,
        task: Any,
        runner_id: str,
        pool_name: str,
        slot_id: str | None = None,
        *,
        started_at: datetime | None = None,
        pid: int | None = None,
        container_id: str | None = None,
        job_name: str | None = None,
    ) -> None: ...
    def handle_task_failure(
        self,
        task_id: str,
        spec_name: str | None = None,
        failure_reason: str | None = None,
        runner_id: str | None = None,
        slot_id: str | None = None,
        pool_name: str | None = None,
    ) -> bool: ...
    def handle_runner_completion(
        self,
        runner_id: str,
        task_id: str | None = None,
        spec_name: str | None = None,
        success: bool | None = None,
        slot_id: str | None = None,
        pool_name: str | None = None,
        failure_reason: str | None = None,
        *,
        timed_out: bool = False,
    ) -> bool: ...
    def update_heartbeat(self, runner_id: str) -> bool: ...
    def check_heartbeats(self) -> int: ...
    def _handle_runner_timeout(self, runner_id: str, runner_info: Any = None) -> bool: ...
    def tick(self) -> dict[str, int]:
        """One pass: poll, queue, promote due retries, schedule and assign,
        check heartbeats. Keys: enqueued, ignored, retries_ready, assigned,
        no_slot, launch_failed, timed_out."""
    def start(self) -> None:
        """Run ``tick()`` every ``config.poll_interval`` s on a daemon thread."""
    def stop(self, timeout: float | None = None) -> None:
        """Stop assigning, end the loop, wait up to ``timeout`` s (default
        ``config.graceful_shutdown_timeout``) for runners, force the rest."""
    def set_scheduling_policy(self, policy: Any) -> None: ...
    def enable_priority_scheduling(self) -> None: ...
    def disable_priority_scheduling(self) -> None: ...
    def get_global_running_count(self) -> int: ...
    def can_accept_task_globally(self) -> bool: ...
    def get_queued_task_ids(self) -> list[str]: ...
    def get_task_place(self, task_id: str) -> str | None: ...
    def get_status(self, include_tasks: bool = True) -> dict[str, Any]: ...
    def export_prometheus(self) -> str: ...
    def snapshot(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    def load(self, path: str | os.PathLike[str]) -> None: ...
    def update_task_priority(self, spec_name: str, task_id: str, new_priority: int) -> bool: ...
    def enable_pool(self, name: str) -> None: ...
    def disable_pool(self, name: str) -> None: ...
    def check_deadlock_now(self, raise_on_deadlock: bool = False) -> list[list[str]]: ...
    def _check_invariants(self) -> None: ...

@final
class JsonLineLog:
    """An append-only file of JSON lines: ``write(event, fields)`` appends
    ``{"event": event, "time": <datetime.now() isoformat>, "elapsed":
    <seconds since opened>, **fields}`` with one write."""

    def __new__(cls, path: str | os.PathLike[str]) -> Self: ...
    def write(self, event: str, fields: dict[str, Any]) -> bool:
        """Appends the event's line; False (and nothing written) once closed."""
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def path(self) -> str: ...

def empty_directory(path: str | os.PathLike[str]) -> None:
    """Removes everything in the directory ``path`` (subdirectories whole,
    best effort; links themselves, never what they name), keeping ``path``.
    ``FileNotFoundError`` when ``path`` is gone."""

def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replaces the file at ``path`` with ``text``: a crash leaves the old
    contents or the new, never a mix."""

if sys.platform != "win32":
    def spawn_shell(
        command: str,
        cwd: str | os.PathLike[str],
        env: dict[str, str],
        stdout: str | os.PathLike[str],
        stderr: str | os.PathLike[str],
    ) -> int:
        """Starts ``/bin/sh -c command`` in ``cwd`` with exactly ``env``,
        stdout and stderr to new files, stdin from /dev/null, in a session
        (and process group) of its own, SIGPIPE and SIGXFSZ at their
        defaults; returns its pid (the caller reaps it). Raises the errno's
        ``OSError`` naming the file (or ``cwd``). On Linux x86-64/arm64 it
        returns without waiting for the exec: a failure after the checks
        (the directory removed meanwhile) is the command's exit 127, with
        the reason on its stderr."""

def check_dependencies(
    graph: dict[str, Iterable[str]],
) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """``(unknown, cycles)`` of ``{task_id: [ids it depends on]}``:
    ``(task_id, missing_id)`` pairs in order, and each cycle as a path back to
    its start (``["a", "b", "c", "a"]``). Linear in tasks + dependencies."""

# Internal: the loop thread's target, the wake-up callable handed to task
# sources, and the interpreter hooks (atexit, fork) the module installs.
@final
class _DispatchLoop:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...

@final
class _Waker:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...

def _stop_loops_at_exit() -> None: ...
def _after_fork_in_child() -> None: ...
