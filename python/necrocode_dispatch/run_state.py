"""``necrocode-dispatch run --state FILE``: what a run has done, saved after
every change of a task's state, so that a run stopped at any moment (Ctrl-C,
a crash, SIGKILL) resumes where it was: done and failed tasks are not run
again, and retry counts and pending backoffs carry on.

The file is JSON: each task's state and history, and the dispatcher's own
snapshot (retry records and delayed tasks, due times as wall-clock times).
It is replaced atomically on every save (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from necrocode_dispatch._core import write_atomically

FORMAT = "necrocode-dispatch run state"
VERSION = 1


class StateFileError(ValueError):
    """A state file that cannot be resumed from; nothing was loaded."""


class RunState:
    def __init__(self, path: str | Path, job: str):
        self.path = Path(path)
        self.job = job
        self._lock = threading.Lock()
        self.save_error: OSError | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no file yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateFileError(f"{self.path}: cannot read the state file: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StateFileError(f"{self.path}: not a run state (truncated?): {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StateFileError(f"{self.path}: not a run state of {FORMAT!r}")
        if data.get("version") != VERSION:
            raise StateFileError(
                f"{self.path}: unsupported run state version {data.get('version')!r}"
            )
        for key in ("tasks", "dispatcher"):
            if not isinstance(data.get(key), dict):
                raise StateFileError(f"{self.path}: {key!r} is missing or not a mapping")
        return data

    def save(self, registry: Any, dispatcher: Any, launcher: Any = None) -> None:
        """Writes the current state. Saves are serialised, so the file always
        ends with the latest one. With the launcher, its run id and the
        process groups it runs are kept too, so that a resumed run can kill
        what a dead one left running."""
        with self._lock:
            data = {
                "format": FORMAT,
                "version": VERSION,
                "job": self.job,
                "saved_at": datetime.now().isoformat(),
                "tasks": registry.snapshot(),
                "dispatcher": dispatcher.snapshot(),
            }
            if launcher is not None:
                data["run_id"] = launcher.run_id
                data["process_groups"] = launcher.process_groups()
            try:
                write_atomically(self.path, json.dumps(data))
            except OSError as e:
                # The run goes on; the caller reports it at the end.
                self.save_error = e
