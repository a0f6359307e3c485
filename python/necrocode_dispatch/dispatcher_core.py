"""Drop-in for ``necrocode.dispatcher.dispatcher_core``."""

from necrocode_dispatch._core import DispatcherCore

__all__ = ["DispatcherCore"]
