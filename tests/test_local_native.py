"""The local launcher's pieces made in Rust: starting a task's shell
(``_core.spawn_shell``), waiting on it (``local._Shell``) and the event
log's lines (``_core.JsonLineLog``), each against what the Python they
replace did."""

import json
import math
import os
import signal
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest

from necrocode_dispatch import _core
from necrocode_dispatch.local import JsonlEventRecorder, LocalSlotPool, _Shell

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")


def test_spawned_shell_runs_in_its_directory_with_only_its_environment(tmp_path):
    out, err = tmp_path / "t.1.log", tmp_path / "t.1.err"
    out.write_text("a previous attempt's output\n")
    script = (
        'pwd; echo "$X|${HOME-unset}"; ps -o pgid= -p $$ | tr -d " "; '
        'ps -o sid= -p $$ | tr -d " "; echo warning >&2; read line; echo "stdin:$?"; '
        "grep SigIgn /proc/$$/status 2>/dev/null || echo SigIgn: 0; exit 7"
    )
    pid = _core.spawn_shell(script, str(tmp_path), {"X": "é 1"}, str(out), str(err))
    shell = _Shell(pid)
    assert shell.wait() == 7
    assert shell.poll() == 7 and shell.wait() == 7  # reaped once, remembered
    *lines, ignored = out.read_text().splitlines()
    # Its own session (so its own process group, and no terminal to stop on).
    assert lines == [str(tmp_path.resolve()), "é 1|unset", str(pid), str(pid), "stdin:1"]
    assert err.read_text() == "warning\n"
    # Python ignores SIGPIPE; the command has it back, as Popen gives it.
    assert not int(ignored.split(":")[1], 16) & (1 << (signal.SIGPIPE - 1))


def test_spawn_errors_are_the_errnos_oserror_naming_the_file(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(FileNotFoundError) as raised:
        _core.spawn_shell("true", tmp_path, {}, missing / "x.log", tmp_path / "x.err")
    assert raised.value.filename == str(missing / "x.log")
    with pytest.raises(FileNotFoundError) as raised:
        _core.spawn_shell("true", missing, {}, tmp_path / "o", tmp_path / "e")
    assert raised.value.filename == str(missing)
    clean = tmp_path / "clean"
    clean.mkdir()
    with pytest.raises(ValueError, match="env: 'A=B'"):
        _core.spawn_shell("true", clean, {"A=B": "1"}, clean / "o", clean / "e")
    with pytest.raises(ValueError, match="command: contains a NUL"):
        _core.spawn_shell("true\0", clean, {}, clean / "o", clean / "e")
    with pytest.raises(TypeError, match="env value"):
        _core.spawn_shell("true", clean, {"A": 1}, clean / "o", clean / "e")
    # A call refused for its arguments made no file.
    assert list(clean.iterdir()) == []


def test_shell_wait_times_out_and_two_threads_reap_it_once(tmp_path):
    pid = _core.spawn_shell("sleep 5", tmp_path, {}, tmp_path / "o", tmp_path / "e")
    shell = _Shell(pid)
    with pytest.raises(subprocess.TimeoutExpired):
        shell.wait(0.05)
    assert shell.poll() is None
    codes = []
    waiters = [threading.Thread(target=lambda: codes.append(shell.wait())) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    os.killpg(pid, signal.SIGTERM)
    for waiter in waiters:
        waiter.join(10)
    assert codes == [-signal.SIGTERM, -signal.SIGTERM]


def test_json_line_log_writes_what_json_dumps_would(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "earlier"}\n')
    log = _core.JsonLineLog(path)

    class Thing:
        def __str__(self):
            return "a thing"

    fields = {
        "text": 'quote " newline \n é ✓',
        "none": None,
        "yes": True,
        "no": False,
        "small": -3,
        "big": 2**70,
        "half": 0.5,
        "whole": 2.0,
        "nan": math.nan,
        "inf": -math.inf,
        "naive": datetime(2026, 1, 2, 3, 4, 5, 6),
        "aware": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        "list": [1, "two", None],
        "dict": {"k": datetime(2026, 1, 2)},
        "other": Thing(),
    }
    before = datetime.now()
    assert log.write("something", fields) is True
    log.close()
    assert log.closed and log.write("after", {}) is False
    earlier, line = (json.loads(text) for text in path.read_text().splitlines())
    assert earlier == {"event": "earlier"}
    assert list(line)[:3] == ["event", "time", "elapsed"]
    assert line["event"] == "something"
    assert before <= datetime.fromisoformat(line["time"]) <= datetime.now()
    assert 0 <= line["elapsed"] < 5
    # As the recorder wrote them: a datetime field in isoformat, anything
    # else JSON cannot hold as str().
    expected = json.loads(json.dumps(fields, default=str))
    expected["naive"], expected["aware"] = fields["naive"].isoformat(), fields["aware"].isoformat()
    rest = {k: v for k, v in line.items() if k not in ("event", "time", "elapsed")}
    assert list(rest) == list(fields)
    assert rest["nan"] != rest["nan"]  # NaN, as json.dumps writes it
    del rest["nan"], expected["nan"]
    assert rest == expected
    assert isinstance(rest["whole"], float)
    with pytest.raises(TypeError, match="fields key"):
        _core.JsonLineLog(tmp_path / "x.jsonl").write("e", {1: "x"})


def test_recorder_lines_from_many_threads_stay_whole(tmp_path):
    recorder = JsonlEventRecorder(tmp_path / "events.jsonl")

    def record(n):
        for i in range(200):
            recorder.record_task_failed("s", f"t{n}-{i}", "r", "x" * 5000, i)

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    events = JsonlEventRecorder.read(tmp_path / "events.jsonl")
    assert len(events) == 1600
    assert {e["task_id"] for e in events} == {f"t{n}-{i}" for n in range(8) for i in range(200)}


def test_slot_directory_removed_behind_the_pools_back_is_made_again(tmp_path):
    pool = LocalSlotPool(tmp_path, slots_per_repo=1)
    slot = pool.allocate_slot("repo")
    os.rmdir(slot.path)
    pool.release_slot(slot.slot_id)
    again = pool.allocate_slot("repo")
    assert again.path == slot.path and again.path.is_dir()


def test_empty_directory_removes_links_not_what_they_name(tmp_path):
    slot, outside = tmp_path / "slot", tmp_path / "outside"
    (slot / "build" / "deep").mkdir(parents=True)
    (slot / "build" / "deep" / "x").write_text("x")
    (slot / "file").write_text("y")
    outside.mkdir()
    (outside / "keep").write_text("z")
    (slot / "link").symlink_to(outside, target_is_directory=True)
    (slot / "dangling").symlink_to(tmp_path / "nowhere")
    _core.empty_directory(slot)
    assert list(slot.iterdir()) == []
    assert (outside / "keep").read_text() == "z"
    with pytest.raises(FileNotFoundError) as raised:
        _core.empty_directory(str(tmp_path / "gone"))
    assert str(tmp_path / "gone") in str(raised.value)
