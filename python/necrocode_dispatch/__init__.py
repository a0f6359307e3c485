"""necrocode-dispatch: the Rust core of NecroCode's task dispatcher.

Switch an existing import by changing one line::

    from necrocode.dispatcher.retry_manager import RetryManager, RetryInfo  # before
    from necrocode_dispatch.retry_manager import RetryManager, RetryInfo    # after
"""

from necrocode_dispatch._core import (
    ManualClock,
    RetryInfo,
    RetryManager,
    SystemClock,
    __version__,
)

__all__ = [
    "ManualClock",
    "RetryInfo",
    "RetryManager",
    "SystemClock",
    "__version__",
]
