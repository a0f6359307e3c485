"""necrocode-dispatch: the Rust core of NecroCode's task dispatcher.

Switch an existing import by changing one line::

    from necrocode.dispatcher.retry_manager import RetryManager, RetryInfo  # before
    from necrocode_dispatch.retry_manager import RetryManager, RetryInfo    # after
"""

from necrocode_dispatch._core import (
    DeadlockDetectedError,
    DispatcherCore,
    DispatcherError,
    ManualClock,
    PoolNotFoundError,
    RetryInfo,
    RetryManager,
    RunnerLaunchError,
    SlotAllocationError,
    SystemClock,
    TaskAssignmentError,
    __version__,
)
from necrocode_dispatch.config import DispatcherConfig
from necrocode_dispatch.models import (
    AgentPool,
    PoolStatus,
    PoolType,
    Runner,
    RunnerInfo,
    RunnerState,
    SchedulingPolicy,
    Task,
    TaskState,
)

__all__ = [
    "AgentPool",
    "DeadlockDetectedError",
    "DispatcherConfig",
    "DispatcherCore",
    "DispatcherError",
    "ManualClock",
    "PoolNotFoundError",
    "PoolStatus",
    "PoolType",
    "RetryInfo",
    "RetryManager",
    "Runner",
    "RunnerInfo",
    "RunnerLaunchError",
    "RunnerState",
    "SchedulingPolicy",
    "SlotAllocationError",
    "SystemClock",
    "Task",
    "TaskAssignmentError",
    "TaskState",
    "__version__",
]
