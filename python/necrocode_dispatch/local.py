"""An embedded local setup: working ports for running shell commands on this
machine through a DispatcherCore.

- ``InMemoryTaskRegistry``: tasks and their state history; also the task source.
- ``LocalSlotPool``: numbered slots per repo, each a working directory.
- ``SubprocessLauncher``: runs a task's ``command`` in its slot, sends heartbeats
  while it runs, reports the outcome (exit code, signal, timeout) and kills the
  process group on ``stop``. A task's processes end with it (what its command
  left in the background is killed, unless the task says ``keep_background``)
  and with the program (an orphan guard kills them if it dies, even by SIGKILL).
- ``JsonlEventRecorder``: the SPEC §4.2 event methods, one JSON object a line.

POSIX only (process groups). Nothing here is imported by ``import necrocode_dispatch``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from weakref import WeakSet

from necrocode_dispatch import _core
from necrocode_dispatch.models import Task, TaskState

logger = logging.getLogger(__name__)

__all__ = [
    "InMemoryTaskRegistry",
    "JsonlEventRecorder",
    "LocalRunner",
    "LocalSlot",
    "LocalSlotPool",
    "OrphanGuard",
    "StateChange",
    "SubprocessLauncher",
    "kill_leftover_groups",
]


def _safe_name(name: str) -> str:
    """``name`` as one path component, distinct for distinct names and still
    readable: percent-encoded (``x/y`` -> ``x%2Fy``, while ``x_y`` stays
    ``x_y``; a leading dot too, so ``.hidden`` is ``%2Ehidden``). A name
    longer than 120 characters encoded is cut, and marked ``%%`` with a
    hash of the whole (``%%`` never appears in an encoded name)."""
    encoded = urllib.parse.quote(name, safe="", errors="surrogatepass") or "%"
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) <= 120:
        return encoded
    import hashlib  # rare: imported when needed (OpenSSL's start is not free)

    digest = hashlib.blake2s(name.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{encoded[:100]}%%{digest}"


def _pool_name(pool: Any) -> str:
    """A pool's name; str(pool) only for a pool given as a bare name (a
    dataclass's repr on every launch is not free)."""
    name = getattr(pool, "name", None)
    return name if isinstance(name, str) else str(pool)


def _field(task: Any, name: str, default: Any = None) -> Any:
    """A task attribute, else its metadata entry (tasks may be dicts too)."""
    if isinstance(task, dict):
        return task.get(name, (task.get("metadata") or {}).get(name, default))
    value = getattr(task, name, None)
    if value is not None:
        return value
    return (getattr(task, "metadata", None) or {}).get(name, default)


@dataclass(frozen=True)
class StateChange:
    state: TaskState
    metadata: dict[str, Any]
    at: datetime


_FINISHED = (TaskState.DONE, TaskState.FAILED)


@dataclass
class _Record:
    task: Task
    state: TaskState = TaskState.READY
    history: list[StateChange] = field(default_factory=list)


class InMemoryTaskRegistry:
    """Task states with their history. As a task source, a poll returns the
    READY tasks (kept as a set, not found by a scan), and a dispatcher that
    gives it a waker (``set_waker``) is woken when a task becomes READY.
    With ``incremental=True`` a poll returns only the tasks that became READY
    since the previous poll (O(new tasks) per poll): for a dispatcher, which
    holds what it was given until it reports on it.

    A task with ``dependencies`` starts BLOCKED and becomes READY when every
    task it depends on is DONE (metadata ``dependencies_met``); when one of
    them fails for good it is FAILED without running, with metadata
    ``skipped`` and ``failed_dependency`` naming the task that failed, and so
    are the tasks that depend on it. A dependency on an id not registered
    (yet) keeps the task BLOCKED.

    ``listener(task_id, state, metadata)`` is called after each change,
    outside the registry's lock."""

    def __init__(
        self,
        tasks: Any = (),
        listener: Callable[[str, TaskState, dict[str, Any]], None] | None = None,
        *,
        incremental: bool = False,
    ):
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._ready: dict[str, Task] = {}
        self.incremental = incremental
        #: READY tasks not handed out by a poll yet (incremental polls).
        self._fresh: dict[str, Task] = {}
        #: task id -> ids of the tasks that depend on it.
        self._dependents: dict[str, list[str]] = {}
        #: BLOCKED task id -> how many of its dependencies are not DONE.
        self._unmet: dict[str, int] = {}
        #: How many tasks are DONE or FAILED: ``all_finished()`` is polled
        #: by the CLI while it runs, and must not scan every task.
        self._finished = 0
        #: Notified (under the lock) when every task is DONE or FAILED.
        self._all_finished = threading.Condition(self._lock)
        self.listener = listener
        self._waker: Callable[[], None] | None = None
        with self._lock:
            # No task is FAILED yet: adding these changes no other task.
            for task in tasks:
                self._add(task, nothing_finished=True)

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """``waker()`` is called when a task becomes READY (a dispatcher's
        loop then passes at once instead of at its next poll)."""
        self._waker = waker

    def _wake(self) -> None:
        if self._waker is not None:
            self._waker()

    def add(self, task: Task) -> None:
        with self._lock:
            ready, changes = self._add(task)
        self._announce(changes)
        if ready:
            self._wake()

    def _add(
        self, task: Task, nothing_finished: bool = False
    ) -> tuple[bool, list[tuple[str, StateChange]]]:
        """Registers a task (lock held): whether it is READY, and the changes
        it causes (tasks skipped when it depends on a failed one).
        ``nothing_finished``: no task is DONE or FAILED (the constructor)."""
        if task.id in self._records:
            raise ValueError(f"task id {task.id!r} is already registered")
        record = _Record(task)
        self._records[task.id] = record
        deps = _dependencies(task)
        if not deps:
            self._set_state(task.id, record, TaskState.READY)
            return True, []
        for dep in deps:
            self._dependents.setdefault(dep, []).append(task.id)
        if nothing_finished:
            unmet = len(deps)
        else:
            unmet = sum(1 for dep in deps if self._state_of(dep) is not TaskState.DONE)
        if not unmet:
            self._set_state(task.id, record, TaskState.READY)
            return True, []
        self._unmet[task.id] = unmet
        record.state = TaskState.BLOCKED
        if nothing_finished:
            return False, []
        failed = next((d for d in deps if self._state_of(d) is TaskState.FAILED), None)
        return False, self._skip_dependents_of(failed) if failed is not None else []

    def _state_of(self, task_id: str) -> TaskState | None:
        record = self._records.get(task_id)
        return record.state if record is not None else None

    def poll_ready_tasks(self) -> list[Task]:
        with self._lock:
            if not self.incremental:
                return list(self._ready.values())
            fresh, self._fresh = self._fresh, {}
            return list(fresh.values())

    def update_task_state(self, spec_name, task_id, new_state, metadata=None):
        # A TaskState as it is (the enum's lookup by value costs 2 µs).
        state = (
            new_state
            if type(new_state) is TaskState
            else TaskState(getattr(new_state, "value", new_state))
        )
        change = StateChange(state, dict(metadata or {}), datetime.now())
        with self._lock:
            record = self._records.get(task_id)
            if record is None:
                raise KeyError(f"task_id: no task {task_id!r} in the registry")
            before = record.state
            self._set_state(task_id, record, state)
            record.history.append(change)
            # Reports arrive at least once (SPEC §9): only the change into
            # DONE or FAILED moves the tasks that depend on this one.
            follow: list[tuple[str, StateChange]] = []
            if state is TaskState.DONE and before is not TaskState.DONE:
                follow = self._release_dependents_of(task_id)
            elif state is TaskState.FAILED and before is not TaskState.FAILED:
                follow = self._skip_dependents_of(task_id)
        if state is TaskState.READY or (
            follow and any(c.state is TaskState.READY for _, c in follow)
        ):
            self._wake()
        if self.listener is not None:
            self.listener(task_id, state, change.metadata)
        self._announce(follow)

    def _release_dependents_of(self, task_id: str) -> list[tuple[str, StateChange]]:
        """``task_id`` is DONE: its dependents with nothing else to wait for
        become READY (lock held). Returns the changes made."""
        changes = []
        for dependent in self._dependents.get(task_id, ()):
            left = self._unmet.get(dependent)
            if left is None:
                continue
            if left > 1:
                self._unmet[dependent] = left - 1
                continue
            del self._unmet[dependent]
            record = self._records[dependent]
            if record.state is TaskState.BLOCKED:
                changes.append(
                    (
                        dependent,
                        self._change(
                            dependent,
                            record,
                            TaskState.READY,
                            {
                                "dependencies_met": True,
                            },
                        ),
                    )
                )
        return changes

    def _skip_dependents_of(self, failed: str) -> list[tuple[str, StateChange]]:
        """``failed`` failed for good: every task that depends on it, directly
        or not, and has not run is FAILED as skipped (lock held)."""
        changes = []
        pending = list(self._dependents.get(failed, ()))
        while pending:
            dependent = pending.pop()
            record = self._records.get(dependent)
            if record is None or record.state is not TaskState.BLOCKED:
                continue
            self._unmet.pop(dependent, None)
            metadata = {
                "skipped": True,
                "failed_dependency": failed,
                "reason": f"skipped: dependency {failed!r} failed",
            }
            changes.append((dependent, self._change(dependent, record, TaskState.FAILED, metadata)))
            pending.extend(self._dependents.get(dependent, ()))
        return changes

    def _change(self, task_id, record, state, metadata) -> StateChange:
        change = StateChange(state, metadata, datetime.now())
        self._set_state(task_id, record, state)
        record.history.append(change)
        return change

    def _announce(self, changes: list[tuple[str, StateChange]]) -> None:
        if self.listener is not None:
            for task_id, change in changes:
                self.listener(task_id, change.state, change.metadata)

    def _set_state(self, task_id: str, record: _Record, state: TaskState) -> None:
        """A record's new state, and the READY sets with it (lock held)."""
        self._finished += (state in _FINISHED) - (record.state in _FINISHED)
        record.state = state
        if self._finished == len(self._records):
            self._all_finished.notify_all()
        if state is TaskState.READY:
            self._ready[task_id] = record.task
            self._fresh[task_id] = record.task
        else:
            self._ready.pop(task_id, None)
            self._fresh.pop(task_id, None)

    def get_state(self, task_id: str) -> TaskState:
        with self._lock:
            return self._records[task_id].state

    def get_history(self, task_id: str) -> list[StateChange]:
        with self._lock:
            return list(self._records[task_id].history)

    def runs_started(self, task_id: str) -> int:
        """How many times the task was reported RUNNING (each attempt that
        started, including one cut short by a restart)."""
        with self._lock:
            return sum(c.state is TaskState.RUNNING for c in self._records[task_id].history)

    def task_ids(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def counts(self) -> Counter[TaskState]:
        with self._lock:
            return Counter(r.state for r in self._records.values())

    def snapshot(self) -> dict[str, Any]:
        """Each task's state and history, as JSON data."""
        with self._lock:
            return {
                task_id: {
                    "state": r.state.value,
                    "history": [
                        {"state": c.state.value, "metadata": c.metadata, "at": c.at.isoformat()}
                        for c in r.history
                    ],
                }
                for task_id, r in self._records.items()
            }

    def restore(self, saved: dict[str, Any]) -> None:
        """Takes back the states and histories of a ``snapshot()`` for the
        tasks registered here (others are ignored). A task that was running
        when saved is READY again: its runner went with the process. Which
        tasks wait for dependencies is worked out anew from the states."""
        restored = {}
        for task_id, entry in saved.items():
            state = TaskState(entry["state"])
            history = [
                StateChange(
                    TaskState(c["state"]), dict(c["metadata"]), datetime.fromisoformat(c["at"])
                )
                for c in entry["history"]
            ]
            if state is TaskState.RUNNING:
                state = TaskState.READY
            restored[task_id] = (state, history)
        with self._lock:
            for task_id, (state, history) in restored.items():
                record = self._records.get(task_id)
                if record is not None:
                    self._set_state(task_id, record, state)
                    record.history = history
            changes = self._settle_dependencies()
        self._announce(changes)

    def _settle_dependencies(self) -> list[tuple[str, StateChange]]:
        """Recounts what each unfinished task with dependencies waits for,
        after states were set from outside (lock held)."""
        self._unmet.clear()
        finished = (TaskState.DONE, TaskState.FAILED)
        failed = []
        for task_id, record in self._records.items():
            deps = _dependencies(record.task)
            if not deps or record.state in finished:
                continue
            unmet = sum(1 for dep in deps if self._state_of(dep) is not TaskState.DONE)
            if unmet:
                self._unmet[task_id] = unmet
                self._set_state(task_id, record, TaskState.BLOCKED)
                failed.extend(d for d in deps if self._state_of(d) is TaskState.FAILED)
            elif record.state is TaskState.BLOCKED:
                self._set_state(task_id, record, TaskState.READY)
        changes = []
        for dep in dict.fromkeys(failed):
            changes.extend(self._skip_dependents_of(dep))
        return changes

    def all_finished(self) -> bool:
        """Every task DONE or FAILED (skipped tasks are FAILED)."""
        with self._lock:
            return self._finished == len(self._records)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Waits until every task is DONE or FAILED, or ``timeout`` seconds
        pass; returns ``all_finished()``."""
        with self._all_finished:
            return self._all_finished.wait_for(
                lambda: self._finished == len(self._records), timeout
            )


def _dependencies(task: Any) -> list[str]:
    """A task's dependency ids, each once."""
    return list(dict.fromkeys(getattr(task, "dependencies", None) or ()))


@dataclass(frozen=True)
class LocalSlot:
    slot_id: str
    repo_name: str
    path: Path


class LocalSlotPool:
    """``slots_per_repo`` numbered slots per repo, each a directory under
    ``root``. ``release_slot(cleanup=True)`` empties the directory."""

    def __init__(self, root: str | os.PathLike, slots_per_repo: int = 4):
        if slots_per_repo < 1:
            raise ValueError(f"slots_per_repo must be >= 1, got {slots_per_repo!r}")
        self.root = Path(root)
        self.slots_per_repo = slots_per_repo
        self._lock = threading.Lock()
        self._busy: dict[str, LocalSlot] = {}
        #: Slots whose directory exists: made once, not on every allocation.
        self._made: set[str] = set()
        #: Each repo's slots, in order.
        self._slots: dict[str, list[LocalSlot]] = {}
        self.released: Counter[str] = Counter()

    def allocate_slot(self, repo_name: str, metadata: dict | None = None) -> LocalSlot | None:
        with self._lock:
            slots = self._slots.get(repo_name)
            if slots is None:
                # Made once per repo: names and paths cost 15 µs an allocation.
                safe = _safe_name(repo_name)
                slots = self._slots[repo_name] = [
                    LocalSlot(f"{safe}-{n}", repo_name, self.root / safe / f"slot-{n}")
                    for n in range(1, self.slots_per_repo + 1)
                ]
            for slot in slots:
                if slot.slot_id not in self._busy:
                    if slot.slot_id not in self._made:
                        slot.path.mkdir(parents=True, exist_ok=True)
                        self._made.add(slot.slot_id)
                    self._busy[slot.slot_id] = slot
                    return slot
        return None

    def release_slot(self, slot_id: str, cleanup: bool = True) -> None:
        with self._lock:
            slot = self._busy.pop(slot_id, None)
            self.released[slot_id] += 1
        if slot is None:
            logger.warning("release_slot: slot %r is not allocated", slot_id)
        elif cleanup:
            try:
                # In Rust, one release of the GIL for the whole directory
                # (links removed, never followed).
                _core.empty_directory(str(slot.path))
            except FileNotFoundError:
                # Removed behind our back: the next allocation makes it again.
                with self._lock:
                    self._made.discard(slot_id)

    def busy(self) -> list[str]:
        with self._lock:
            return sorted(self._busy)


#: The orphan guard: a small process that outlives nothing it guards. It is
#: told each process group as it starts ("+PGID") and ends ("-PGID"); when
#: its stdin closes — the program ended, however it ended — it kills the
#: groups it was not told have ended.
_GUARD_SOURCE = """
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
rest = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, rest = (rest + chunk).split(b"\\n")
    for line in lines:
        if line[:1] in (b"+", b"-") and line[1:].isdigit():
            (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
    # Lines wait in the pipe meanwhile: a wake per 5 ms, not per line.
    time.sleep(0.005)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
# Nothing to clean up: the program that waits for us need not wait for
# an interpreter's shutdown.
os._exit(0)
"""


class OrphanGuard:
    """Kills the process groups of a program's runners when the program dies,
    even by SIGKILL: a helper process reads the live groups from a pipe, and
    the pipe closes when the program ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            # -S: without `site` the helper starts in a third of the time.
            [sys.executable, "-S", "-c", _GUARD_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    def _send(self, line: bytes) -> None:
        with self._lock:  # not while close() closes the pipe
            stdin = self._process.stdin
            if stdin is None or stdin.closed:
                return
            try:
                # One short write is atomic on a pipe: no buffer to flush.
                os.write(stdin.fileno(), line)
            except OSError:
                pass

    def watch(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def close(self) -> None:
        """Ends the guard; groups still registered are killed."""
        with self._lock:
            if self._process.stdin is not None and not self._process.stdin.closed:
                self._process.stdin.close()
        try:
            # Woken by its exit where there are pidfds (Popen.wait with a
            # timeout polls at growing intervals: 15 ms for a 5 ms exit).
            exited = os.pidfd_open(self._process.pid)
        except (AttributeError, OSError):
            exited = None
        if exited is not None:
            select.select([exited], [], [], 5)
            os.close(exited)
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()


def kill_leftover_groups(run_id: str, pgids: list[int]) -> list[int]:
    """Kills the process groups among ``pgids`` that still hold a process of
    the run ``run_id`` (its commands carry ``NECROCODE_RUN_ID``); a group
    whose processes belong to anything else is left alone. Linux (/proc);
    elsewhere nothing is killed. Returns the groups killed."""
    wanted = set(pgids)
    marker = f"NECROCODE_RUN_ID={run_id}".encode()
    killed: set[int] = set()
    proc = Path("/proc")
    if not wanted or not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgid = os.getpgid(int(entry.name))
            if pgid not in wanted or pgid in killed:
                continue
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            os.killpg(pgid, signal.SIGKILL)
            killed.add(pgid)
        except OSError:
            continue
    return sorted(killed)


@dataclass
class LocalRunner:
    """A running command, as ``launch`` returns it."""

    runner_id: str
    task_id: str
    spec_name: str
    pool_name: str
    slot_id: str | None
    attempt: int
    pid: int
    #: The command's stdout file (its stderr: the same name ending ``.err``).
    log_file: str
    started_at: datetime
    container_id: str | None = None
    job_name: str | None = None

    @property
    def log_path(self) -> Path:
        # Made when asked: a Path costs 5 µs, and launches are per task.
        return Path(self.log_file)


@dataclass
class _Process:
    runner: LocalRunner
    popen: subprocess.Popen | _Shell
    timeout: float | None
    keep_background: bool = False
    #: Set by ``stop()``: its outcome is not reported. A plain flag (an
    #: Event per runner cost a Condition and a lock per task, never waited on).
    stopped: bool = False
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)
    #: Set when the runner is killed at its timeout: the reason reported.
    timed_out: str | None = None
    #: After SIGTERM at a timeout: when SIGKILL follows.
    kill_at: float | None = None


class _Shell:
    """A shell started by ``_core.spawn_shell``: the part of ``Popen`` the
    launcher uses (``pid``, ``wait``, ``poll``), safe to wait on from two
    threads (the reaper, and ``stop`` waiting out the kill grace)."""

    __slots__ = ("_lock", "pid", "returncode")

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, block: bool) -> int | None:
        # The caller holds the lock: one waitpid at a time, and none after
        # the pid was reaped (it could be another process's by then).
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: no status to get
                pid, status = self.pid, 255 << 8
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        if not self._lock.acquire(blocking=False):
            return None  # another thread is waiting for it right now
        try:
            return self._reap(block=False)
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            with self._lock:
                code = self._reap(block=True)
            assert code is not None
            return code
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            code = self.poll()
            if code is not None:
                return code
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(["/bin/sh"], timeout)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)


class _Reaper:
    """One thread for every runner: it waits on their pidfds, sends the
    heartbeats, kills at timeouts and reports each exit (instead of a
    thread per runner). Linux only (``os.pidfd_open``, ``select.epoll``).

    The launching thread adds a runner's pidfd to the epoll set itself: the
    reaper wakes for an exit, a heartbeat, a timeout due, or a new runner
    whose timeout falls before its next wake, not for every launch (that
    cost a pipe write, a wake and a turn of the GIL per task)."""

    def __init__(self, launcher: SubprocessLauncher):
        self.launcher = launcher
        self._lock = threading.Lock()
        self._live: dict[int, _Process] = {}  # pidfd -> process
        #: The live processes with a timeout: all the reaper's wake time
        #: depends on besides the heartbeat (most tasks have none).
        self._timed: dict[int, _Process] = {}
        #: When the reaper next wakes by itself (monotonic); -inf while awake.
        self._sleeping_until = -math.inf
        self._epoll = select.epoll()
        self._wake_read, self._wake_write = os.pipe()
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        if not hasattr(os, "pidfd_open") or not hasattr(select, "epoll"):
            return False
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError:
            return False
        return True

    def add(self, process: _Process) -> bool:
        """Watches ``process``; False when it cannot (no pidfd: the caller
        watches it another way)."""
        try:
            # A child that exited already keeps its pidfd (readable) until reaped.
            fd = os.pidfd_open(process.popen.pid)
        except OSError:
            return False
        due = None if process.timeout is None else process.started + process.timeout
        with self._lock:
            self._live[fd] = process
            if due is not None:
                self._timed[fd] = process
            wake = due is not None and due < self._sleeping_until
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
                self._thread.start()
        self._epoll.register(fd, select.EPOLLIN)
        if wake:
            os.write(self._wake_write, b"x")
        return True

    def idle(self) -> bool:
        with self._lock:
            return not self._live

    def _next_wake(self, next_beat: float) -> float:
        """The heartbeat or the earliest timeout step due (lock held)."""
        wake_at = next_beat
        for process in self._timed.values():
            if process.kill_at is not None:
                wake_at = min(wake_at, process.kill_at)
            elif process.timeout is not None and process.timed_out is None:
                wake_at = min(wake_at, process.started + process.timeout)
        return wake_at

    def _run(self) -> None:
        interval = self.launcher.heartbeat_interval
        next_beat = time.monotonic() + interval
        while True:
            with self._lock:
                wake_at = self._sleeping_until = self._next_wake(next_beat)
            events = self._epoll.poll(max(0.0, wake_at - time.monotonic()))
            with self._lock:
                self._sleeping_until = -math.inf
            for fd, _ in events:
                if fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    continue
                with self._lock:
                    process = self._live.get(fd)
                if process is None:
                    continue
                self._epoll.unregister(fd)
                self.launcher._finish(process, process.popen.wait())
                # Only now idle(): close() must not return while an outcome
                # is still being reported.
                with self._lock:
                    del self._live[fd]
                    self._timed.pop(fd, None)
                os.close(fd)
            now = time.monotonic()
            with self._lock:
                timed = list(self._timed.values())
            for process in timed:
                if process.stopped:
                    continue
                if process.kill_at is not None and now >= process.kill_at:
                    _signal_group(process.popen.pid, signal.SIGKILL)
                    process.kill_at = None
                elif (
                    process.timeout is not None
                    and process.timed_out is None
                    and now >= process.started + process.timeout
                ):
                    process.timed_out = f"timeout after {process.timeout:g} s"
                    _signal_group(process.popen.pid, signal.SIGTERM)
                    process.kill_at = now + self.launcher.kill_grace
            if now >= next_beat:
                with self._lock:
                    live = list(self._live.values())
                for process in live:
                    if not process.stopped and process.timed_out is None:
                        self.launcher.gate.call(
                            self.launcher.dispatcher.update_heartbeat, process.runner.runner_id
                        )
                next_beat = now + interval


class _ExitGate:
    """The door between a launcher's own threads and the dispatcher, shut at
    interpreter exit. A daemon thread still inside the core when CPython
    (before 3.14) finalizes is ended there by ``pthread_exit``, and that
    unwind cannot pass the core's frames: the process aborts. So at exit no
    new call goes in, and the calls being made are waited for (atexit runs
    before finalization)."""

    def __init__(self) -> None:
        self._done = threading.Condition()
        self._closed = False
        self._inside = 0
        _GATES.add(self)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """``method(*args, **kwargs)``, unless the gate is shut (False)."""
        with self._done:
            if self._closed:
                return False
            self._inside += 1
        try:
            method(*args, **kwargs)
        finally:
            with self._done:
                self._inside -= 1
                self._done.notify_all()
        return True

    def shut(self, timeout: float) -> None:
        with self._done:
            self._closed = True
            self._done.wait_for(lambda: self._inside == 0, timeout)


_GATES: WeakSet[_ExitGate] = WeakSet()


@atexit.register
def _shut_gates_at_exit() -> None:
    for gate in list(_GATES):
        gate.shut(timeout=5.0)


#: Starts a task's shell in Rust (POSIX builds); the reaper reaps it.
_SPAWN: Callable[..., int] | None = getattr(_core, "spawn_shell", None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


class SubprocessLauncher:
    """Runs ``task.command`` (or ``task.metadata["command"]``) with ``sh -c`` in
    its slot's directory, in a process group of its own (started in Rust with
    the GIL released, where Linux gives pidfds; else with ``Popen``). One
    reaper thread (else a watcher thread per runner) sends heartbeats every
    ``heartbeat_interval`` seconds, kills the group at the task's ``timeout``,
    and reports the outcome to the dispatcher.

    The command sees ``NECROCODE_TASK_ID``, ``NECROCODE_ATTEMPT`` (1 for the
    first run), ``NECROCODE_SLOT_DIR`` and ``NECROCODE_RUN_ID``; its stdout goes
    to ``log_dir/ID.N.log`` and its stderr to ``log_dir/ID.N.err`` (N: the
    attempt); a failure's reason is the last line of stderr, else of stdout.
    When the command's shell exits, whatever it left running in its process
    group is killed before the outcome is reported (so before its slot is
    cleaned), unless the task sets ``keep_background``. With
    ``orphan_guard`` (the default) a helper process kills the runners' groups
    if this program dies without stopping them."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        dispatcher: Any = None,
        *,
        heartbeat_interval: float = 1.0,
        kill_grace: float = 2.0,
        env: dict[str, str] | None = None,
        orphan_guard: bool = True,
        run_id: str | None = None,
        attempt_of: Callable[[str], int] | None = None,
    ):
        self.log_dir = Path(log_dir)
        #: The attempt number of a task's next run; by default its retry
        #: count + 1 (the CLI counts the runs its registry saw started, so a
        #: run cut short by a restart counts too).
        self.attempt_of = attempt_of
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.dispatcher = dispatcher
        self.heartbeat_interval = heartbeat_interval
        self.kill_grace = kill_grace
        self.env = dict(os.environ if env is None else env)
        self._lock = threading.Lock()
        self._processes: dict[str, _Process] = {}
        self._count = 0
        #: Marks this launcher's commands (``NECROCODE_RUN_ID``), so that a
        #: resumed run can tell its leftovers from anything else.
        # 128 random bits as hex, as uuid4().hex (without importing uuid).
        self.run_id = run_id or os.urandom(16).hex()
        self._guard = OrphanGuard() if orphan_guard and os.name == "posix" else None
        # One thread watches every runner where pidfds exist; else a thread each.
        self._reaper = _Reaper(self) if _Reaper.available() else None
        #: What those threads call the dispatcher through (shut at exit).
        self.gate = _ExitGate()

    def launch(self, task: Any, slot: Any, pool: Any) -> LocalRunner:
        if self.dispatcher is None:
            raise RuntimeError("SubprocessLauncher.dispatcher is not set")
        command = _field(task, "command")
        if not isinstance(command, str) or not command.strip():
            raise ValueError(f"task {_field(task, 'id')!r} has no command")
        task_id = _field(task, "id")
        timeout = _field(task, "timeout")
        if self.attempt_of is not None:
            attempt = self.attempt_of(task_id)
        else:
            attempt = self.dispatcher.retry_manager.get_retry_count(task_id) + 1
        with self._lock:
            self._count += 1
            runner_id = f"local-{self._count}"
        # Paths as text: pathlib's joins cost 10-15 µs a task here. A slot's
        # Path is text already; any other path is normalised, as before.
        where = getattr(slot, "path", None) or self.log_dir
        slot_dir = str(where if isinstance(where, Path) else Path(where))
        log_file = os.path.join(self.log_dir, f"{_safe_name(task_id)}.{attempt}.log")
        err_file = log_file[: -len(".log")] + ".err"
        env = dict(
            self.env,
            NECROCODE_TASK_ID=task_id,
            NECROCODE_ATTEMPT=str(attempt),
            NECROCODE_SLOT_DIR=slot_dir,
            NECROCODE_RUN_ID=self.run_id,
        )
        popen: subprocess.Popen | _Shell
        if self._reaper is not None and _SPAWN is not None:
            # In Rust without the GIL: Popen's set-up and its wait for the
            # child's exec held the GIL for about 190 µs per task.
            popen = _Shell(_SPAWN(command, slot_dir, env, log_file, err_file))
        else:
            with open(log_file, "wb") as log, open(err_file, "wb") as err:
                popen = subprocess.Popen(
                    ["/bin/sh", "-c", command],
                    cwd=slot_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=err,
                    start_new_session=True,
                )
        metadata = _field(task, "metadata") or {}
        runner = LocalRunner(
            runner_id=runner_id,
            task_id=task_id,
            spec_name=metadata.get("spec_name", "unknown"),
            pool_name=_pool_name(pool),
            slot_id=getattr(slot, "slot_id", None),
            attempt=attempt,
            pid=popen.pid,
            log_file=log_file,
            started_at=datetime.now(),
        )
        if self._guard is not None:
            self._guard.watch(popen.pid)
        process = _Process(
            runner,
            popen,
            float(timeout) if timeout else None,
            keep_background=bool(_field(task, "keep_background")),
        )
        with self._lock:
            self._processes[runner_id] = process
        if self._reaper is None or not self._reaper.add(process):
            process.thread = threading.Thread(
                target=self._watch, args=(process,), name=f"watch-{runner_id}", daemon=True
            )
            process.thread.start()
        return runner

    def stop(self, runner_id: str) -> None:
        """Kills the runner's process group; its outcome is not reported (the
        dispatcher that asked already applied it)."""
        with self._lock:
            process = self._processes.get(runner_id)
        if process is not None:
            process.stopped = True
            self._kill(process)

    def close(self, timeout: float = 10.0) -> None:
        """Stops every runner still running and waits for the watchers."""
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            if process.popen.poll() is None:
                self.stop(process.runner.runner_id)
        for process in processes:
            if process.thread is not None:
                process.thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self._reaper is not None and not self._reaper.idle():
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def process_groups(self) -> list[int]:
        """The process groups of the runners still running."""
        with self._lock:
            return sorted(p.popen.pid for p in self._processes.values())

    def close_guard(self) -> None:
        """Ends the orphan guard (after ``close()``)."""
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    def running(self) -> list[LocalRunner]:
        with self._lock:
            return [p.runner for p in self._processes.values()]

    def _kill(self, process: _Process) -> None:
        pid = process.popen.pid
        for sig, wait in ((signal.SIGTERM, self.kill_grace), (signal.SIGKILL, None)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            try:
                process.popen.wait(wait)
                # The shell is gone; make sure nothing it started lingers.
                os.killpg(pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def _watch(self, process: _Process) -> None:
        runner = process.runner
        started = time.monotonic()
        reason = None
        while True:
            wait = self.heartbeat_interval
            if process.timeout is not None:
                wait = min(wait, max(0.0, started + process.timeout - time.monotonic()))
            try:
                code = process.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                pass
            if process.stopped:
                break
            if process.timeout is not None and time.monotonic() >= started + process.timeout:
                reason = f"timeout after {process.timeout:g} s"
                self._kill(process)
                code = process.popen.wait()
                break
            self.gate.call(self.dispatcher.update_heartbeat, runner.runner_id)
        process.timed_out = reason
        self._finish(process, code)

    def _finish(self, process: _Process, code: int) -> None:
        """A runner's shell exited with ``code``: what it left running is
        killed, then the outcome is reported (unless it was stopped)."""
        runner = process.runner
        reason = process.timed_out
        if not process.keep_background:
            # The shell is gone; what it left in its group ends with it,
            # before the outcome (and so the slot's cleanup) is reported.
            try:
                os.killpg(process.popen.pid, signal.SIGKILL)
            except OSError:
                pass
        if self._guard is not None:
            self._guard.forget(process.popen.pid)
        with self._lock:
            self._processes.pop(runner.runner_id, None)
        if process.stopped:
            return
        if reason is None and code != 0:
            reason = _exit_reason(code, runner.log_path)
        try:
            self.gate.call(
                self.dispatcher.handle_runner_completion,
                runner.runner_id,
                task_id=runner.task_id,
                spec_name=runner.spec_name,
                success=reason is None,
                slot_id=runner.slot_id,
                pool_name=runner.pool_name,
                failure_reason=reason,
                timed_out=process.timed_out is not None,
            )
        except Exception:
            logger.exception("reporting runner %s failed", runner.runner_id)


def _exit_reason(code: int, log_path: Path) -> str:
    """``exit code N: <last line>``: the last line of stderr when the command
    wrote any (its error, not a progress line on stdout), else of stdout."""
    if code < 0:
        try:
            reason = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            reason = f"killed by signal {-code}"
    else:
        reason = f"exit code {code}"
    last = _last_line(log_path.with_suffix(".err")) or _last_line(log_path)
    return f"{reason}: {last}" if last else reason


def _last_line(path: Path, limit: int = 120) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    last = lines[-1].strip() if lines else ""
    return last if len(last) <= limit else last[: limit - 1] + "…"


class JsonlEventRecorder:
    """Writes each event as a JSON line: ``event``, ``time`` (local ISO),
    ``elapsed`` (monotonic seconds since the recorder was made) and the event's
    keyword arguments. Thread-safe; each line is written whole with one
    ``write`` (made in Rust: ``_core.JsonLineLog``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = _core.JsonLineLog(str(self.path))

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        self._log.write(event, fields)

    def record_task_skipped(self, spec_name, task_id, failed_dependency):
        """A task that will not run: a task it depends on failed for good."""
        self._write(
            "task_skipped",
            {"spec_name": spec_name, "task_id": task_id, "failed_dependency": failed_dependency},
        )

    def record_task_assigned(self, spec_name, task_id, runner_id, slot_id, pool_name, timestamp):
        self._write(
            "task_assigned",
            {
                "spec_name": spec_name,
                "task_id": task_id,
                "runner_id": runner_id,
                "slot_id": slot_id,
                "pool_name": pool_name,
                "timestamp": timestamp,
            },
        )

    def record_runner_started(
        self,
        spec_name,
        task_id,
        runner_id,
        slot_id,
        pool_name,
        pid,
        container_id,
        job_name,
        timestamp,
    ):
        self._write(
            "runner_started",
            {
                "spec_name": spec_name,
                "task_id": task_id,
                "runner_id": runner_id,
                "slot_id": slot_id,
                "pool_name": pool_name,
                "pid": pid,
                "container_id": container_id,
                "job_name": job_name,
                "timestamp": timestamp,
            },
        )

    def record_runner_finished(
        self,
        spec_name,
        task_id,
        runner_id,
        slot_id,
        success,
        execution_time_seconds,
        failure_reason,
    ):
        self._write(
            "runner_finished",
            {
                "spec_name": spec_name,
                "task_id": task_id,
                "runner_id": runner_id,
                "slot_id": slot_id,
                "success": success,
                "execution_time_seconds": execution_time_seconds,
                "failure_reason": failure_reason,
            },
        )

    def record_task_completed(self, spec_name, task_id, runner_id, execution_time_seconds):
        self._write(
            "task_completed",
            {
                "spec_name": spec_name,
                "task_id": task_id,
                "runner_id": runner_id,
                "execution_time_seconds": execution_time_seconds,
            },
        )

    def record_task_failed(self, spec_name, task_id, runner_id, failure_reason, retry_count):
        self._write(
            "task_failed",
            {
                "spec_name": spec_name,
                "task_id": task_id,
                "runner_id": runner_id,
                "failure_reason": failure_reason,
                "retry_count": retry_count,
            },
        )

    def close(self) -> None:
        self._log.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        """The events of a log file, in order."""
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
