"""Tasks on a Ray cluster: a runner launcher for the dispatcher's
``runner_launcher`` port that runs each task's command as a Ray task.

``pip install 'necrocode-dispatch[ray]'``; nothing imports Ray unless a
``RayLauncher`` is made. The dispatcher (its core, its state file, its event
log) stays on the machine that runs it; each command runs on whichever node
Ray places it, in a working directory of its own there, and its output comes
back to ``log_dir`` when it ends.

- ``launch(task, slot, pool)`` submits the command with the pool's resource
  request (``num_cpus``, ``num_gpus``, ``resources`` from the pool's
  ``config``); with ``skill_resources`` the task's ``required_skill`` is asked
  for as a custom resource of that name (0.001 of it: a node offering the
  resource qualifies, however many tasks it already runs).
- While it runs the launcher sends heartbeats; when it ends it reports the
  completion (``exit code N: <last line of stderr, else stdout>``), or
  ``timeout after N s`` when the task's ``timeout`` passed (the command's
  process group is killed on its node).
- A node or worker dying is reported as a failure, ``node died: ...``: the
  dispatcher's retry policy decides what comes next. Ray itself never
  retries (``max_retries=0``), so a command never runs twice at once.
- ``stop(runner_id)`` cancels the Ray task: the command's process group is
  killed on its node; after ``kill_grace`` seconds the worker is killed too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from necrocode_dispatch.local import _ExitGate, _field, _safe_name

__all__ = ["RayLauncher", "RayRunner", "check_address", "node_died"]

logger = logging.getLogger(__name__)

#: Output kept from each stream of a command (its end), brought back to log_dir.
OUTPUT_LIMIT = 1 << 20
#: The share of a skill's custom resource one task asks for.
SKILL_SHARE = 0.001


@dataclass
class RayRunner:
    """A command running as a Ray task, as ``launch`` returns it."""

    runner_id: str
    task_id: str
    spec_name: str
    pool_name: str
    slot_id: str | None
    attempt: int
    log_path: Path
    started_at: datetime
    pid: int | None = None
    container_id: str | None = None
    job_name: str | None = None


@dataclass
class _Submitted:
    runner: RayRunner
    ref: Any
    stopped: bool = False
    cancelled_at: float | None = None
    forced: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _run_command(command: str, env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Runs on a Ray worker: the command in a process group of its own, in a
    fresh working directory on this node; returns its outcome and output."""
    import ctypes
    import shutil
    import signal
    import subprocess
    import tempfile

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    workdir = tempfile.mkdtemp(prefix="necrocode-ray-")
    out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        prctl = None

    def die_with_the_worker() -> None:
        # If the worker is killed (node death, forced cancel), so is the shell.
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    env = dict(os.environ, **env, NECROCODE_SLOT_DIR=workdir, NECROCODE_NODE_ID=node_id)
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=die_with_the_worker if prctl is not None else None,
        )
    try:
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    finally:
        # Cancelled (KeyboardInterrupt), finished or timed out: nothing the
        # command started outlives it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass

    def tail(path: str) -> bytes:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - OUTPUT_LIMIT))
            return f.read()

    result = {
        "exit_code": code,
        "timed_out": timed_out,
        "stdout": tail(out_path),
        "stderr": tail(err_path),
        "node_id": node_id,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def node_died(error: BaseException) -> str:
    """``node died: ...`` for the errors Ray raises when a task's node or
    worker went away."""
    text = " ".join(str(error).split())
    return f"node died: {type(error).__name__}: {text[:200]}"


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Raises ``ConnectionError`` naming ``address`` when nothing answers
    there (``ray.init`` itself would wait for minutes). ``None`` (a local Ray
    started for the run) and ``"auto"`` are resolved by Ray."""
    import socket

    if address in (None, "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach Ray at {address!r}: {e.strerror or e}") from None


class RayLauncher:
    """Runs task commands as Ray tasks (see the module's doc).

    ``address``: ``None`` starts a local Ray for this launcher (shut down by
    ``close()``); ``"auto"``, ``"host:port"`` or ``"ray://host:port"`` join
    a running cluster. ``attempt_of(task_id)`` gives the attempt number (as
    for ``SubprocessLauncher``)."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        dispatcher: Any = None,
        *,
        address: str | None = None,
        heartbeat_interval: float = 1.0,
        kill_grace: float = 2.0,
        env: dict[str, str] | None = None,
        attempt_of: Any = None,
        run_id: str | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.dispatcher = dispatcher
        self.address = address
        self.heartbeat_interval = heartbeat_interval
        self.kill_grace = kill_grace
        self.env = dict(env or {})
        self.attempt_of = attempt_of
        self.run_id = run_id or uuid.uuid4().hex
        self._lock = threading.Lock()
        self._submitted: dict[str, _Submitted] = {}
        self._count = 0
        self._closed = threading.Event()
        self._started_ray = False
        self._remote: Any = None
        self._monitor: threading.Thread | None = None
        #: What the monitor calls the dispatcher through (shut at exit).
        self.gate = _ExitGate()
        self._totals: tuple[float, dict[str, float]] | None = None

    # -- connection -----------------------------------------------------------------

    def connect(self) -> None:
        """Joins (or starts) Ray; done by the first launch when not before."""
        import ray

        with self._lock:
            if self._remote is not None:
                return
            # Nodes need Ray, not this package: the command runner travels
            # by value.
            import sys

            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
            if not ray.is_initialized():
                check_address(self.address)
                ray.init(
                    # "local": a new Ray even when one runs on this machine.
                    address=self.address or "local",
                    namespace="necrocode-dispatch",
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    include_dashboard=False if self.address is None else None,
                    configure_logging=False,
                )
                self._started_ray = True
            self._remote = ray.remote(max_retries=0, retry_exceptions=False)(_run_command)
            self._monitor = threading.Thread(
                target=self._watch, name="necrocode-ray-monitor", daemon=True
            )
            self._monitor.start()

    # -- the runner launcher port -------------------------------------------------------

    def launch(self, task: Any, slot: Any, pool: Any) -> RayRunner:
        if self.dispatcher is None:
            raise RuntimeError("RayLauncher.dispatcher is not set")
        command = _field(task, "command")
        if not isinstance(command, str) or not command.strip():
            raise ValueError(f"task {_field(task, 'id')!r} has no command")
        self.connect()
        task_id = _field(task, "id")
        attempt = (
            self.attempt_of(task_id)
            if self.attempt_of is not None
            else self.dispatcher.retry_manager.get_retry_count(task_id) + 1
        )
        timeout = _field(task, "timeout")
        config = dict(getattr(pool, "config", None) or {})
        resources = dict(config.get("resources") or {})
        skill = _field(task, "required_skill")
        if skill and config.get("skill_resources"):
            resources[skill] = resources.get(skill, 0) + SKILL_SHARE
        options: dict[str, Any] = {"num_cpus": config.get("num_cpus", 1)}
        if config.get("num_gpus"):
            options["num_gpus"] = config["num_gpus"]
        if resources:
            options["resources"] = resources
        env = dict(
            self.env,
            NECROCODE_TASK_ID=task_id,
            NECROCODE_ATTEMPT=str(attempt),
            NECROCODE_RUN_ID=self.run_id,
        )
        self._check_feasible(options)
        ref = self._remote.options(**options).remote(
            command, env, float(timeout) if timeout else None
        )
        with self._lock:
            self._count += 1
            runner_id = f"ray-{self._count}"
        metadata = _field(task, "metadata") or {}
        runner = RayRunner(
            runner_id=runner_id,
            task_id=task_id,
            spec_name=metadata.get("spec_name", "unknown"),
            pool_name=getattr(pool, "name", str(pool)),
            slot_id=getattr(slot, "slot_id", None),
            attempt=attempt,
            log_path=self.log_dir / f"{_safe_name(task_id)}.{attempt}.log",
            started_at=datetime.now(),
        )
        with self._lock:
            self._submitted[runner_id] = _Submitted(runner, ref, extra={"timeout": timeout})
        return runner

    def _check_feasible(self, options: dict[str, Any]) -> None:
        """Refuses a request no node of the cluster can meet: Ray would keep
        such a task pending for ever (as "infeasible"), and the run with it.
        The cluster's totals are read at most every few seconds."""
        import ray

        now = time.monotonic()
        if self._totals is None or now - self._totals[0] > 5.0:
            self._totals = (now, ray.cluster_resources())
        totals = self._totals[1]
        wanted = dict(options.get("resources") or {})
        wanted["CPU"] = options.get("num_cpus", 1)
        if options.get("num_gpus"):
            wanted["GPU"] = options["num_gpus"]
        for name, amount in wanted.items():
            if amount and totals.get(name, 0) < amount:
                have = totals.get(name, 0)
                raise RuntimeError(
                    f"no node of the Ray cluster offers {amount:g} {name} "
                    f"(the cluster has {have:g})"
                )

    def stop(self, runner_id: str) -> None:
        """Cancels the runner's Ray task (its process group is killed on its
        node); its outcome is not reported."""
        import ray

        with self._lock:
            submitted = self._submitted.get(runner_id)
            if submitted is None or submitted.stopped:
                return
            submitted.stopped = True
            submitted.cancelled_at = time.monotonic()
        try:
            ray.cancel(submitted.ref, force=False)
        except Exception as e:  # the task may have ended meanwhile
            logger.debug("cancelling %s: %s", runner_id, e)

    def running(self) -> list[RayRunner]:
        with self._lock:
            return [s.runner for s in self._submitted.values() if not s.stopped]

    def close(self, timeout: float = 10.0) -> None:
        """Cancels what still runs, waits for the cancellations, and shuts
        down a Ray this launcher started."""
        with self._lock:
            live = [s.runner.runner_id for s in self._submitted.values() if not s.stopped]
        for runner_id in live:
            self.stop(runner_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._submitted:
                    break
            time.sleep(0.05)
        self._closed.set()
        if self._monitor is not None:
            self._monitor.join(timeout)
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    # -- watching -----------------------------------------------------------------------

    def _watch(self) -> None:
        import ray

        last_beat = time.monotonic()
        while not self._closed.is_set():
            with self._lock:
                by_ref = {s.ref: s for s in self._submitted.values()}
            if not by_ref:
                time.sleep(0.02)
                continue
            done, _ = ray.wait(
                list(by_ref), num_returns=len(by_ref), timeout=min(0.05, self.heartbeat_interval)
            )
            for ref in done:
                self._finish(by_ref[ref], ref)
            now = time.monotonic()
            self._force_overdue_cancellations(now)
            if now - last_beat >= self.heartbeat_interval:
                last_beat = now
                with self._lock:
                    beating = [
                        s.runner.runner_id for s in self._submitted.values() if not s.stopped
                    ]
                for runner_id in beating:
                    try:
                        self.gate.call(self.dispatcher.update_heartbeat, runner_id)
                    except Exception:
                        logger.exception("heartbeat for %s failed", runner_id)

    def _force_overdue_cancellations(self, now: float) -> None:
        import ray

        with self._lock:
            overdue = [
                s
                for s in self._submitted.values()
                if s.cancelled_at is not None
                and not s.forced
                and now - s.cancelled_at >= self.kill_grace
            ]
            for s in overdue:
                s.forced = True
        for s in overdue:
            try:
                ray.cancel(s.ref, force=True)
            except Exception as e:
                logger.debug("forcing the cancellation of %s: %s", s.runner.runner_id, e)

    def _finish(self, submitted: _Submitted, ref: Any) -> None:
        import ray

        runner = submitted.runner
        reason: str | None
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            result, reason = None, "cancelled"
        except (
            ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.LocalRayletDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.RaySystemError,
        ) as e:
            result, reason = None, node_died(e)
        except Exception as e:  # the command could not even start there
            result, reason = None, f"ray task failed: {type(e).__name__}: {e}"[:300]
        if result is not None:
            runner.log_path.write_bytes(result["stdout"])
            runner.log_path.with_suffix(".err").write_bytes(result["stderr"])
            timeout = submitted.extra.get("timeout")
            if result["timed_out"]:
                reason = f"timeout after {float(timeout):g} s"
            elif result["exit_code"] != 0:
                reason = _exit_reason(result)
            else:
                reason = None
        with self._lock:
            self._submitted.pop(runner.runner_id, None)
            stopped = submitted.stopped
        if stopped:
            return  # the dispatcher that stopped it already applied an outcome
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
                timed_out=bool(result and result["timed_out"]),
            )
        except Exception:
            logger.exception("reporting runner %s failed", runner.runner_id)


def _exit_reason(result: dict[str, Any]) -> str:
    code = result["exit_code"]
    reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    for stream in ("stderr", "stdout"):
        lines = result[stream].decode("utf-8", "replace").strip().splitlines()
        if lines:
            last = lines[-1].strip()
            return f"{reason}: {last[:119] + '…' if len(last) > 120 else last}"
    return reason
