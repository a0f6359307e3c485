"""Drop-in for ``necrocode.dispatcher.retry_manager``."""

from necrocode_dispatch._core import RetryInfo, RetryManager

__all__ = ["RetryInfo", "RetryManager"]
