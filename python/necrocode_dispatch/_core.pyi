"""Type stubs for the compiled module ``necrocode_dispatch._core``."""

from datetime import datetime
from typing import Any

__version__: str

class SystemClock:
    """The operating system's clocks."""

    def __init__(self) -> None: ...
    def now(self) -> datetime:
        """The naive local wall-clock time, as ``datetime.now()``."""
    def monotonic(self) -> float:
        """Seconds of the monotonic clock, as ``time.monotonic()``."""

class ManualClock:
    """A test clock whose readings move only by ``advance(seconds)``."""

    def __init__(self, start: datetime | None = None) -> None: ...
    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...
    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds`` (finite, >= 0)."""
    def set_wall_time(self, now: datetime) -> None:
        """Set the wall-clock reading alone, as a system clock jump would."""

Clock = SystemClock | ManualClock

class RetryInfo:
    """Retry information of one task."""

    task_id: str
    retry_count: int
    last_retry_at: datetime | None
    next_retry_at: datetime | None
    failure_reason: str | None

    def __init__(
        self,
        task_id: str,
        retry_count: int = 0,
        last_retry_at: datetime | None = None,
        next_retry_at: datetime | None = None,
        failure_reason: str | None = None,
    ) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetryInfo: ...
    def __eq__(self, other: object) -> bool: ...
    def __copy__(self) -> RetryInfo: ...
    def __deepcopy__(self, memo: Any) -> RetryInfo: ...

class RetryManager:
    """Retry bookkeeping with exponential backoff, safe to share between threads."""

    max_attempts: int
    backoff_base: float
    initial_delay: float
    max_delay: float

    def __init__(
        self,
        max_attempts: int = 3,
        backoff_base: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 300.0,
        *,
        clock: Clock | None = None,
    ) -> None: ...
    @property
    def clock(self) -> Clock: ...
    def record_failure(self, task_id: str, failure_reason: str | None = None) -> RetryInfo: ...
    def should_retry(self, task_id: str) -> bool: ...
    def get_retry_count(self, task_id: str) -> int: ...
    def get_retry_info(self, task_id: str) -> RetryInfo | None: ...
    def clear_retry_info(self, task_id: str) -> None: ...
    def get_all_retry_info(self) -> dict[str, RetryInfo]: ...
    def get_tasks_ready_for_retry(self) -> list[str]: ...
    def _calculate_backoff_delay(self, retry_count: int) -> float: ...
    def __len__(self) -> int: ...
    def __contains__(self, task_id: object) -> bool: ...
