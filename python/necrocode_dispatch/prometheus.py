"""A ``prometheus_client`` collector for a DispatcherCore.

Optional: ``pip install 'necrocode-dispatch[prometheus]'``. The metrics are
those of ``DispatcherCore.export_prometheus()`` (the Rust core renders them;
this module only hands them to a registry)::

    from prometheus_client import REGISTRY, start_http_server
    from necrocode_dispatch.prometheus import DispatcherCollector

    REGISTRY.register(DispatcherCollector(dispatcher))
    start_http_server(9100)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from necrocode_dispatch import DispatcherCore

__all__ = ["DispatcherCollector"]


class DispatcherCollector(Collector):
    """Collects a dispatcher's metrics each time the registry is scraped."""

    def __init__(self, dispatcher: DispatcherCore):
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self.dispatcher.export_prometheus())
