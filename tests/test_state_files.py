"""Snapshots, restores and state files (issue 7): round trips keep every
record, due times cross restarts as wall-clock times, broken files load
nothing, and a crash while saving leaves the previous file whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from necrocode_dispatch import ManualClock, RetryManager, TaskState

from .dispatcher_helpers import START as DISPATCHER_START
from .fakes import build, make_task

START = datetime(2026, 3, 1, 8, 0, 0)


def new_manager(clock: ManualClock) -> RetryManager:
    return RetryManager(
        max_attempts=3,
        initial_delay=10,
        clock=clock,
        non_retryable=["auth"],
        retry_budget={"capacity": 100, "retry_cost": 5},
    )


def populated(clock: ManualClock) -> RetryManager:
    """A manager with records in every condition: backing off, due, at the
    limit, given up as non-retryable, and a used retry budget."""
    m = new_manager(clock)
    m.record_failure("due", "exit 1")
    clock.advance(30)
    m.record_failure("backing-off", "exit 1")
    m.record_failure("backing-off", "exit 1")
    for _ in range(3):
        m.record_failure("at-limit", "oom")
    m.record_failure("no-reason")
    m.record_failure("denied", "auth: token expired")
    return m


def infos(m: RetryManager) -> dict:
    return {k: v.to_dict() for k, v in m.get_all_retry_info().items()}


def decisions(m: RetryManager) -> dict:
    return {k: m.should_retry(k) for k in m.get_all_retry_info()}


def test_a_round_trip_preserves_every_record_and_decision():
    clock = ManualClock(START)
    m = populated(clock)
    state = m.snapshot()
    assert state["format"] == "necrocode-dispatch retry state" and state["version"] == 1
    assert json.loads(json.dumps(state)) == state  # plain JSON data
    restored = new_manager(clock)
    restored.record_failure("replaced", "gone after the restore")
    restored.restore(state)
    assert infos(restored) == infos(m)
    assert decisions(restored) == decisions(m)
    assert restored.get_tasks_ready_for_retry() == m.get_tasks_ready_for_retry() == ["due"]
    assert restored.get_status() == m.get_status()
    for _ in range(4):
        clock.advance(10)
        assert restored.get_tasks_ready_for_retry() == m.get_tasks_ready_for_retry()
        assert decisions(restored) == decisions(m)
    assert restored.snapshot() == m.snapshot()


def test_due_times_cross_a_restart_as_wall_clock_times(tmp_path):
    clock = ManualClock(START)
    m = RetryManager(initial_delay=10, clock=clock)
    m.record_failure("t", "exit 1")  # due 10 s from now
    clock.advance(4)
    path = tmp_path / "retry.json"
    m.save(path)
    # A new process 4 s later by the wall clock: its monotonic clock starts
    # elsewhere, so only the wall-clock due time can carry over.
    later = ManualClock(START + timedelta(seconds=8))
    assert later.monotonic() != clock.monotonic()
    fresh = RetryManager(initial_delay=10, clock=later)
    fresh.load(str(path))
    assert fresh.get_retry_info("t") == m.get_retry_info("t")
    later.advance(1.999)
    assert not fresh.should_retry("t")
    later.advance(0.001)
    assert fresh.should_retry("t") and fresh.get_tasks_ready_for_retry() == ["t"]
    # The count carries on from the saved one.
    assert fresh.record_failure("t").retry_count == 2


def test_save_writes_no_stray_files(tmp_path):
    m = populated(ManualClock(START))
    path = tmp_path / "retry.json"
    m.save(path)
    m.save(path)
    assert os.listdir(tmp_path) == ["retry.json"]
    assert json.loads(path.read_text()) == m.snapshot()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text[: len(text) // 2], "ends early (truncated?)"),
        (lambda text: "", "ends early (truncated?)"),
        (
            lambda text: text.replace('"retry_count":2', '"retry_count":"two"'),
            "not valid retry state",
        ),
        (lambda text: text.replace("{", "[", 1), "not valid retry state"),
        (lambda text: text.replace("T08:00:30", "T8:0:30"), "is not an isoformat datetime"),
        (lambda text: text.replace("retry state", "something else"), "not a retry state"),
        (
            lambda text: text.replace('"version":1', '"version":9'),
            "unsupported retry state version 9",
        ),
        (lambda text: "\x00\xff garbage", "not valid retry state"),
    ],
)
def test_a_damaged_file_raises_a_clear_error_and_loads_nothing(tmp_path, damage, message):
    clock = ManualClock(START)
    path = tmp_path / "retry.json"
    populated(clock).save(path)
    path.write_text(damage(path.read_text()), errors="surrogateescape")
    m = RetryManager(clock=clock)
    m.record_failure("kept", "exit 1")
    before = infos(m)
    with pytest.raises(ValueError) as err:
        m.load(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert infos(m) == before


def test_restore_checks_the_whole_state_first():
    clock = ManualClock(START)
    state = populated(clock).snapshot()
    state["records"][-1]["gave_up"] = "bored"
    m = RetryManager(clock=clock)
    m.record_failure("kept")
    with pytest.raises(ValueError, match=r"gave_up .bored. is not a known reason"):
        m.restore(state)
    with pytest.raises(TypeError, match=r"state must be a dict"):
        m.restore([])
    with pytest.raises(FileNotFoundError, match=r"nothing-here\.json"):
        m.load("nothing-here.json")
    assert list(m.get_all_retry_info()) == ["kept"]


# An LD_PRELOAD shim: `rename` onto PAUSE_RENAME_TO writes PAUSE_MARKER and
# blocks, so the test can kill the process between the write and the rename.
_PAUSE_RENAME = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int rename(const char *from, const char *to) {
    const char *target = getenv("PAUSE_RENAME_TO");
    if (target && strcmp(to, target) == 0) {
        FILE *marker = fopen(getenv("PAUSE_MARKER"), "w");
        if (marker) { fputs(from, marker); fclose(marker); }
        for (;;) pause();
    }
    int (*real)(const char *, const char *) = dlsym(RTLD_NEXT, "rename");
    return real(from, to);
}
"""

_SAVER = """
import sys
from necrocode_dispatch import RetryManager
m = RetryManager()
for i in range(int(sys.argv[2])):
    m.record_failure(f"task-{i:05d}", "exit 1")
m.save(sys.argv[1])
"""


@pytest.fixture(scope="module")
def pause_rename(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("LD_PRELOAD shim: Linux only")
    if shutil.which("gcc") is None:
        pytest.skip("the LD_PRELOAD shim is compiled with gcc, which is not installed")
    out = tmp_path_factory.mktemp("shim")
    source = out / "pause_rename.c"
    source.write_text(_PAUSE_RENAME)
    library = out / "pause_rename.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    return library


def test_a_crash_between_write_and_rename_leaves_the_previous_file(tmp_path, pause_rename):
    path = tmp_path / "retry.json"
    previous = RetryManager(clock=ManualClock(START))
    previous.record_failure("before-the-crash", "exit 1")
    previous.save(path)
    before = path.read_bytes()
    marker = tmp_path / "paused"
    env = dict(
        os.environ,
        LD_PRELOAD=str(pause_rename),
        PAUSE_RENAME_TO=str(path),
        PAUSE_MARKER=str(marker),
    )
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), "2000"], env=env)
    try:
        deadline = time.monotonic() + 60
        # Waiting on another process: poll until the shim has named the
        # temporary file (its fclose makes the whole name appear at once).
        while not (marker.exists() and marker.read_text().endswith(".tmp")):
            assert proc.poll() is None, "the saver ended without reaching the rename"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        temporary = marker.read_text()
        # The new state was written in full beside the file...
        assert len(json.loads(open(temporary).read())["records"]) == 2000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # ...and the crash before the rename left the previous file as it was.
    assert path.read_bytes() == before
    m = RetryManager()
    m.load(path)
    assert list(m.get_all_retry_info()) == ["before-the-crash"]
    # A later save is not disturbed by the leftover temporary file.
    os.remove(temporary)
    m.record_failure("after")
    m.save(path)
    assert sorted(json.loads(path.read_text())["records"][i]["task_id"] for i in range(2)) == [
        "after",
        "before-the-crash",
    ]


def test_the_dispatcher_snapshot_brings_delayed_tasks_back_on_time(tmp_path):
    dispatcher, ports = build([make_task("t1"), make_task("t2")], retry_initial_delay=30)
    dispatcher.tick()
    for launch in ports.launcher.launches:
        dispatcher.handle_runner_completion(
            launch.runner_id, launch.task_id, "spec-a", False, failure_reason="exit 1"
        )
    ports.clock.advance(10)
    path = tmp_path / "dispatcher.json"
    dispatcher.save(path)
    state = json.loads(path.read_text())
    assert state["format"] == "necrocode-dispatch dispatcher state"
    assert [d["task_id"] for d in state["delayed"]] == ["t1", "t2"]

    # A restart 5 s later: a new dispatcher, a new registry with the same tasks.
    clock = ManualClock(DISPATCHER_START + timedelta(seconds=15))
    again, ports2 = build([make_task("t1"), make_task("t2")], clock=clock, retry_initial_delay=30)
    again.load(path)
    assert again.get_status()["retry_info"]["t1"]["retry_count"] == 1
    again.tick()  # polls the tasks: they wait for the rest of their backoff
    assert ports2.launcher.launches == []
    assert again.get_task_place("t1") == "delayed"
    clock.advance(14.9)
    again.tick()
    assert ports2.launcher.launches == []
    clock.advance(0.1)
    again.tick()
    assert sorted(x.task_id for x in ports2.launcher.launches) == ["t1", "t2"]
    launch = ports2.launcher.launches[0]
    again.handle_runner_completion(
        launch.runner_id, launch.task_id, "spec-a", False, failure_reason="x"
    )
    assert again.retry_manager.get_retry_count(launch.task_id) == 2
    assert ports2.registry.states[launch.task_id] is TaskState.READY


def test_a_broken_dispatcher_state_changes_nothing(tmp_path):
    dispatcher, ports = build([make_task("t1")])
    dispatcher.tick()
    launch = ports.launcher.launches[0]
    dispatcher.handle_runner_completion(launch.runner_id, "t1", "spec-a", False, failure_reason="x")
    state = dispatcher.snapshot()
    state["retry"]["records"][0]["due_at"] = "soon"
    fresh, _ = build()
    with pytest.raises(ValueError, match="retry: records\\[0\\]"):
        fresh.restore(state)
    assert fresh.get_status()["delayed"] == [] and fresh.get_status()["retry_info"] == {}


def test_a_dispatcher_holding_tasks_refuses_a_restore():
    dispatcher, _ = build([make_task("t1")])
    state = dispatcher.snapshot()
    dispatcher.tick()
    before = dispatcher.get_status()
    with pytest.raises(ValueError, match="holds no task yet; this one holds 1"):
        dispatcher.restore(state)
    assert dispatcher.get_status() == before


# -- issue 12, findings 10 and 11 ---------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="symlinks and modes are POSIX")
def test_a_planted_symlink_at_a_temporary_name_redirects_nothing(tmp_path):
    """The temporary names are not predictable, and a file created there is
    opened exclusively without following links: a planted link is not used."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    manager = populated(ManualClock(START))
    target = tmp_path / "state.json"
    # Every name the old scheme (.NAME.PID.N.tmp) would have used, planted.
    for n in range(50):
        (tmp_path / f".state.json.{os.getpid()}.{n}.tmp").symlink_to(victim)
    for _ in range(5):
        manager.save(target)
    assert victim.read_text() == "precious"
    assert json.loads(target.read_text())["format"] == "necrocode-dispatch retry state"


@pytest.mark.skipif(os.name != "posix", reason="symlinks and modes are POSIX")
def test_a_state_file_keeps_its_mode_and_a_symlinked_one_is_written_through(tmp_path):
    clock = ManualClock(START)
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    manager = populated(clock)
    manager.save(real)
    real.chmod(0o600)
    link.symlink_to(real)
    clock.advance(5)
    manager.record_failure("new", "exit 1")
    manager.save(link)
    assert link.is_symlink()
    assert (real.stat().st_mode & 0o777) == 0o600
    restored = new_manager(ManualClock(START))
    restored.load(real)
    assert "new" in restored


def _saved_dispatcher_state(tmp_path):
    dispatcher, ports = build([make_task("a")], retry_initial_delay=10)
    ports.launcher.fail_tasks.add("a")
    dispatcher.tick()
    return dispatcher.snapshot()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["delayed"][0].update(due_at="2031-01-01T00:00:00"), "disagrees"),
        (lambda s: s["retry"]["records"][0].update(retry_count=99), "max_attempts"),
        (lambda s: s.update(saved_at="yesterday"), "saved_at"),
        (lambda s: s["retry"].update(saved_at="yesterday"), "saved_at"),
        (lambda s: s["retry"]["records"].clear(), "no retry record"),
        (
            lambda s: s["retry"]["records"][0].update(retry_count="one"),
            'retry.records[0] ("a"): invalid type',
        ),
        (lambda s: s["delayed"][0].pop("due_at"), 'delayed[0] ("a"): missing field `due_at`'),
    ],
)
def test_a_restore_refuses_a_contradiction_naming_the_field(tmp_path, change, message):
    state = _saved_dispatcher_state(tmp_path)
    change(state)
    fresh, _ = build()
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        fresh.restore(state)
    assert "line 1 column" not in str(raised.value)
    assert fresh.get_status()["delayed"] == []
    assert len(fresh.retry_manager) == 0


def test_a_lone_surrogate_id_is_refused_naming_the_argument():
    manager = RetryManager()
    with pytest.raises(ValueError, match="task_id"):
        manager.record_failure("bad\udc80id")
    dispatcher, _ = build()
    with pytest.raises(ValueError, match="task_id"):
        dispatcher.handle_task_failure("bad\udc80id", "spec")
    assert len(manager) == 0


def test_a_binary_state_file_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RetryManager().load(path)
    dispatcher, _ = build()
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dispatcher.load(path)
