"""Drop-in for ``necrocode.dispatcher.dispatcher_core``.

With NecroCode importable, ``DispatcherCore(config)`` builds NecroCode's own
components from the config and runs on them (SPEC §8; see
``necrocode_dispatch.integrations.necrocode``); without it, this is the
injected-ports core, as ``necrocode_dispatch.DispatcherCore`` always is."""

from importlib.util import find_spec

if find_spec("necrocode") is not None and find_spec("necrocode.dispatcher") is not None:
    from necrocode_dispatch.integrations.necrocode import (
        NecroCodeDispatcherCore as DispatcherCore,
    )
else:
    from necrocode_dispatch._core import DispatcherCore

__all__ = ["DispatcherCore"]
