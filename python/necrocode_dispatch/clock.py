"""The clocks a ``RetryManager`` (and later the dispatcher) reads."""

from necrocode_dispatch._core import ManualClock, SystemClock

__all__ = ["ManualClock", "SystemClock"]
