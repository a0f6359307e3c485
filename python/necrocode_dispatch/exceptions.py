"""Drop-in for ``necrocode.dispatcher.exceptions``."""

from necrocode_dispatch._core import (
    DeadlockDetectedError,
    DispatcherError,
    PoolNotFoundError,
    RunnerLaunchError,
    SlotAllocationError,
    TaskAssignmentError,
)

__all__ = [
    "DeadlockDetectedError",
    "DispatcherError",
    "PoolNotFoundError",
    "RunnerLaunchError",
    "SlotAllocationError",
    "TaskAssignmentError",
]
