"""Dependency cycles among a task source's tasks (issue 13, item 4): found in
Rust in linear time, returned by check_deadlock_now(), logged with the tasks
they block, reported in get_status()["deadlock_info"], checked by the loop."""

import logging
import time
from types import SimpleNamespace

import pytest

from necrocode_dispatch import DeadlockDetectedError, DispatcherConfig, DispatcherCore

from .fakes import build


class GraphSource:
    """A task source that has no ready task but knows the dependencies."""

    def __init__(self, graph):
        self.graph = graph
        self.checks = 0

    def poll_ready_tasks(self):
        return []

    def dependency_graph(self):
        self.checks += 1
        return self.graph


def test_a_cycle_is_returned_logged_and_reported_with_what_it_blocks(caplog):
    dispatcher, _ = build()
    dispatcher.task_source = GraphSource(
        {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["c"], "e": ["d"], "ok": []}
    )
    assert dispatcher.get_status()["deadlock_info"]["last_check"] is None
    with caplog.at_level(logging.WARNING, logger="necrocode_dispatch"):
        assert dispatcher.check_deadlock_now() == [["a", "b", "c"]]
    assert any("a -> b -> c -> a" in r.getMessage() for r in caplog.records)
    info = dispatcher.get_status()["deadlock_info"]
    assert info["detected_cycles"] == [["a", "b", "c"]]
    assert info["blocked_tasks"] == ["d", "e"]
    assert info["last_check"] is not None
    with pytest.raises(DeadlockDetectedError, match="a -> b -> c -> a"):
        dispatcher.check_deadlock_now(raise_on_deadlock=True)


def test_no_cycle_and_no_graph_mean_no_deadlock():
    dispatcher, _ = build()
    dispatcher.task_source = GraphSource({"a": [], "b": ["a"], "c": ["a", "b"]})
    assert dispatcher.check_deadlock_now() == []
    dispatcher.task_source = SimpleNamespace(poll_ready_tasks=list)
    assert dispatcher.check_deadlock_now() == []


def test_a_bad_graph_is_a_type_error_naming_it():
    dispatcher, _ = build()
    dispatcher.task_source = GraphSource([("a", ["b"])])
    with pytest.raises(TypeError, match=r"dependency_graph\(\)"):
        dispatcher.check_deadlock_now()


def test_the_loop_checks_every_deadlock_check_interval():
    source = GraphSource({"a": ["a"]})
    dispatcher = DispatcherCore(
        DispatcherConfig(poll_interval=0.01, deadlock_check_interval=0.05), task_source=source
    )
    began = time.monotonic()
    dispatcher.start()
    try:
        deadline = began + 10
        while source.checks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        dispatcher.stop(timeout=0)
    elapsed = time.monotonic() - began
    # Checked again and again, but not more often than every 0.05 s (the loop
    # itself passes every 0.01 s).
    assert 3 <= source.checks <= elapsed / 0.05 + 2
    assert dispatcher.get_status()["deadlock_info"]["detected_cycles"] == [["a"]]


def test_a_100k_chain_is_checked_without_a_deep_stack():
    chain = {f"t{i}": ([f"t{i - 1}"] if i else []) for i in range(100_000)}
    dispatcher, _ = build()
    dispatcher.task_source = GraphSource(chain)
    assert dispatcher.check_deadlock_now() == []
