"""`necrocode-dispatch run JOBFILE` as a subprocess on small job files: exit
codes, retries and their delays, timeouts, bad job files, pool limits (all
checked from the event log), --json, and Ctrl-C."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from necrocode_dispatch.local import JsonlEventRecorder
from necrocode_dispatch.run_state import RunState, StateFileError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")


def write_job(tmp_path: Path, text: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(text))
    return job


def cli_args(tmp_path, job, *extra):
    """`necrocode-dispatch run JOB` with its work directory in `tmp_path`."""
    return [
        sys.executable,
        "-m",
        "necrocode_dispatch",
        "run",
        str(job),
        "--workdir",
        str(tmp_path / "work"),
        *extra,
    ]


def run_cli(tmp_path, job, *extra, timeout=60):
    return subprocess.run(
        cli_args(tmp_path, job, "--quiet", *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Terminal(io.StringIO):
    """A stream that says it is a terminal: progress draws its status line."""

    def isatty(self):
        return True


def events(tmp_path, kind=None):
    path = tmp_path / "work" / "events.jsonl"
    found = JsonlEventRecorder.read(path) if path.exists() else []
    return [e for e in found if kind is None or e["event"] == kind]


def group_is_gone(pid: int, within: float = 5.0) -> bool:
    """Whether process group `pid` has no process left (killed processes may
    linger briefly as zombies until they are reaped)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_all_tasks_succeed_exit_0(tmp_path):
    job = write_job(
        tmp_path,
        """
        tasks:
          - {id: a, command: "echo one"}
          - {id: b, command: "true"}
          - {id: c, command: "exit 0", priority: 3}
        """,
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "attempts", "outcome", "last", "failure"]
    assert {tuple(line.split()[:3]) for line in lines[1:4]} == {
        ("a", "1", "done"),
        ("b", "1", "done"),
        ("c", "1", "done"),
    }
    assert sorted(e["task_id"] for e in events(tmp_path, "task_completed")) == ["a", "b", "c"]
    assert (tmp_path / "work" / "logs" / "a.1.log").read_text() == "one\n"


def test_a_flaky_task_is_retried_with_delays_growing_by_the_base(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher:
          retry: {max_attempts: 4, initial_delay: 0.2, backoff_base: 3, max_delay: 60}
        tasks:
          - id: flaky
            command: '[ "$NECROCODE_ATTEMPT" -ge 3 ] || { echo "not yet" >&2; exit 7; }'
        """,
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:3] == ["flaky", "3", "done"]
    failures = [e for e in events(tmp_path, "runner_finished") if not e["success"]]
    assert [e["failure_reason"] for e in failures] == ["exit code 7: not yet"] * 2
    starts = [e["elapsed"] for e in events(tmp_path, "task_assigned")]
    assert len(starts) == 3
    waits = [
        start - failure["elapsed"] for start, failure in zip(starts[1:], failures, strict=True)
    ]
    # 0.2 s, then 0.2 * 3 = 0.6 s; never early, and picked up when due.
    for waited, delay in zip(waits, [0.2, 0.6], strict=True):
        assert delay - 0.01 <= waited < delay + 0.5, waits


def test_a_task_that_keeps_failing_fails_the_run(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {max_attempts: 2, initial_delay: 0.05}}
        tasks:
          - {id: ok, command: "true"}
          - {id: broken, command: "echo 'permission denied' >&2; exit 2"}
        """,
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("broken"))
    assert row.split()[:3] == ["broken", "2", "failed"]
    assert row.endswith("exit code 2: permission denied")
    (failed,) = events(tmp_path, "task_failed")
    assert failed["retry_count"] == 2 and failed["task_id"] == "broken"


def test_a_hanging_task_is_killed_at_its_timeout_and_retried(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {initial_delay: 0.1}}
        tasks:
          - id: hangs
            timeout: 0.5
            command: '[ "$NECROCODE_ATTEMPT" -ge 2 ] || sleep 60; echo fine'
        """,
    )
    began = time.monotonic()
    result = run_cli(tmp_path, job)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 30
    first, second = events(tmp_path, "runner_finished")
    # The launcher decides the timeout by its own clock, from the moment it
    # started the command, and says "timeout after 0.5 s" only once that
    # clock has passed 0.5 s. The core's execution time counts from when it
    # tracked the runner, a moment later, so it is not held to 0.5 s here
    # (it measured 0.492-0.4998 s in 2 runs of 18): only that the kill came
    # soon after.
    assert first["success"] is False and first["failure_reason"] == "timeout after 0.5 s"
    assert first["execution_time_seconds"] < 3
    assert second["success"] is True
    started = events(tmp_path, "runner_started")
    assert group_is_gone(started[0]["pid"]), "the hung command's process group is killed"


# A task that would leave a trace if anything ran.
TOUCH = "tasks:\n  - {id: a, command: 'touch MARKER'}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks:\n  - {id: a}\n", "tasks[0] ('a').command: missing"),
        (
            "agent_pools: {cpu: {max_concurrency: 1}}\nskill_mapping: {ml: [gpu]}\n" + TOUCH,
            "skill_mapping.ml: no pool named 'gpu'",
        ),
        (
            "agent_pools: {cpu: {max_concurrency: -1}}\n" + TOUCH,
            "agent_pools.cpu.max_concurrency: must be >= 0, got -1",
        ),
        ("tasks: [ {id: a, command: 'touch MARKER'\n", "not valid YAML at line"),
        ("tasks:\n  - {id: a, comand: 'touch MARKER'}\n", "tasks[0] ('a'): unknown key 'comand'"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("dispatcher: {retry: {backoff_base: -2}}\n" + TOUCH, "backoff_base"),
        (
            "agent_pools: {gpu: {type: docker}}\n" + TOUCH,
            "agent_pools.gpu.type: 'docker' pools cannot run here",
        ),
        (
            "dispatcher: {retry: {jitter: sometimes}}\n" + TOUCH,
            "config.retry_jitter must be one of 'none', 'full', 'equal', 'decorrelated'",
        ),
        (
            "agent_pools: {cpu: {max_concurrency: 0}}\n" + TOUCH,
            "agent_pools: every pool is disabled or has max_concurrency 0",
        ),
        (
            "agent_pools: {cpu: {max_concurrency: 2}, gpu: {max_concurrency: 1, enabled: false}}\n"
            "skill_mapping: {ml: [gpu]}\n"
            "tasks:\n  - {id: a, command: 'touch MARKER'}\n"
            "  - {id: b, command: 'true', required_skill: ml}\n",
            "tasks[1] ('b'): no pool can run it: skill_mapping.ml names 'gpu'",
        ),
        ("dispatcher: {poll_interval: 0}\n" + TOUCH, "dispatcher.poll_interval: must be > 0"),
        (
            "dispatcher: {heartbeat_timeout: 0}\n" + TOUCH,
            "dispatcher.heartbeat_timeout: must be > 0",
        ),
        (
            "tasks:\n  - {id: a, command: 'touch MARKER', priority: 1180591620717411303424}\n",
            "tasks[0] ('a').priority: must be at most 2**63 - 1",
        ),
        (
            'tasks:\n  - {id: "a\\nb", command: "touch MARKER"}\n',
            "must not contain control characters (such as a newline)",
        ),
        (
            "tasks:\n  - {id: a, command: 'touch MARKER; " + "x" * 140_000 + "'}\n",
            "tasks[0] ('a').command: 140,",
        ),
        (
            "tasks:\n  - {id: a, command: 'touch MARKER', depends_on: [b]}\n"
            "  - {id: b, command: 'true', depends_on: [a]}\n",
            "a dependency cycle can never run: a -> b -> a",
        ),
    ],
    ids=[
        "missing-command",
        "unknown-pool",
        "negative-concurrency",
        "not-yaml",
        "typo",
        "not-mapping",
        "bad-retry",
        "docker",
        "bad-jitter",
        "zero-capacity",
        "skill-only-disabled",
        "poll-interval-0",
        "heartbeat-timeout-0",
        "priority-2**70",
        "newline-in-id",
        "command-too-long",
        "cycle",
    ],
)
def test_a_bad_job_file_exits_2_and_runs_nothing(tmp_path, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    result = run_cli(tmp_path, job)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith(f"necrocode-dispatch: {job}: ")
    assert result.stdout == ""
    assert not list(tmp_path.rglob("MARKER"))
    assert events(tmp_path) == []


def test_pool_concurrency_is_never_exceeded(tmp_path):
    job = write_job(
        tmp_path,
        textwrap.dedent(
            """
            dispatcher: {max_global_concurrency: 3}
            agent_pools:
              small: {max_concurrency: 2}
              big: {max_concurrency: 5}
            skill_mapping: {slow: [small], default: [big]}
            tasks:
            """
        )
        + "".join(
            f"  - {{id: s{i}, command: 'sleep 0.2', required_skill: slow}}\n" for i in range(6)
        )
        + "".join(f"  - {{id: b{i}, command: 'sleep 0.1'}}\n" for i in range(6)),
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 0, result.stderr
    pool_of = {}
    running = {"small": 0, "big": 0}
    peak = {"small": 0, "big": 0, "all": 0}
    for event in events(tmp_path):
        if event["event"] == "runner_started":
            pool_of[event["runner_id"]] = event["pool_name"]
            running[event["pool_name"]] += 1
        elif event["event"] == "runner_finished":
            running[pool_of[event["runner_id"]]] -= 1
        for pool in ("small", "big"):
            peak[pool] = max(peak[pool], running[pool])
        peak["all"] = max(peak["all"], sum(running.values()))
    assert peak["small"] <= 2 and peak["all"] <= 3
    assert peak["all"] == 3, "the limits were reached, not just respected"
    assert {pool_of[e["runner_id"]] for e in events(tmp_path, "runner_started")} == {"small", "big"}


def test_json_output(tmp_path):
    job = write_job(
        tmp_path,
        """
        dispatcher: {retry: {max_attempts: 1}}
        tasks:
          - {id: good, command: "true"}
          - {id: bad, command: "exit 4"}
        """,
    )
    result = run_cli(tmp_path, job, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["exit_code"] == 1 and report["interrupted"] is False
    outcomes = {t["id"]: (t["outcome"], t["attempts"], t["last_failure"]) for t in report["tasks"]}
    assert outcomes == {"good": ("done", 1, None), "bad": ("failed", 1, "exit code 4")}
    assert report["status"]["metrics"]["tasks_completed"] == 1
    assert report["status"]["global_running_count"] == 0
    assert Path(report["events"]).exists()


def test_ctrl_c_stops_running_commands_and_exits_130(tmp_path):
    job = write_job(
        tmp_path,
        """
        tasks:
          - {id: forever, command: "sleep 600"}
          - {id: quick, command: "true"}
        """,
    )
    proc = subprocess.Popen(
        cli_args(tmp_path, job),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            started = [e for e in events(tmp_path, "runner_started") if e["task_id"] == "forever"]
            done = events(tmp_path, "task_completed")
            if started and done:
                break
            time.sleep(0.05)
        assert started, "the long command never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:3]}
    assert rows == {"forever": ["1", "interrupted"], "quick": ["1", "done"]}
    assert "interrupted (SIGINT)" in out
    assert group_is_gone(started[0]["pid"])
    (finished,) = [e for e in events(tmp_path, "runner_finished") if e["task_id"] == "forever"]
    assert finished["failure_reason"] == "interrupted"


def test_the_console_script_and_module_agree():
    script = Path(sys.executable).parent / "necrocode-dispatch"
    module = subprocess.run(
        [sys.executable, "-m", "necrocode_dispatch", "--help"], capture_output=True, text=True
    )
    assert module.returncode == 0 and "run" in module.stdout
    if script.exists():
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert result.stdout == module.stdout


def test_importing_the_package_does_not_import_the_cli():
    code = (
        "import sys, necrocode_dispatch; "
        "print(sorted(m for m in ('necrocode_dispatch.cli', 'necrocode_dispatch.local', "
        "'necrocode_dispatch.job', 'yaml', 'argparse') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_the_example_job_prints_the_table_the_readme_shows(tmp_path):
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("```text\n", 1)[1].split("```", 1)[0]
    result = run_cli(tmp_path, root / "examples" / "flaky-job.yaml")
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(block)


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_otherwise():
    from necrocode_dispatch.cli import Progress
    from necrocode_dispatch.models import TaskState

    for stream in (Terminal(), io.StringIO()):
        progress = Progress(stream, ["a", "bb"], max_attempts=3)
        progress.on_change("a", TaskState.RUNNING, {"pool_name": "local"})
        progress.on_change(
            "a", TaskState.READY, {"retry_count": 1, "failure_reason": "exit code 1"}
        )
        progress.on_change("a", TaskState.RUNNING, {"pool_name": "local"})
        progress.on_change("a", TaskState.DONE, {})
        progress.finish()
        text = stream.getvalue()
        assert "a   started    attempt 2 on local" in text
        assert "a   failed     exit code 1 [1/3]" in text
        assert "a   done       after 2 attempt(s)" in text
        bar = "[############............] 1/2  done 1"
        assert (bar in text) is isinstance(stream, Terminal)
        assert ("\x1b[K" in text) is isinstance(stream, Terminal)


def test_quiet_progress_shows_nothing_even_on_a_terminal():
    from necrocode_dispatch.cli import Progress
    from necrocode_dispatch.models import TaskState

    stream = Terminal()
    progress = Progress(stream, ["a"], max_attempts=3, quiet=True)
    progress.on_change("a", TaskState.RUNNING, {"pool_name": "local"})
    progress.on_change("a", TaskState.DONE, {})
    progress.redraw()
    progress.finish()
    assert stream.getvalue() == ""


def test_the_status_line_shows_running_and_waiting_tasks_and_fits_the_terminal():
    from necrocode_dispatch.cli import Progress
    from necrocode_dispatch.models import TaskState

    stream = Terminal()
    progress = Progress(stream, ["build", "test"], max_attempts=3, columns=lambda: 200)
    progress.on_change("build", TaskState.RUNNING, {"pool_name": "local"})
    progress.on_change("test", TaskState.RUNNING, {"pool_name": "local"})
    due = (datetime.now() + timedelta(seconds=30)).isoformat()
    progress.on_change(
        "test",
        TaskState.READY,
        {"retry_count": 1, "failure_reason": "exit code 1", "next_retry_at": due},
    )
    progress.redraw()
    status = stream.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert "running 1 · retry-wait 1  | build 0s, test retry in " in status, status
    assert float(status.rsplit(" in ", 1)[1].rstrip("s")) > 29
    # At 50 columns the line is cut, not wrapped (a wrapped line leaves
    # fragments behind when it is redrawn).
    progress.columns = lambda: 50
    progress.redraw()
    status = stream.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert len(status) == 49 and status.endswith("…")
    # Off a terminal, nothing is redrawn.
    plain = io.StringIO()
    quiet = Progress(plain, ["a"], max_attempts=1)
    quiet.redraw()
    assert plain.getvalue() == ""


def read_state(path: Path) -> dict | None:
    """The state file as a resumed run would read it (None while unreadable)."""
    try:
        return RunState(path, "").load()
    except (StateFileError, IndexError):
        return None


def test_a_run_killed_with_sigkill_resumes_from_its_state_file(tmp_path):
    """Killed mid-run (one task running, one waiting for its retry, two
    done), the run resumes with --state: it finishes every task and runs
    none of the done ones again; retry counts carry on."""
    marks = tmp_path / "marks"
    flag = tmp_path / "hang-once"
    job = write_job(
        tmp_path,
        f"""
        dispatcher:
          retry: {{initial_delay: 3, max_attempts: 3}}
        tasks:
          - {{id: a, command: "echo a >> {marks}"}}
          - {{id: b, command: "echo b >> {marks}"}}
          - id: flaky
            command: >-
              echo flaky >> {marks};
              if [ -e {tmp_path}/flaky-failed ]; then exit 0; fi;
              touch {tmp_path}/flaky-failed; exit 1
          - id: slow
            command: >-
              echo "slow $$" >> {marks};
              if [ -e {flag} ]; then exit 0; fi; touch {flag}; exec sleep 60
        """,
    )
    state = tmp_path / "run-state.json"
    first = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet", "--state", str(state)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            saved = read_state(state)
            tasks = saved["tasks"] if saved else {}
            states = {t: tasks.get(t, {}).get("state") for t in ("a", "b", "flaky", "slow")}
            # "running" is reported once the shell is started, maybe before
            # it ran a line: killed before it made its flag, the resumed
            # run's attempt would hang instead of succeeding.
            if (
                states == {"a": "done", "b": "done", "flaky": "ready", "slow": "running"}
                and (tmp_path / "flaky-failed").exists()
                and flag.exists()
            ):
                break
            assert first.poll() is None, f"the run ended early: {states}"
            assert time.monotonic() < deadline, f"never reached the kill point: {states}"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    # The hanging command outlived the killed run; end it.
    slow_pid = int(
        next(line for line in marks.read_text().split("\n") if line.startswith("slow")).split()[1]
    )
    os.killpg(slow_pid, signal.SIGKILL)
    assert saved["dispatcher"]["retry"]["records"][0]["task_id"] == "flaky"

    (tmp_path / "work").rename(tmp_path / "work-1")
    # Resumed: the flaky command's retry (it succeeds now) waits out its backoff.
    result = run_cli(tmp_path, job, "--state", str(state), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    outcomes = {t["id"]: (t["outcome"], t["attempts"]) for t in report["tasks"]}
    assert outcomes == {
        "a": ("done", 1),
        "b": ("done", 1),
        "flaky": ("done", 2),
        "slow": ("done", 2),
    }
    started = [line.split()[0] for line in marks.read_text().split("\n") if line]
    assert started.count("a") == 1 and started.count("b") == 1
    assert started.count("flaky") == 2 and started.count("slow") == 2
    # The retry waited out the backoff recorded before the kill.
    history = {t["id"]: t["history"] for t in report["tasks"]}
    failed_at = next(h for h in history["flaky"] if h["state"] == "ready" and h["metadata"])
    retried_at = [h for h in history["flaky"] if h["state"] == "running"][1]
    waited = datetime.fromisoformat(retried_at["at"]) - datetime.fromisoformat(failed_at["at"])
    assert waited.total_seconds() >= 3 - 0.05
    # Resuming a finished run runs nothing.
    again = run_cli(tmp_path, job, "--state", str(state))
    assert again.returncode == 0
    assert len([line for line in marks.read_text().split("\n") if line]) == len(started)


def test_a_damaged_state_file_is_refused_before_anything_runs(tmp_path):
    job = write_job(tmp_path, f"tasks: [{{id: a, command: 'touch {tmp_path}/ran'}}]\n")
    state = tmp_path / "state.json"
    state.write_text('{"format": "necrocode-dispatch run state", "version": 1, "tasks": {')
    result = run_cli(tmp_path, job, "--state", str(state))
    assert result.returncode == 2
    assert "not a run state (truncated?)" in result.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("run", range(3))
def test_400_quick_tasks_all_end_done_with_reports_in_order(tmp_path, run):
    """Issue 12, finding 2: a runner's completion used to overtake the launch's
    RUNNING report, and the run hung with a task left RUNNING."""
    tasks = "\n".join(f"  - {{id: t{i:03}, command: 'true'}}" for i in range(400))
    job = write_job(
        tmp_path,
        "dispatcher:\n  max_global_concurrency: 16\n  poll_interval: 0.05\n"
        "agent_pools:\n  local: {type: local-process, max_concurrency: 16}\n"
        f"tasks:\n{tasks}\n",
    )
    result = run_cli(tmp_path, job, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {t["outcome"] for t in report["tasks"]} == {"done"}
    for task in report["tasks"]:
        assert [h["state"] for h in task["history"]] == ["running", "done"], task["id"]
    first_seen: dict[str, str] = {}
    for event in events(tmp_path):
        first_seen.setdefault(event["task_id"], event["event"])
    assert set(first_seen.values()) == {"task_assigned"}


# -- issue 12, finding 9: the local runner owns its processes -----------------------


def process_is_gone(pid: int, within: float = 5.0) -> bool:
    """Whether `pid` has exited (a zombie counts as gone)."""
    deadline = time.monotonic() + within
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def pids_in(path: Path) -> list[int]:
    return [int(line.split()[-1]) for line in path.read_text().split("\n") if line.strip()]


def children_of(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
def test_what_a_command_leaves_in_the_background_ends_with_its_task(tmp_path):
    pids = tmp_path / "pids"
    job = write_job(
        tmp_path,
        f"""
        tasks:
          - {{id: bg, command: "sleep 40 & echo $! >> {pids}"}}
          - {{id: nohup, command: "nohup sleep 41 > /dev/null 2>&1 & echo $! >> {pids}"}}
          - {{id: exit0, command: "sleep 43 & echo $! >> {pids}; exit 0"}}
          - id: daemon
            keep_background: true
            command: "sleep 44 & echo kept $! >> {pids}.kept"
        """,
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 0, result.stderr
    killed = pids_in(pids)
    assert len(killed) == 3
    assert all(process_is_gone(pid) for pid in killed)
    (kept,) = pids_in(Path(f"{pids}.kept"))
    try:
        assert not process_is_gone(kept, within=0.2), "keep_background keeps the daemon"
    finally:
        os.kill(kept, signal.SIGKILL)


@linux_only
def test_commands_die_with_a_cli_killed_by_sigkill(tmp_path):
    pids = tmp_path / "pids"
    job = write_job(
        tmp_path,
        f"""
        tasks:
          - {{id: slow, command: "sleep 50 & echo $! >> {pids}; echo $$ >> {pids}; wait"}}
        """,
    )
    cli = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not (pids.exists() and len(pids_in(pids)) == 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = pids_in(pids)
        assert len(running) == 2
    finally:
        cli.kill()
        cli.wait()
    assert all(process_is_gone(pid) for pid in running)


@linux_only
def test_a_resumed_run_kills_what_the_dead_run_left_before_starting(tmp_path):
    """The CLI and its orphan guard are both killed: the state file's record
    of process groups is what the resumed run uses."""
    marks = tmp_path / "marks"
    flag = tmp_path / "second-run"
    job = write_job(
        tmp_path,
        f"""
        tasks:
          - id: slow
            command: >-
              if [ -e {flag} ]; then echo "new $$" >> {marks}; exit 0; fi;
              echo "old $$" >> {marks}; exec sleep 60
        """,
    )
    state = tmp_path / "state.json"
    first = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet", "--state", str(state)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    old = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            saved = read_state(state)
            # A whole line: the shell opens the file before it writes.
            if saved and saved.get("process_groups") and marks.exists():
                if marks.read_text().endswith("\n"):
                    break
            time.sleep(0.05)
        (old,) = pids_in(marks)
        guards = [pid for pid in children_of(first.pid) if b"SIG_IGN" in cmdline(pid)]
        assert len(guards) == 1
        # The guard first: once the CLI is gone, the guard would kill the groups.
        for pid in [*guards, first.pid]:
            os.kill(pid, signal.SIGKILL)
        first.wait()
        assert not process_is_gone(old, within=0.5), "left running by the dead run"
        flag.touch()
        result = run_cli(tmp_path, job, "--state", str(state))
        assert result.returncode == 0, result.stderr
        assert process_is_gone(old, within=0.5)
        lines = marks.read_text().split("\n")
        assert lines[0].startswith("old") and lines[1].startswith("new")
    finally:
        if old is not None and not process_is_gone(old, within=0):
            os.kill(old, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_on_a_real_terminal_the_status_line_moves_while_nothing_changes(tmp_path):
    """In a tmux pane 60 columns wide: while one command sleeps, the status
    line's running time goes up by itself, and the line never wraps."""
    job = write_job(tmp_path, "tasks:\n  - {id: sleeper, command: 'sleep 3'}\n")
    socket = f"necrocode-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    command = " ".join(cli_args(tmp_path, job)) + "; sleep 30"
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "60", "-y", "10", command], check=True, timeout=10
    )
    try:

        def status_line() -> str:
            pane = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True, check=True
            ).stdout
            found = [line for line in pane.splitlines() if "sleeper" in line and "|" in line]
            return found[-1] if found else ""

        seen = set()
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            line = status_line()
            if line:
                assert len(line) <= 59, line
                seen.add(line.rsplit("sleeper ", 1)[-1])
            time.sleep(0.2)
        assert len(seen) >= 2, f"the status line never moved: {seen}"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


def test_the_cli_refuses_a_platform_it_cannot_run_commands_on(tmp_path, monkeypatch, capsys):
    from necrocode_dispatch import cli

    job = write_job(tmp_path, "tasks:\n  - {id: a, command: 'touch MARKER'}\n")
    monkeypatch.setattr(cli.os, "name", "nt")
    assert cli.main(["run", str(job), "--workdir", str(tmp_path / "work")]) == 2
    monkeypatch.undo()
    assert "run needs a POSIX system" in capsys.readouterr().err
    assert not list(tmp_path.rglob("MARKER"))
    assert not (tmp_path / "work").exists()


def run_console_main(tmp_path, job, prelude):
    """`console_main()` on `job` in a fresh interpreter, after `prelude`."""
    program = (
        f"{prelude}\n"
        "import sys\n"
        "from necrocode_dispatch.cli import console_main\n"
        f"sys.argv = ['necrocode-dispatch', *{cli_args(tmp_path, job, '--quiet')[3:]!r}]\n"
        "console_main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )


def test_the_exit_skips_teardown_but_not_exit_handlers_or_output(tmp_path):
    """The command ends without the interpreter's teardown: its exit code,
    its whole table on a pipe and the exit handlers registered in the
    process are as with `sys.exit`."""
    tasks = "".join(f"  - {{id: t{i:03}, command: 'exit {i % 2}'}}\n" for i in range(300))
    job = write_job(tmp_path, "dispatcher: {retry: {max_attempts: 1}}\ntasks:\n" + tasks)
    prelude = (
        "import atexit, sys\natexit.register(lambda: print('exit handler ran', file=sys.stderr))"
    )
    result = run_console_main(tmp_path, job, prelude)
    assert result.returncode == 1, result.stderr
    assert "exit handler ran" in result.stderr
    rows = [line.split()[:3] for line in result.stdout.splitlines()[1:301]]
    assert rows == [[f"t{i:03}", "1", "failed" if i % 2 else "done"] for i in range(300)]
    assert result.stdout.rstrip().endswith(f"command logs: {tmp_path / 'work' / 'logs'}")


def test_the_exit_waits_for_a_thread_of_the_program_as_sys_exit_does(tmp_path):
    """A non-daemon thread of the calling program still running when the
    command ends is joined, not killed: the exit is then `sys.exit`."""
    job = write_job(tmp_path, "tasks:\n  - {id: a, command: 'true'}\n")
    prelude = (
        "import sys, threading\n"
        "def after_main():\n"
        "    threading.main_thread().join()\n"
        "    print('thread finished', file=sys.stderr, flush=True)\n"
        "threading.Thread(target=after_main).start()"
    )
    result = run_console_main(tmp_path, job, prelude)
    assert result.returncode == 0, result.stderr
    assert "thread finished" in result.stderr
