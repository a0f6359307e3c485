"""Prometheus metrics (issue 7): `export_prometheus()` parses with
prometheus_client's own parser, its numbers match `get_status()`, and the
collector registers in a registry."""

from __future__ import annotations

import pytest

from .fakes import build, make_task

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from necrocode_dispatch.prometheus import DispatcherCollector  # noqa: E402


def busy_dispatcher():
    """Two pools; tasks running, delayed, queued, completed and failed for
    good, with reasons that need escaping, and a retry budget."""
    tasks = [make_task(f"t{i}") for i in range(10)]
    dispatcher, ports = build(
        tasks,
        pools=(("local", 3), ("gpu", 1)),
        retry_max_attempts=2,
        retry_initial_delay=10,
        retry_budget=100,
    )
    dispatcher.tick()
    first = list(ports.launcher.launches)
    reasons = ["exit code 1: flaky", 'quote " and \\ backslash\nnewline', "exit code 1: other"]
    for launch, reason in zip(first, reasons, strict=False):
        dispatcher.handle_runner_completion(
            launch.runner_id, launch.task_id, "spec-a", False, failure_reason=reason
        )
    dispatcher.handle_runner_completion(first[3].runner_id, first[3].task_id, "spec-a", True)
    dispatcher.tick()  # four more start; three wait for their retry
    # A second failure of a delayed task: at the limit of 2, failed for good.
    dispatcher.handle_task_failure(first[0].task_id, "spec-a", "exit code 1: again")
    return dispatcher, ports


def samples(text: str) -> dict:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }


def test_the_export_parses_and_matches_get_status():
    dispatcher, _ = busy_dispatcher()
    text = dispatcher.export_prometheus()
    status = dispatcher.get_status()
    got = samples(text)
    prefix = "necrocode_dispatch_"
    assert got[(prefix + "queue_size", ())] == status["queue_size"]
    assert got[(prefix + "delayed_tasks", ())] == len(status["delayed"]) > 0
    assert got[(prefix + "running_tasks", ())] == status["global_running_count"] > 0
    for pool in status["pool_statuses"]:
        labels = (("pool", pool["pool_name"]),)
        assert got[(prefix + "pool_running", labels)] == pool["current_running"]
        assert got[(prefix + "pool_max_concurrency", labels)] == pool["max_concurrency"]
        assert got[(prefix + "pool_utilization", labels)] == pytest.approx(pool["utilization"])
    for reason, n in status["retries_by_reason"].items():
        assert got[(prefix + "retries_total", (("reason", reason),))] == n
    for reason, n in status["permanent_failures_by_reason"].items():
        assert got[(prefix + "permanent_failures_total", (("reason", reason),))] == n
    # Reasons count by class, and labels survive escaping.
    assert status["retries_by_reason"] == {
        "exit code 1": 2,
        'quote " and \\ backslash\nnewline': 1,
    }
    assert status["permanent_failures_by_reason"] == {"exit code 1": 1}
    delays = status["backoff_delays"]
    assert got[(prefix + "backoff_delay_seconds_count", ())] == delays["count"] == 3
    assert got[(prefix + "backoff_delay_seconds_sum", ())] == delays["sum"]
    for le, n in delays["buckets"].items():
        assert got[(prefix + "backoff_delay_seconds_bucket", (("le", le),))] == n
    assert got[(prefix + "retry_budget_tokens", ())] == status["retry_budget"]["tokens"]
    assert got[(prefix + "tasks_completed_total", ())] == status["metrics"]["tasks_completed"]


def test_the_collector_registers_and_is_scraped():
    dispatcher, ports = busy_dispatcher()
    registry = CollectorRegistry()
    registry.register(DispatcherCollector(dispatcher))
    assert (
        registry.get_sample_value("necrocode_dispatch_queue_size")
        == (dispatcher.get_status()["queue_size"])
    )
    before = registry.get_sample_value("necrocode_dispatch_tasks_completed_total")
    running = ports.launcher.launches[-1]
    assert dispatcher.handle_runner_completion(running.runner_id, running.task_id, "spec-a", True)
    # Each scrape reads the dispatcher anew.
    assert registry.get_sample_value("necrocode_dispatch_tasks_completed_total") == before + 1
    text = generate_latest(registry).decode()
    assert 'necrocode_dispatch_pool_utilization{pool="gpu"}' in text


def test_a_fresh_dispatcher_exports_zeros_and_no_budget():
    dispatcher, _ = build()
    got = samples(dispatcher.export_prometheus())
    assert got[("necrocode_dispatch_backoff_delay_seconds_count", ())] == 0
    assert not any(name.startswith("necrocode_dispatch_retry_budget") for name, _ in got)
