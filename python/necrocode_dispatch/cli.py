"""``necrocode-dispatch run JOBFILE``: dispatch a job file's shell commands on
this machine through the Rust core, with retries, live progress, an event log
and a final table.

Exit status: 0 every task done, 1 some task failed, 2 a bad job file (nothing
runs), 130 interrupted by Ctrl-C (143 by SIGTERM): running commands are stopped.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from necrocode_dispatch import DispatcherCore, DispatcherError, PoolType, TaskState
from necrocode_dispatch.job import JobError, collector_paused, load_job
from necrocode_dispatch.local import (
    InMemoryTaskRegistry,
    JsonlEventRecorder,
    LocalSlotPool,
    StateChange,
    SubprocessLauncher,
    kill_leftover_groups,
)
from necrocode_dispatch.run_state import RunState, StateFileError

PROG = "necrocode-dispatch"
EXIT_DONE, EXIT_FAILED, EXIT_BAD_JOB = 0, 1, 2


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; exit with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Dispatch tasks with retries through the necrocode-dispatch core."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run every task of a job file to the end",
        description="Run every task of a YAML job file to the end, retrying failures "
        "with exponential backoff.",
    )
    run.add_argument("jobfile", help="the job file (dispatcher, agent_pools, skill_mapping, tasks)")
    run.add_argument("--json", action="store_true", help="print the final status as JSON")
    run.add_argument(
        "--events", metavar="PATH", help="the event log, JSON lines (default: WORKDIR/events.jsonl)"
    )
    run.add_argument(
        "--workdir", metavar="DIR", help="slots and command logs (default: a new temporary dir)"
    )
    run.add_argument(
        "--state",
        metavar="FILE",
        help="resume from FILE if it exists, and keep it up to date: a run stopped "
        "at any moment continues where it was",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="with --state: start over, ignoring (and replacing) what FILE holds",
    )
    run.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary work directory even when every task is done",
    )
    run.add_argument("--quiet", action="store_true", help="no live progress")
    run.add_argument("-v", "--verbose", action="store_true", help="log the dispatcher's decisions")
    args = parser.parse_args(argv)
    # Ctrl-C interrupts even when a shell without job control started this
    # in the background (SIGINT inherited ignored); the run installs its
    # own handlers once it starts.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format=f"{PROG}: %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_job(args)
    except KeyboardInterrupt:
        # Before the run's own handlers are in place (e.g. loading a large
        # job file): nothing ran.
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


class BadInput(Exception):
    """A job, path or state file that cannot run; nothing ran."""


_NO_RAY = object()


def _ray_pools(job: Any) -> list[Any]:
    return [p for p in job.config.agent_pools if p.type is PoolType.RAY]


def _ray_cluster(job: Any) -> Any:
    """The Ray address the job's ray pools use (None: a local Ray for the
    run), or ``_NO_RAY``; checked reachable before anything runs."""
    ray_pools = _ray_pools(job)
    if not ray_pools:
        return _NO_RAY
    where = f"agent_pools.{ray_pools[0].name}"
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BadInput(
            f"{where}.type: ray pools need Ray: pip install 'necrocode-dispatch[ray]'"
        ) from None
    from necrocode_dispatch.ray import check_address

    address = ray_pools[0].config.get("address")
    try:
        check_address(address)
    except (ConnectionError, ValueError) as e:
        raise BadInput(f"{where}.address: {e}") from None
    return address


class PoolLaunchers:
    """The runner launcher port for a job whose pools run in different
    places: each pool type's launcher (``local-process`` by default); a
    runner's launcher is known by its id's prefix (``local-``, ``ray-``)."""

    def __init__(self, local: SubprocessLauncher):
        self.local = local
        self.by_type: dict[str, Any] = {PoolType.LOCAL_PROCESS.value: local}
        self.run_id = local.run_id

    def add(self, pool_type: str, launcher: Any) -> None:
        self.by_type[pool_type] = launcher

    @property
    def dispatcher(self) -> Any:
        return self.local.dispatcher

    @dispatcher.setter
    def dispatcher(self, dispatcher: Any) -> None:
        for launcher in self.by_type.values():
            launcher.dispatcher = dispatcher

    def launch(self, task: Any, slot: Any, pool: Any) -> Any:
        kind = getattr(getattr(pool, "type", None), "value", PoolType.LOCAL_PROCESS.value)
        launcher = self.by_type.get(kind)
        if launcher is None:
            raise RuntimeError(f"no launcher for {kind!r} pools")
        return launcher.launch(task, slot, pool)

    def stop(self, runner_id: str) -> None:
        ray = self.by_type.get(PoolType.RAY.value)
        (ray if ray is not None and runner_id.startswith("ray-") else self.local).stop(runner_id)

    def process_groups(self) -> list[int]:
        return self.local.process_groups()

    def close(self) -> None:
        for launcher in self.by_type.values():
            launcher.close()

    def close_guard(self) -> None:
        self.local.close_guard()


def _work_directory(args: argparse.Namespace) -> tuple[Path, bool]:
    """The work directory, and whether it is a temporary one made here."""
    if not args.workdir:
        return Path(tempfile.mkdtemp(prefix=f"{PROG}-")), True
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir {workdir}: not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--workdir {workdir}: {e.strerror or e}") from None
    return workdir, False


def _event_log(path: Path) -> JsonlEventRecorder:
    if path.is_dir():
        raise BadInput(f"--events {path}: is a directory")
    try:
        return JsonlEventRecorder(path)
    except OSError as e:
        raise BadInput(f"--events {path}: {e.strerror or e}") from None


def _run_state(args: argparse.Namespace, job: Any) -> tuple[RunState | None, dict | None]:
    """The state file (checked writable, bound to this job) and what it holds."""
    if not args.state:
        return None, None
    run_state = RunState(args.state, str(args.jobfile), job.fingerprint())
    try:
        run_state.check_writable()
        if args.fresh:
            return run_state, None
        saved = run_state.load()
        if saved is not None:
            run_state.check_job(saved)
    except StateFileError as e:
        raise BadInput(str(e)) from None
    return run_state, saved


def run_job(args: argparse.Namespace) -> int:
    if os.name != "posix":
        # Every task would fail as "launch failed": say so before anything.
        print(
            f"{PROG}: run needs a POSIX system (Linux, macOS, a BSD): it runs each command "
            f"with /bin/sh in a process group of its own. This is {sys.platform}; the core "
            "(DispatcherCore, RetryManager) works here with runners of your own.",
            file=sys.stderr,
        )
        return EXIT_BAD_JOB
    try:
        job = load_job(args.jobfile)
    except JobError as e:
        print(f"{PROG}: {args.jobfile}: {e}", file=sys.stderr)
        return EXIT_BAD_JOB
    try:
        ray_address = _ray_cluster(job)
    except BadInput as e:
        print(f"{PROG}: {args.jobfile}: {e}", file=sys.stderr)
        return EXIT_BAD_JOB
    made: list[Path] = []
    try:
        # The work directory first: a state file or event log may be in it.
        workdir, temporary = _work_directory(args)
        if temporary:
            made.append(workdir)
        run_state, saved = _run_state(args, job)
        events_path = Path(args.events) if args.events else workdir / "events.jsonl"
        recorder = _event_log(events_path)
    except BadInput as e:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_BAD_JOB
    progress = Progress(
        sys.stderr, [t.id for t in job.tasks], job.config.retry_max_attempts, args.quiet
    )

    specs = {t.id: t.metadata["spec_name"] for t in job.tasks}

    def on_change(task_id: str, state: TaskState, metadata: dict[str, Any]) -> None:
        progress.on_change(task_id, state, metadata)
        if metadata.get("skipped"):
            recorder.record_task_skipped(
                spec_name=specs[task_id],
                task_id=task_id,
                failed_dependency=metadata.get("failed_dependency"),
            )
        if run_state is not None:
            run_state.record(task_id, state, metadata, registry, dispatcher, launcher)

    # The dispatcher holds what a poll gives it: each poll need only bring
    # the tasks that became READY since the last.
    with collector_paused():
        registry = InMemoryTaskRegistry(job.tasks, listener=on_change, incremental=True)
    # The job's tasks and their records live as long as the run: frozen,
    # the collector's full passes no longer walk them all (a 10^5-task job
    # is a million objects).
    gc.freeze()

    # One attempt number everywhere (environment, log names, progress,
    # table): the runs the registry saw start, resumed runs included.
    def attempt_of(task_id: str) -> int:
        return registry.runs_started(task_id) + 1

    heartbeat = min(1.0, job.config.heartbeat_timeout / 3)
    launcher = PoolLaunchers(
        SubprocessLauncher(workdir / "logs", heartbeat_interval=heartbeat, attempt_of=attempt_of)
    )

    def refuse(message: str) -> int:
        """Nothing ran: undo what was set up, say why, exit 2."""
        launcher.close()
        launcher.close_guard()
        recorder.close()
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_BAD_JOB

    if ray_address is not _NO_RAY:
        from necrocode_dispatch.ray import RayLauncher

        on_ray = RayLauncher(
            workdir / "logs",
            address=ray_address,
            heartbeat_interval=heartbeat,
            attempt_of=attempt_of,
            run_id=launcher.run_id,
        )
        try:
            # Here, in the main thread, before anything runs: a cluster that
            # refuses us is a bad job, not a string of failed launches.
            on_ray.connect()
        except Exception as e:
            where = f"agent_pools.{_ray_pools(job)[0].name}.address"
            return refuse(f"{args.jobfile}: {where}: cannot join Ray: {e}")
        launcher.add(PoolType.RAY.value, on_ray)
    try:
        dispatcher = DispatcherCore(
            job.config,
            task_source=registry,
            task_registry=registry,
            repo_pool_manager=LocalSlotPool(workdir / "slots", job.slots_per_repo),
            runner_launcher=launcher,
        )
    except (ValueError, TypeError, DispatcherError) as e:
        return refuse(f"{args.jobfile}: {e}")
    if run_state is not None:
        if saved is not None:
            # What a run killed before it could stop its commands left
            # running is killed before anything starts again.
            left = saved.get("process_groups")
            if isinstance(left, list) and isinstance(saved.get("run_id"), str):
                groups = [g for g in left if isinstance(g, int) and g > 1]
                kill_leftover_groups(saved["run_id"], groups)
            try:
                registry.restore(saved["tasks"])
                dispatcher.restore(saved["dispatcher"])
            except (ValueError, TypeError, KeyError) as e:
                return refuse(f"{run_state.path}: cannot resume: {e}")
            progress.resume(registry, run_state.path)
        run_state.save(registry, dispatcher, launcher)
        if run_state.save_error is not None:
            return refuse(f"{run_state.path}: cannot be written: {run_state.save_error}")
    dispatcher.event_recorder = recorder
    launcher.dispatcher = dispatcher

    stop_redrawing = threading.Event()
    redrawing = threading.Thread(
        target=progress.ticker, args=(stop_redrawing,), name="progress", daemon=True
    )
    if progress.tty:
        redrawing.start()
    # stdout is the final table's (or JSON's): what libraries print while the
    # run goes on (Ray's "(raylet) ..." notices) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        interrupted = _run_until_finished(dispatcher, registry, launcher)
    stop_redrawing.set()
    if redrawing.is_alive():
        redrawing.join()
    if run_state is not None:
        run_state.close(registry, dispatcher, launcher)
    recorder.close()
    progress.finish()

    rows = summarize(registry)
    failed = any(r.outcome in ("failed", "skipped") for r in rows)
    if interrupted is not None:
        code = interrupted.exit_code
    else:
        code = EXIT_FAILED if failed else EXIT_DONE
    # A temporary work directory goes when there is nothing to look at in it.
    removed = temporary and code == EXIT_DONE and not args.keep_workdir
    if removed:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        report = {
            "exit_code": code,
            "interrupted": interrupted is not None,
            "events": None if removed and not args.events else str(events_path),
            "workdir": None if removed else str(workdir),
            "tasks": [r.to_dict() for r in rows],
            "status": dispatcher.get_status(),
        }
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, sys.stdout)
        if removed:
            print(
                "\nevery task done: the temporary work directory was removed "
                "(--keep-workdir keeps it)"
            )
            if args.events:
                print(f"event log: {events_path}")
        else:
            print(f"\nevent log: {events_path}\ncommand logs: {workdir / 'logs'}")
        if run_state is not None:
            print(f"state: {run_state.path}")
        if interrupted is not None:
            print(f"interrupted ({interrupted}): running commands were stopped")
    if run_state is not None and run_state.save_error is not None:
        print(f"{PROG}: saving {run_state.path} failed: {run_state.save_error}", file=sys.stderr)
    return code


def _run_until_finished(dispatcher, registry, launcher) -> Interrupted | None:
    """Runs the dispatcher until every task is done or failed, or SIGINT /
    SIGTERM. Returns the interruption, if any."""
    # Handled explicitly: a shell without job control starts background
    # commands with SIGINT ignored, and Python would keep ignoring it.
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _raise_interrupted) for s in handled}
    interrupted = None
    try:
        dispatcher.start()
        # Woken by the last report (a signal still interrupts the wait).
        while not registry.wait_finished(0.5):
            pass
    except Interrupted as e:
        interrupted = e
    finally:
        # A second signal must not cut the shutdown short: slots and
        # processes are being cleaned up.
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        try:
            dispatcher.stop(timeout=0 if interrupted else None)
            launcher.close()
            launcher.close_guard()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return interrupted


@dataclass
class Row:
    task_id: str
    attempts: int
    outcome: str
    last_failure: str | None
    #: The task's state changes; made into dicts only for ``--json``.
    history: list[StateChange]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.task_id,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "last_failure": self.last_failure,
            "history": [
                {"state": c.state.value, "at": c.at.isoformat(), "metadata": c.metadata}
                for c in self.history
            ],
        }


def summarize(registry: InMemoryTaskRegistry) -> list[Row]:
    rows = []
    for task_id in registry.task_ids():
        history = registry.get_history(task_id)
        attempts = sum(1 for change in history if change.state is TaskState.RUNNING)
        last_failure = None
        for change in history:
            reason = change.metadata.get("failure_reason") or change.metadata.get("reason")
            if reason:
                last_failure = reason
        last = history[-1] if history else None
        if last is None:
            blocked = registry.get_state(task_id) is TaskState.BLOCKED
            outcome = "waiting for dependencies" if blocked else "not started"
        elif last.state is TaskState.DONE:
            outcome = "done"
        elif last.state is TaskState.FAILED:
            outcome = "skipped" if last.metadata.get("skipped") else "failed"
        elif last.metadata.get("interrupted"):
            outcome = "interrupted"
        elif last.state is TaskState.READY:
            outcome = "waiting to retry"
        else:
            outcome = last.state.value
        rows.append(Row(task_id, attempts, outcome, last_failure, history))
    return rows


def print_table(rows: list[Row], out: TextIO) -> None:
    header = ("task", "attempts", "outcome", "last failure")
    cells = [(r.task_id, str(r.attempts), r.outcome, r.last_failure or "-") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header[:3])]
    w0, w1, w2 = widths
    # One write: a line per task, 10^4 of them, printed one by one took a
    # few ms per thousand.
    out.write(
        "".join(
            f"{a.ljust(w0)}  {b.ljust(w1)}  {c.ljust(w2)}  {d}".rstrip() + "\n"
            for a, b, c, d in [header, *cells]
        )
    )


class Progress:
    """Live progress: a line per state change and, on a terminal, a status
    line kept at the bottom — redrawn on every change and every
    ``REDRAW`` seconds (``ticker``), with what runs and for how long and
    what waits for a retry and for how long more, cut to the terminal's
    width so that it never wraps. Called from the dispatcher's threads."""

    BAR = 24
    REDRAW = 0.5

    def __init__(
        self,
        stream: TextIO,
        task_ids: list[str],
        max_attempts: int,
        quiet: bool = False,
        columns: Callable[[], int] | None = None,
    ):
        self.stream = stream
        self.total = len(task_ids)
        self.width = max(map(len, task_ids), default=0)
        self.max_attempts = max_attempts
        self.quiet = quiet
        self.tty = stream.isatty() and not quiet
        self.columns = columns or (lambda: shutil.get_terminal_size((80, 24)).columns)
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.labels: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        #: task id -> monotonic time its current attempt started.
        self.running_since: dict[str, float] = {}
        #: task id -> monotonic time its retry is due.
        self.retry_due: dict[str, float] = {}

    def resume(self, registry: InMemoryTaskRegistry, path: Path) -> None:
        """Takes in the tasks' states restored from a state file."""
        with self.lock:
            for task_id in registry.task_ids():
                history = registry.get_history(task_id)
                self.attempts[task_id] = sum(c.state is TaskState.RUNNING for c in history)
                state = registry.get_state(task_id)
                if state in (TaskState.DONE, TaskState.FAILED):
                    skipped = bool(history) and history[-1].metadata.get("skipped")
                    self.labels[task_id] = "skipped" if skipped else state.value
            if not self.quiet:
                done = sum(label == "done" for label in self.labels.values())
                failed = sum(label == "failed" for label in self.labels.values())
                self.stream.write(f"resuming from {path}: {done} done, {failed} failed\n")
                self.stream.flush()

    def on_change(self, task_id: str, state: TaskState, metadata: dict[str, Any]) -> None:
        if self.quiet:
            return  # nothing is shown, so nothing need be kept: 3 µs a change
        with self.lock:
            self.running_since.pop(task_id, None)
            self.retry_due.pop(task_id, None)
            line = self._describe(task_id, state, metadata)
            if line is None:
                return
            if self.tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"{time.monotonic() - self.start:7.2f}s  {line}\n")
            if self.tty:
                self.stream.write(self._bar())
            self.stream.flush()

    def redraw(self) -> None:
        """Draws the status line again (on a terminal): times move on."""
        if not self.tty:
            return
        with self.lock:
            self.stream.write("\r\x1b[K" + self._bar())
            self.stream.flush()

    def ticker(self, stop: threading.Event) -> None:
        """Redraws every ``REDRAW`` seconds until ``stop`` is set."""
        while not stop.wait(self.REDRAW):
            self.redraw()

    def _describe(self, task_id: str, state: TaskState, metadata: dict[str, Any]) -> str | None:
        name = task_id.ljust(self.width)
        if metadata.get("dependencies_met"):
            self.labels[task_id] = "queued"
            return None
        if metadata.get("skipped"):
            self.labels[task_id] = "skipped"
            return f"{name}  skipped    dependency {metadata.get('failed_dependency')!r} failed"
        if state is TaskState.RUNNING:
            self.attempts[task_id] = self.attempts.get(task_id, 0) + 1
            self.labels[task_id] = "running"
            self.running_since[task_id] = time.monotonic()
            attempt = self.attempts[task_id]
            return f"{name}  started    attempt {attempt} on {metadata.get('pool_name')}"
        if state is TaskState.DONE:
            self.labels[task_id] = "done"
            return f"{name}  done       after {self.attempts.get(task_id, 0)} attempt(s)"
        if state is TaskState.FAILED:
            self.labels[task_id] = "failed"
            return (
                f"{name}  FAILED     {metadata.get('reason')} "
                f"(gave up after {metadata.get('retries')} attempts)"
            )
        if metadata.get("interrupted"):
            self.labels[task_id] = "interrupted"
            return f"{name}  interrupted"
        self.labels[task_id] = "retry-wait"
        delay = ""
        if metadata.get("next_retry_at"):
            due = datetime.fromisoformat(metadata["next_retry_at"])
            seconds = max(0.0, (due - datetime.now()).total_seconds())
            self.retry_due[task_id] = time.monotonic() + seconds
            delay = f"; retry in {seconds:.1f} s"
        return (
            f"{name}  failed     {metadata.get('failure_reason')} "
            f"[{metadata.get('retry_count')}/{self.max_attempts}]{delay}"
        )

    def _bar(self) -> str:
        counts: dict[str, int] = {}
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        finished = counts.get("done", 0) + counts.get("failed", 0) + counts.get("skipped", 0)
        filled = self.BAR * finished // max(1, self.total)
        parts = " · ".join(
            f"{label} {counts[label]}"
            for label in ("done", "failed", "skipped", "running", "retry-wait")
            if counts.get(label)
        )
        now = time.monotonic()
        running = sorted(self.running_since.items(), key=lambda item: item[1])
        details = [f"{t} {now - since:.0f}s" for t, since in running]
        waiting = sorted(self.retry_due.items(), key=lambda item: item[1])
        details += [f"{t} retry in {max(0.0, due - now):.1f}s" for t, due in waiting]
        line = f"[{'#' * filled}{'.' * (self.BAR - filled)}] {finished}/{self.total}  {parts}"
        if details:
            line += "  | " + ", ".join(details)
        # One character short of the width: a full line would wrap the cursor.
        room = max(10, self.columns() - 1)
        return line if len(line) <= room else line[: room - 1] + "…"

    def finish(self) -> None:
        with self.lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def console_main() -> None:
    _exit(main())


def _exit(code: int) -> NoReturn:
    """Exits with ``code`` as ``sys.exit`` would, without the interpreter's
    teardown: it frees every object of the run one by one (25 ms for 2,000
    tasks, more than the table took to print). The exit handlers run first
    (the launcher's gates, logging's flush, Ray's shutdown), then the
    standard streams are flushed. With a thread of someone else's still to
    be joined, or a stream that cannot be flushed, it is ``sys.exit``."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(not t.daemon and t.is_alive() for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    console_main()
