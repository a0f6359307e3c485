"""The `--state` journal (issue 14, item 7): O(1) per change, compacted,
a torn last line ignored, the earlier single-JSON form still read."""

import json

import pytest

from necrocode_dispatch import TaskState
from necrocode_dispatch.local import InMemoryTaskRegistry
from necrocode_dispatch.run_state import MIN_LINES, RunState, StateFileError

from .fakes import build, make_task


def setup(tmp_path, n=3):
    registry = InMemoryTaskRegistry([make_task(f"t{i}") for i in range(n)])
    dispatcher, _ = build()
    state = RunState(tmp_path / "state.jsonl", "job.yaml")
    state.save(registry, dispatcher)
    return registry, dispatcher, state


def change(state, registry, dispatcher, task_id, new_state, metadata=None):
    registry.update_task_state("spec", task_id, new_state, metadata or {})
    state.record(task_id, new_state, metadata or {}, registry, dispatcher)


def test_each_change_appends_one_line_and_a_reload_replays_them(tmp_path):
    registry, dispatcher, state = setup(tmp_path)
    before = len(state.path.read_text().splitlines())
    change(state, registry, dispatcher, "t0", TaskState.RUNNING, {"runner_id": "r"})
    change(state, registry, dispatcher, "t0", TaskState.DONE, {"runner_id": "r"})
    assert len(state.path.read_text().splitlines()) == before + 2
    loaded = RunState(state.path, "job.yaml").load()
    assert loaded["tasks"]["t0"]["state"] == "done"
    assert [h["state"] for h in loaded["tasks"]["t0"]["history"]] == ["running", "done"]
    assert loaded["tasks"]["t1"]["state"] == "ready"


def test_a_torn_last_line_is_ignored_and_an_earlier_one_refused(tmp_path):
    registry, dispatcher, state = setup(tmp_path)
    change(state, registry, dispatcher, "t0", TaskState.RUNNING)
    with open(state.path, "a") as f:
        f.write('{"t": "change", "task": "t0", "sta')  # killed mid-write
    assert RunState(state.path, "").load()["tasks"]["t0"]["state"] == "running"
    lines = state.path.read_text().splitlines()
    lines.insert(2, "{broken")
    state.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StateFileError, match="line 3 is not JSON"):
        RunState(state.path, "").load()


def test_the_journal_is_compacted_so_it_stays_small(tmp_path):
    registry, dispatcher, state = setup(tmp_path, n=2)
    for _ in range(MIN_LINES * 3):
        change(state, registry, dispatcher, "t0", TaskState.RUNNING)
    assert len(state.path.read_text().splitlines()) <= MIN_LINES + 4
    loaded = RunState(state.path, "").load()
    assert len(loaded["tasks"]["t0"]["history"]) == MIN_LINES * 3


def test_the_earlier_single_json_form_is_still_read(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps(
            {
                "format": "necrocode-dispatch run state",
                "version": 1,
                "job": "job.yaml",
                "tasks": {"a": {"state": "done", "history": []}},
                "dispatcher": {},
            }
        )
    )
    assert RunState(path, "").load()["tasks"]["a"]["state"] == "done"
