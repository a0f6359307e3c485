"""What a new user of `necrocode-dispatch run` met (issue 15, "Why" 2-8 and
10): each test fails on the commit the issue was measured on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from necrocode_dispatch.local import _safe_name

from .test_cli import cli_args, events, read_state, run_cli, write_job

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")


def rows(result) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(result.stdout)["tasks"]}


def test_ids_that_clean_to_the_same_name_keep_their_own_logs(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {max_attempts: 1}}
        tasks:
          - {id: "x/y", command: "echo x/y >&2; exit 1"}
          - {id: "x_y", command: "echo x_y >&2; exit 1"}
          - {id: ".hidden", command: "echo .hidden >&2; exit 1"}
          - {id: "hidden", command: "echo hidden >&2; exit 1"}
        """,
    )
    result = run_cli(tmp_path, job, "--json")
    assert result.returncode == 1, result.stderr
    for task_id, row in rows(result).items():
        assert row["last_failure"] == f"exit code 1: {task_id}"
    logs = sorted(p.name for p in (tmp_path / "work" / "logs").iterdir())
    assert len(logs) == 8, logs  # a .log and a .err each
    names = {_safe_name(n) for n in ("x/y", "x_y", ".hidden", "hidden", "", "%", "a" * 300)}
    assert len(names) == 7 and not any(n.startswith(".") or "/" in n for n in names)


def test_the_failure_reason_is_the_last_line_of_stderr(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {max_attempts: 1}}
        tasks:
          - id: a
            command: echo "step 1 of 2"; echo "disk full" >&2; echo "step 2 of 2"; exit 4
          - {id: b, command: "echo only stdout; exit 5"}
        """,
    )
    result = run_cli(tmp_path, job, "--json")
    found = rows(result)
    assert found["a"]["last_failure"] == "exit code 4: disk full"
    assert found["b"]["last_failure"] == "exit code 5: only stdout"
    log = tmp_path / "work" / "logs" / "a.1.log"
    assert log.read_text() == "step 1 of 2\nstep 2 of 2\n"
    assert log.with_suffix(".err").read_text() == "disk full\n"


def test_command_timeouts_are_counted_in_the_metrics(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {max_attempts: 2, initial_delay: 0.05}}
        tasks:
          - {id: hangs, command: "sleep 30", timeout: 0.3}
        """,
    )
    result = run_cli(tmp_path, job, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["status"]["metrics"]["runner_timeouts"] == 2
    assert report["tasks"][0]["last_failure"] == "timeout after 0.3 s"


def test_a_resumed_command_sees_the_attempt_the_table_shows(tmp_path):
    """Killed while its first attempt runs, the run resumes: the command is
    started again as attempt 2 in its environment, its log name, the
    progress and the table."""
    seen = tmp_path / "attempts"
    job = write_job(
        tmp_path,
        f"""
        tasks:
          - id: a
            command: >-
              echo $NECROCODE_ATTEMPT >> {seen};
              [ $NECROCODE_ATTEMPT -ge 2 ] || exec sleep 60
        """,
    )
    state = tmp_path / "state.json"
    first = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet", "--state", str(state)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        # A whole line (the shell opens the file before it writes).
        while not (
            seen.exists()
            and seen.read_text().endswith("\n")
            and (read_state(state) or {}).get("process_groups")
        ):
            assert time.monotonic() < deadline, "the first attempt never started"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    result = run_cli(tmp_path, job, "--json", "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert seen.read_text() == "1\n2\n"
    assert rows(result)["a"]["attempts"] == 2
    assert (tmp_path / "work" / "logs" / "a.2.log").exists()


def test_a_state_file_of_another_job_is_refused_unless_starting_over(tmp_path):
    state = tmp_path / "state.json"
    marker = tmp_path / "B-ran"
    job_a = write_job(tmp_path, 'tasks:\n  - {id: build, command: "exit 3"}\n')
    assert run_cli(tmp_path, job_a, "--state", str(state)).returncode == 1
    job_b = tmp_path / "b.yaml"
    job_b.write_text(f'tasks:\n  - {{id: build, command: "touch {marker}"}}\n')
    refused = run_cli(tmp_path, job_b, "--state", str(state))
    assert refused.returncode == 2
    assert "written by another job" in refused.stderr and "--fresh" in refused.stderr
    assert not marker.exists()
    fresh = run_cli(tmp_path, job_b, "--state", str(state), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert marker.exists()
    # The file now belongs to job B: resuming B runs nothing again.
    marker.unlink()
    again = run_cli(tmp_path, job_b, "--state", str(state))
    assert again.returncode == 0 and not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "{tmp}/no/such/dir/state.json"], "cannot be written"),
        (["--state", "/proc/version"], "cannot be written"),
        (["--events", "{tmp}"], "--events {tmp}: is a directory"),
        (["--workdir", "{tmp}/a-file"], "--workdir {tmp}/a-file: not a directory"),
    ],
    ids=["state-missing-dir", "state-in-proc", "events-dir", "workdir-file"],
)
def test_bad_paths_are_refused_before_anything_runs(tmp_path, args, message):
    (tmp_path / "a-file").write_text("")
    job = write_job(tmp_path, "tasks:\n  - {id: a, command: 'touch MARKER'}\n")
    argv = [sys.executable, "-m", "necrocode_dispatch", "run", str(job), "--quiet"]
    if "--workdir" not in args:
        argv += ["--workdir", str(tmp_path / "work")]
    argv += [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("MARKER"))


def test_a_job_file_that_is_not_utf8_is_refused(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"tasks:\n  - {id: caf\xe9, command: 'touch MARKER'}\n")
    result = run_cli(tmp_path, job)
    assert result.returncode == 2
    assert "not UTF-8 text: byte 19 is 0xe9" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_while_a_large_job_file_loads_exits_130_quietly(tmp_path):
    job = tmp_path / "big.yaml"
    job.write_text(
        "tasks:\n" + "".join(f"  - {{id: t{i}, command: 'true'}}\n" for i in range(200_000))
    )
    run = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Inside YAML loading: past the imports (well under a second, even on a
    # busy machine), far from its end (about 15 s for 200,000 tasks).
    time.sleep(2.5)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    assert events(tmp_path) == []


def temp_dirs(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_the_temporary_workdir_goes_when_every_task_is_done(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    argv = [sys.executable, "-m", "necrocode_dispatch", "run", "--quiet"]
    ok = write_job(tmp_path, "tasks:\n  - {id: a, command: 'true'}\n")
    done = subprocess.run([*argv, str(ok)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert temp_dirs(tmp) == []
    assert "temporary work directory was removed" in done.stdout

    kept = subprocess.run(
        [*argv, "--keep-workdir", str(ok)], capture_output=True, text=True, env=env, timeout=60
    )
    assert kept.returncode == 0 and len(temp_dirs(tmp)) == 1
    assert f"command logs: {tmp}" in kept.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "dispatcher: {retry: {max_attempts: 1}}\ntasks:\n  - {id: a, command: 'exit 1'}\n"
    )
    failed = subprocess.run([*argv, str(bad)], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1 and len(temp_dirs(tmp)) == 2
    assert f"command logs: {tmp}" in failed.stdout


def test_a_state_file_may_live_in_the_work_directory_the_run_makes(tmp_path):
    job = write_job(tmp_path, "tasks:\n  - {id: a, command: 'true'}\n")
    state = tmp_path / "work" / "state.json"
    result = run_cli(tmp_path, job, "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert read_state(state)["tasks"]["a"]["state"] == "done"


def test_a_state_that_cannot_be_restored_is_refused_and_leaves_no_temporary_dir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    job = write_job(tmp_path, f"tasks:\n  - {{id: a, command: 'touch {tmp_path}/ran'}}\n")
    state = tmp_path / "state.json"
    # Well-formed, but its dispatcher part is not a snapshot of one.
    state.write_text(
        json.dumps(
            {
                "format": "necrocode-dispatch run state",
                "version": 1,
                "tasks": {},
                "dispatcher": {"records": "not a list"},
            }
        )
    )
    argv = [sys.executable, "-m", "necrocode_dispatch", "run", str(job), "--quiet"]
    result = subprocess.run(
        [*argv, "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    assert result.returncode == 2, result.stderr
    assert "cannot resume" in result.stderr
    assert not (tmp_path / "ran").exists()
    assert list(tmp.iterdir()) == []
