"""Task dependencies (issue 15): `depends_on` in job files, the local
registry holding a task BLOCKED until what it depends on is done, skipping
the dependents of a task that failed for good, and the graph check that
refuses unknown ids and cycles before anything runs."""

import json
import os

import pytest

from necrocode_dispatch import Task, TaskState
from necrocode_dispatch._core import check_dependencies
from necrocode_dispatch.job import JobError, parse_job
from necrocode_dispatch.local import InMemoryTaskRegistry

from .fakes import build
from .test_cli import events, run_cli, write_job


def diamond() -> list[Task]:
    """a -> b, a -> c, b and c -> d (an arrow reads "is needed by")."""
    return [
        Task(id="a"),
        Task(id="b", dependencies=["a"]),
        Task(id="c", dependencies=["a"]),
        Task(id="d", dependencies=["b", "c"]),
    ]


def ids(tasks) -> list[str]:
    return sorted(t.id for t in tasks)


def report(registry, task_id, state, **metadata):
    registry.update_task_state("spec", task_id, state, metadata)


# ---- the registry ---------------------------------------------------------------------


def test_a_task_is_ready_once_everything_it_depends_on_is_done():
    registry = InMemoryTaskRegistry(diamond(), incremental=True)
    assert ids(registry.poll_ready_tasks()) == ["a"]
    assert registry.get_state("d") is TaskState.BLOCKED
    report(registry, "a", TaskState.DONE)
    assert ids(registry.poll_ready_tasks()) == ["b", "c"]
    report(registry, "b", TaskState.DONE)
    assert registry.poll_ready_tasks() == []
    report(registry, "c", TaskState.DONE)
    assert ids(registry.poll_ready_tasks()) == ["d"]
    assert registry.get_history("d")[-1].metadata == {"dependencies_met": True}


def test_a_report_delivered_twice_counts_once():
    # Reports arrive at least once (SPEC §9): a repeated DONE for b must not
    # stand in for c.
    registry = InMemoryTaskRegistry(diamond())
    report(registry, "a", TaskState.DONE)
    report(registry, "b", TaskState.DONE)
    report(registry, "b", TaskState.DONE)
    assert registry.get_state("d") is TaskState.BLOCKED


def test_the_dependents_of_a_failed_task_are_skipped_naming_it():
    changes = []
    registry = InMemoryTaskRegistry(
        [*diamond(), Task(id="e", dependencies=["d"])],
        listener=lambda task_id, state, metadata: changes.append((task_id, state, metadata)),
    )
    report(registry, "a", TaskState.DONE)
    report(registry, "b", TaskState.FAILED, reason="exit code 1")
    for skipped in ("d", "e"):
        assert registry.get_state(skipped) is TaskState.FAILED
        last = registry.get_history(skipped)[-1].metadata
        assert last["skipped"] is True
        assert last["failed_dependency"] == "b"
    # c does not depend on b: it runs, and its DONE changes nothing for d.
    assert registry.get_state("c") is TaskState.READY
    report(registry, "c", TaskState.DONE)
    assert registry.get_state("d") is TaskState.FAILED
    assert registry.all_finished()
    assert [(t, s) for t, s, m in changes if m.get("skipped")] == [
        ("d", TaskState.FAILED),
        ("e", TaskState.FAILED),
    ]


def test_a_restored_registry_works_out_what_waits_again():
    first = InMemoryTaskRegistry(diamond())
    report(first, "a", TaskState.DONE)
    report(first, "b", TaskState.DONE)
    saved = first.snapshot()
    second = InMemoryTaskRegistry(diamond(), incremental=True)
    second.restore(saved)
    assert ids(second.poll_ready_tasks()) == ["c"]
    assert second.get_state("d") is TaskState.BLOCKED
    report(second, "c", TaskState.DONE)
    assert second.get_state("d") is TaskState.READY


def test_priority_holds_among_ready_tasks_once_dependencies_are_done():
    # One slot, tick by tick: a (priority 5) runs; y (1) waits. When a is
    # done, b (9), which depends on it, is ready and goes before y.
    dispatcher, ports = build(pools=(("one", 1),))
    registry = InMemoryTaskRegistry(
        [
            Task(id="a", priority=5),
            Task(id="b", priority=9, dependencies=["a"]),
            Task(id="y", priority=1),
        ],
        incremental=True,
    )
    dispatcher.task_source = dispatcher.task_registry = registry
    dispatcher.tick()
    assert ports.launcher.order() == ["a"]
    dispatcher.handle_runner_completion("runner-1", success=True)
    dispatcher.tick()
    dispatcher.handle_runner_completion("runner-2", success=True)
    dispatcher.tick()
    assert ports.launcher.order() == ["a", "b", "y"]


# ---- the graph check and job files ------------------------------------------------------


def test_the_graph_check_names_unknown_ids_and_spells_cycles():
    unknown, cycles = check_dependencies({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["zz", "a"]})
    assert unknown == [("d", "zz")]
    assert cycles == [["a", "b", "c", "a"]]
    assert check_dependencies({"a": ["a"]}) == ([], [["a", "a"]])
    assert check_dependencies({"a": [], "b": ["a"]}) == ([], [])
    with pytest.raises(TypeError, match="a dependency"):
        check_dependencies({"a": [1]})


def job(tasks: str) -> dict:
    import yaml

    return yaml.safe_load(f"tasks:\n{tasks}")


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            "- {id: a, command: 'true', depends_on: [c]}\n"
            "- {id: b, command: 'true', depends_on: [a]}\n"
            "- {id: c, command: 'true', depends_on: [b]}\n",
            "a dependency cycle can never run: a -> c -> b -> a",
        ),
        ("- {id: a, command: 'true', depends_on: a}\n", "a -> a"),
        (
            "- {id: a, command: 'true'}\n- {id: b, command: 'true', depends_on: [a, typo]}\n",
            "tasks[1] ('b').depends_on: no task 'typo' in the job",
        ),
        ("- {id: a, command: 'true', depends_on: {x: 1}}\n", "must be a task id or a list"),
        ("- {id: a, command: 'true', depends_on: [1]}\n", "depends_on[0]: must be a non-empty"),
    ],
)
def test_bad_dependencies_are_refused_naming_them(tasks, message):
    with pytest.raises(JobError) as caught:
        parse_job(job(tasks))
    assert message in str(caught.value)


def test_depends_on_reaches_the_tasks():
    parsed = parse_job(job("- {id: a, command: 'true'}\n- {id: b, command: x, depends_on: a}\n"))
    assert [t.dependencies for t in parsed.tasks] == [[], ["a"]]


# ---- the main job ---------------------------------------------------------------------

pytestmark_posix = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")


@pytestmark_posix
def test_a_diamond_with_a_failing_branch_skips_what_waits_for_it(tmp_path):
    marker = tmp_path / "d-ran"
    job_file = write_job(
        tmp_path,
        f"""
        dispatcher:
          retry: {{max_attempts: 2, initial_delay: 0.05}}
        tasks:
          - {{id: a, command: "true"}}
          - {{id: b, command: "echo broken >&2; exit 3", depends_on: [a]}}
          - {{id: c, command: "true", depends_on: [a]}}
          - {{id: d, command: "touch {marker}", depends_on: [b, c]}}
        """,
    )
    result = run_cli(tmp_path, job_file, "--json")
    assert result.returncode == 1, result.stderr
    rows = {r["id"]: r for r in json.loads(result.stdout)["tasks"]}
    assert {t: r["outcome"] for t, r in rows.items()} == {
        "a": "done",
        "b": "failed",
        "c": "done",
        "d": "skipped",
    }
    assert rows["d"]["attempts"] == 0
    assert rows["d"]["last_failure"] == "skipped: dependency 'b' failed"
    assert not marker.exists()
    skipped = events(tmp_path, "task_skipped")
    assert [(e["task_id"], e["failed_dependency"]) for e in skipped] == [("d", "b")]
    started = [e["task_id"] for e in events(tmp_path, "task_assigned")]
    assert "d" not in started
    assert started.index("a") < min(started.index("b"), started.index("c"))

    table = run_cli(tmp_path / "again", job_file)
    assert table.returncode == 1
    assert "skipped: dependency 'b' failed" in table.stdout


@pytestmark_posix
def test_dependents_get_no_head_start_over_queued_tasks(tmp_path):
    # One slot: a runs first (priority 5); x, released by a's completion,
    # has priority 0 and runs after y and z (priority 1), which were queued
    # all along: becoming ready late gives no place ahead of them.
    job_file = write_job(
        tmp_path,
        """
        agent_pools:
          one: {type: local-process, max_concurrency: 1}
        tasks:
          - {id: a, command: "true", priority: 5}
          - {id: x, command: "true", priority: 0, depends_on: [a]}
          - {id: y, command: "true", priority: 1}
          - {id: z, command: "true", priority: 1}
        """,
    )
    result = run_cli(tmp_path, job_file)
    assert result.returncode == 0, result.stderr
    assert [e["task_id"] for e in events(tmp_path, "task_assigned")] == ["a", "y", "z", "x"]


@pytestmark_posix
def test_a_cycle_is_a_bad_job_file(tmp_path):
    job_file = write_job(
        tmp_path,
        """
        tasks:
          - {id: build, command: "true", depends_on: [deploy]}
          - {id: test, command: "true", depends_on: [build]}
          - {id: deploy, command: "true", depends_on: [test]}
        """,
    )
    result = run_cli(tmp_path, job_file)
    assert result.returncode == 2
    assert "build -> deploy -> test -> build" in result.stderr
    assert not (tmp_path / "work" / "events.jsonl").exists()
