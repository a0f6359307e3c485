"""``necrocode-dispatch run --state FILE``: what a run has done, kept so that a
run stopped at any moment (Ctrl-C, a crash, SIGKILL) resumes where it was:
done and failed tasks are not run again, and retry counts and pending
backoffs carry on.

The file is a journal of JSON lines, O(1) to extend per change:

- a header (``format``, ``version``, ``job``);
- ``{"t": "tasks", ...}``: every task's state and history at a point;
- ``{"t": "change", ...}``: one task's change of state, written (and flushed
  to the kernel) by the registry's listener, so before the change is
  acknowledged — a DONE that was reported is in the file even if the
  process is killed the next moment;
- ``{"t": "dispatcher", ...}``: the dispatcher's snapshot (retry records,
  delayed tasks, reports not yet delivered), after every retry or failure;
- ``{"t": "groups", ...}``: the run's id and its commands' process groups.

When the journal grows past four lines per task it is compacted: rewritten
atomically (temporary file, fsync, rename) as a header and one snapshot of
each kind. A line torn by a kill at the end of the file is ignored. Files of
the earlier single-JSON form (version 1) are read too.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from necrocode_dispatch._core import write_atomically

FORMAT = "necrocode-dispatch run state"
VERSION = 2
#: Compaction happens past this many lines per task (and at least this many).
LINES_PER_TASK = 4
MIN_LINES = 256


class StateFileError(ValueError):
    """A state file that cannot be resumed from; nothing was loaded."""


class RunState:
    def __init__(self, path: str | Path, job: str, fingerprint: str | None = None):
        self.path = Path(path)
        self.job = job
        #: The job's fingerprint (``Job.fingerprint()``), kept in the header.
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._file: Any = None
        self._lines = 0
        self._limit = MIN_LINES
        self.save_error: OSError | None = None

    # -- reading ------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        """The saved state (``tasks``, ``dispatcher``, ``run_id``,
        ``process_groups``), or None when there is no file yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateFileError(f"{self.path}: cannot read the state file: {e}") from None
        lines = text.splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError as e:
            raise StateFileError(f"{self.path}: not a run state (truncated?): {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise StateFileError(f"{self.path}: not a run state of {FORMAT!r}")
        if header.get("version") == 1:
            data = header
        elif header.get("version") == VERSION:
            data = self._replay(header, lines[1:])
        else:
            raise StateFileError(
                f"{self.path}: unsupported run state version {header.get('version')!r}"
            )
        for key in ("tasks", "dispatcher"):
            if not isinstance(data.get(key), dict):
                raise StateFileError(f"{self.path}: {key!r} is missing or not a mapping")
        return data

    def _replay(self, header: dict[str, Any], lines: list[str]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job": header.get("job"),
            "fingerprint": header.get("fingerprint"),
            "tasks": None,
            "dispatcher": None,
        }
        for number, line in enumerate(lines, start=2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(lines) + 1:
                    break  # the last line, torn by a kill while it was written
                raise StateFileError(f"{self.path}: line {number} is not JSON: {e}") from None
            kind = entry.get("t") if isinstance(entry, dict) else None
            if kind == "tasks":
                data["tasks"] = entry.get("tasks")
            elif kind == "dispatcher":
                data["dispatcher"] = entry.get("snapshot")
            elif kind == "groups":
                data["run_id"] = entry.get("run_id")
                data["process_groups"] = entry.get("pgids")
            elif kind == "change":
                self._apply(data, entry, number)
            else:
                raise StateFileError(f"{self.path}: line {number}: unknown entry {kind!r}")
        return data

    def _apply(self, data: dict[str, Any], entry: dict[str, Any], number: int) -> None:
        tasks = data["tasks"]
        task_id = entry.get("task")
        if not isinstance(tasks, dict) or not isinstance(task_id, str):
            raise StateFileError(f"{self.path}: line {number}: a change before any tasks")
        record = tasks.setdefault(task_id, {"state": "ready", "history": []})
        record["state"] = entry.get("state")
        record["history"].append(
            {"state": entry.get("state"), "metadata": entry.get("metadata"), "at": entry.get("at")}
        )

    def check_job(self, saved: dict[str, Any]) -> None:
        """Refuses a state that another job wrote (its fingerprint differs);
        files written before fingerprints were kept are taken as they are."""
        theirs = saved.get("fingerprint")
        if theirs is not None and self.fingerprint is not None and theirs != self.fingerprint:
            raise StateFileError(
                f"{self.path}: written by another job ({saved.get('job')}: other tasks, "
                "commands or dependencies); --fresh starts over and replaces it"
            )

    def check_writable(self) -> None:
        """Fails now, before anything runs, if the state cannot be saved."""
        if self.path.is_dir():
            raise StateFileError(f"{self.path}: is a directory")
        try:
            write_atomically(self.path.parent / f".{self.path.name}.probe", "")
        except OSError as e:
            raise StateFileError(f"{self.path}: cannot be written: {e.strerror or e}") from None
        try:
            (self.path.parent / f".{self.path.name}.probe").unlink()
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------

    def save(self, registry: Any, dispatcher: Any, launcher: Any = None) -> None:
        """Rewrites the whole state (a compacted journal) and keeps the file
        open for ``record``."""
        with self._lock:
            self._compact(registry, dispatcher, launcher)

    def record(
        self,
        task_id: str,
        state: Any,
        metadata: dict[str, Any],
        registry: Any,
        dispatcher: Any,
        launcher: Any = None,
    ) -> None:
        """Appends one task's change of state (called by the registry's
        listener, before the report that made it returns)."""
        value = getattr(state, "value", state)
        lines = [
            {
                "t": "change",
                "task": task_id,
                "state": value,
                "metadata": metadata,
                "at": datetime.now().isoformat(),
            }
        ]
        if value in ("ready", "failed"):
            # Retry counts and backoffs changed: they must survive a kill.
            lines.append({"t": "dispatcher", "snapshot": dispatcher.snapshot()})
        elif value == "running" and launcher is not None:
            lines.append(self._groups(launcher))
        with self._lock:
            if self._file is None or self._lines + len(lines) > self._limit:
                self._compact(registry, dispatcher, launcher)
                return
            self._append(lines)

    def close(self, registry: Any, dispatcher: Any, launcher: Any = None) -> None:
        """A last compaction (so the file is small and synced), then closes."""
        with self._lock:
            self._compact(registry, dispatcher, launcher)
            if self._file is not None:
                self._file.close()
                self._file = None

    def _groups(self, launcher: Any) -> dict[str, Any]:
        return {"t": "groups", "run_id": launcher.run_id, "pgids": launcher.process_groups()}

    def _append(self, lines: list[dict[str, Any]]) -> None:
        try:
            self._file.write("".join(json.dumps(line) + "\n" for line in lines))
            # Flushed to the kernel: a SIGKILL of this process loses nothing.
            self._file.flush()
            self._lines += len(lines)
        except OSError as e:
            self.save_error = e

    def _compact(self, registry: Any, dispatcher: Any, launcher: Any) -> None:
        tasks = registry.snapshot()
        lines = [
            {
                "format": FORMAT,
                "version": VERSION,
                "job": self.job,
                "fingerprint": self.fingerprint,
            },
            {"t": "tasks", "tasks": tasks, "saved_at": datetime.now().isoformat()},
            {"t": "dispatcher", "snapshot": dispatcher.snapshot()},
        ]
        if launcher is not None:
            lines.append(self._groups(launcher))
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            write_atomically(self.path, "".join(json.dumps(line) + "\n" for line in lines))
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            # The run goes on; the caller reports it at the end.
            self.save_error = e
            return
        self._lines = len(lines)
        self._limit = max(MIN_LINES, LINES_PER_TASK * len(tasks))
