"""Running NecroCode's own components on the Rust core (SPEC §8).

``NecroCodeDispatcherCore(config)`` builds what NecroCode's dispatcher builds
from its config — ``TaskRegistry``, ``TaskMonitor``, ``repo_pool.PoolManager``,
``RunnerLauncher``, ``EventRecorder`` — and wires them to the core through
the adapters below, each usable on its own:

- ``RegistryTaskSource``: polls the registry's READY tasks spec by spec, keeps
  those whose dependencies are DONE, and names each task's spec and repo
  (``spec_repos``, else the only repo pool); also the dependency graph for
  deadlock checks.
- ``RegistryReports``: the registry as the core reports to it, in NecroCode's
  own ``TaskState``; a terminal report the registry refuses from READY goes
  through RUNNING, so a finished task is never left READY.
- ``WatchedLauncher``: NecroCode's launcher with its local-process runners
  watched — heartbeats while the process lives, its exit reported as the
  runner's completion, ``stop()`` ending its process group. Docker and
  Kubernetes pools are launched by NecroCode's launchers.

Imported only when used; it needs ``necrocode`` importable.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from necrocode.dispatcher.config import DispatcherConfig as NecroConfig
from necrocode.dispatcher.event_recorder import EventRecorder
from necrocode.dispatcher.models import AgentPool as NecroPool
from necrocode.dispatcher.models import PoolStatus, PoolType, Runner, RunnerState
from necrocode.dispatcher.runner_launcher import RunnerLauncher
from necrocode.dispatcher.task_monitor import TaskMonitor
from necrocode.repo_pool.pool_manager import PoolManager
from necrocode.task_registry import TaskRegistry
from necrocode.task_registry.exceptions import InvalidStateTransitionError
from necrocode.task_registry.models import TaskState

from necrocode_dispatch._core import DispatcherCore as _Core
from necrocode_dispatch.exceptions import DispatcherError
from necrocode_dispatch.local import _ExitGate, _last_line

logger = logging.getLogger(__name__)

__all__ = [
    "NecroCodeDispatcherCore",
    "RegistryReports",
    "RegistryTaskSource",
    "WatchedLauncher",
    "as_necrocode_pool",
]


def _value(enum_or_value: Any) -> Any:
    return getattr(enum_or_value, "value", enum_or_value)


def as_necrocode_pool(pool: Any) -> NecroPool:
    """Any pool object (this package's ``AgentPool``, NecroCode's, a dict-like
    with the same fields) as NecroCode's ``AgentPool``, by value."""
    if isinstance(pool, NecroPool):
        return pool
    return NecroPool(
        name=pool.name,
        type=PoolType(_value(pool.type)),
        max_concurrency=pool.max_concurrency,
        cpu_quota=getattr(pool, "cpu_quota", None),
        memory_quota=getattr(pool, "memory_quota", None),
        enabled=getattr(pool, "enabled", True),
        config=dict(getattr(pool, "config", None) or {}),
    )


class RegistryTaskSource:
    """NecroCode's ``TaskRegistry`` as the core's task source.

    A task's repo comes from ``spec_repos[spec]``; without an entry, the one
    repo pool when there is exactly one (``repo_names``); otherwise the task
    stays READY and the problem is logged once per spec."""

    def __init__(
        self,
        registry: TaskRegistry,
        spec_repos: dict[str, str] | None = None,
        repo_names: Any = None,
    ):
        self.registry = registry
        self.spec_repos = dict(spec_repos or {})
        self.repo_names = repo_names
        self._warned: set[str] = set()

    def _repo_for(self, spec: str) -> str | None:
        if spec in self.spec_repos:
            return self.spec_repos[spec]
        names = list(self.repo_names() if callable(self.repo_names) else self.repo_names or [])
        if len(names) == 1:
            return names[0]
        if spec not in self._warned:
            self._warned.add(spec)
            logger.error(
                "spec %r: no repo for its tasks (spec_repos has no entry, and there are "
                "%d repo pools: %s); its tasks stay READY",
                spec,
                len(names),
                ", ".join(names) or "none",
            )
        return None

    def _tasksets(self) -> list[Any]:
        tasksets = []
        for spec in self.registry.task_store.list_tasksets():
            try:
                tasksets.append(self.registry.get_taskset(spec))
            except Exception as e:  # a taskset being rewritten, a bad file
                logger.debug("taskset %r not readable: %s", spec, e)
        return tasksets

    def poll_ready_tasks(self) -> list[Any]:
        ready = []
        for taskset in self._tasksets():
            states = {t.id: t.state for t in taskset.tasks}
            for task in taskset.tasks:
                if task.state is not TaskState.READY:
                    continue
                if any(states.get(dep) is not TaskState.DONE for dep in task.dependencies):
                    continue
                repo = task.metadata.get("repo_name") or self._repo_for(taskset.spec_name)
                if repo is None:
                    continue
                task.metadata.setdefault("spec_name", taskset.spec_name)
                task.metadata.setdefault("repo_name", repo)
                ready.append(task)
        return ready

    def dependency_graph(self) -> dict[str, list[str]]:
        """``{task_id: [ids it waits for]}`` over every taskset (ids qualified
        as ``spec/id`` when several tasksets hold tasks)."""
        tasksets = self._tasksets()
        qualify = len(tasksets) > 1
        graph = {}
        for taskset in tasksets:
            name = (lambda i, s=taskset.spec_name: f"{s}/{i}") if qualify else (lambda i: i)
            for task in taskset.tasks:
                graph[name(task.id)] = [name(dep) for dep in task.dependencies]
        return graph


class RegistryReports:
    """NecroCode's ``TaskRegistry`` as the core reports to it: states in its
    own ``TaskState``. Its registry refuses READY -> FAILED; such a report
    goes through RUNNING first, so the task ends FAILED instead of READY."""

    def __init__(self, registry: TaskRegistry):
        self.registry = registry

    def update_task_state(self, spec_name, task_id, new_state, metadata=None):
        state = TaskState(_value(new_state))
        try:
            self.registry.update_task_state(spec_name, task_id, state, metadata)
        except InvalidStateTransitionError:
            if state is not TaskState.FAILED:
                raise
            self.registry.update_task_state(spec_name, task_id, TaskState.RUNNING, {})
            self.registry.update_task_state(spec_name, task_id, state, metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)


class _Watched:
    def __init__(self, runner: Runner, process: subprocess.Popen, log_path: Path):
        self.runner = runner
        self.process = process
        self.log_path = log_path
        self.stopped = threading.Event()


class WatchedLauncher:
    """NecroCode's ``RunnerLauncher`` with its local-process runners watched.

    A local-process runner starts as NecroCode starts it (its runner script,
    ``RUNNER_ID``, ``TASK_CONTEXT``, ``POOL_NAME`` and ``RUNNER_<KEY>`` for
    the pool's config, in the slot's directory), but in a process group of
    its own with its output in ``log_dir``: a watcher thread sends heartbeats
    while it lives and reports its exit as the runner's completion
    (``exit code N: last line`` as the reason when N is not 0); ``stop``
    ends its process group. A pool's ``config["runner_script"]`` replaces
    NecroCode's runner script (``python -m necrocode.agent_runner``) for that
    pool. Other pool types go to NecroCode's launchers."""

    def __init__(
        self,
        launcher: RunnerLauncher,
        dispatcher: Any = None,
        log_dir: str | os.PathLike | None = None,
        heartbeat_interval: float = 1.0,
    ):
        self.launcher = launcher
        self.dispatcher = dispatcher
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="necrocode-runners-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_interval = heartbeat_interval
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}
        #: What the watchers call the dispatcher through (shut at exit).
        self.gate = _ExitGate()

    def check_pools(self, pools: Any) -> None:
        """Refuses, before anything runs, pools whose client library is
        missing (NecroCode's Docker and Kubernetes launchers need one)."""
        for pool in pools or ():
            kind = PoolType(_value(pool.type))
            module = {PoolType.DOCKER: "docker", PoolType.KUBERNETES: "kubernetes"}.get(kind)
            if module is None or not getattr(pool, "enabled", True):
                continue
            try:
                __import__(module)
            except ImportError:
                raise DispatcherError(
                    f"pool {pool.name!r} is {kind.value}: the {module!r} library is not "
                    f"installed (pip install {module}), so its runners cannot start"
                ) from None

    def launch(self, task: Any, slot: Any, pool: Any) -> Runner:
        pool = as_necrocode_pool(pool)
        if pool.type is not PoolType.LOCAL_PROCESS:
            return self.launcher.launch(task, slot, pool)
        if self.dispatcher is None:
            raise RuntimeError("WatchedLauncher.dispatcher is not set")
        runner_id = self.launcher._generate_runner_id()
        context = self.launcher._build_task_context(task, slot)
        env = dict(os.environ)
        env.update(RUNNER_ID=runner_id, TASK_CONTEXT=context.to_json(), POOL_NAME=pool.name)
        for key, value in pool.config.items():
            env[f"RUNNER_{key.upper()}"] = str(value)
        log_path = self.log_dir / f"{runner_id}.log"
        script = pool.config.get("runner_script") or self.launcher.local_launcher.runner_script
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                str(script).split(),
                env=env,
                cwd=context.slot_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        runner = Runner(
            runner_id=runner_id,
            task_id=task.id,
            pool_name=pool.name,
            slot_id=slot.slot_id,
            state=RunnerState.RUNNING,
            started_at=datetime.now(),
            pid=process.pid,
        )
        watched = _Watched(runner, process, log_path)
        with self._lock:
            self._watched[runner_id] = watched
        threading.Thread(
            target=self._watch, args=(watched,), name=f"watch-{runner_id}", daemon=True
        ).start()
        return runner

    def stop(self, runner_id: str) -> None:
        """Ends the runner's process group; its exit is not reported (the
        dispatcher that asked has applied the outcome)."""
        with self._lock:
            watched = self._watched.get(runner_id)
        if watched is None:
            return
        watched.stopped.set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(watched.process.pid, sig)
            except OSError:
                return
            try:
                watched.process.wait(2.0)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(watched.process.pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Stops every runner still running."""
        with self._lock:
            running = list(self._watched)
        for runner_id in running:
            self.stop(runner_id)
        deadline = time.monotonic() + timeout
        while self._watched and time.monotonic() < deadline:
            time.sleep(0.01)

    def _watch(self, watched: _Watched) -> None:
        runner = watched.runner
        while True:
            try:
                code = watched.process.wait(self.heartbeat_interval)
                break
            except subprocess.TimeoutExpired:
                if watched.stopped.is_set():
                    code = watched.process.wait()
                    break
                if not self.gate.call(self.dispatcher.update_heartbeat, runner.runner_id):
                    return
        try:
            os.killpg(watched.process.pid, signal.SIGKILL)  # what it left behind
        except OSError:
            pass
        with self._lock:
            self._watched.pop(runner.runner_id, None)
        if watched.stopped.is_set():
            return
        reason = None
        if code != 0:
            last = _last_line(watched.log_path)
            reason = f"exit code {code}" + (f": {last}" if last else "")
        try:
            self.gate.call(
                self.dispatcher.handle_runner_completion,
                runner.runner_id,
                task_id=runner.task_id,
                success=code == 0,
                failure_reason=reason,
            )
        except Exception:
            logger.exception("reporting runner %s failed", runner.runner_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)


def _default_registry_dir() -> Path:
    """Where NecroCode's registry keeps its data when the config names no
    directory: ``TaskRegistry``'s own default (``~/.necrocode/registry``)."""
    from necrocode.task_registry.config import RegistryConfig

    return Path(RegistryConfig().registry_dir)


class NecroCodeDispatcherCore(_Core):
    """``DispatcherCore(config)`` as NecroCode's code builds it, running on the
    Rust core. Ports passed explicitly win over the ones built from the
    config; ``spec_repos`` maps spec names to repo pool names."""

    def __new__(
        cls,
        config: Any = None,
        *,
        task_source: Any = None,
        task_registry: Any = None,
        repo_pool_manager: Any = None,
        runner_launcher: Any = None,
        event_recorder: Any = None,
        clock: Any = None,
        task_state_type: Any = None,
        spec_repos: dict[str, str] | None = None,
    ):
        config = config if config is not None else NecroConfig()
        if getattr(config, "task_registry_dir", None) is None:
            # NecroCode's own constructor crashes here; use the registry's default.
            config.task_registry_dir = _default_registry_dir()
        registry = TaskRegistry(registry_dir=config.task_registry_dir)
        pools = repo_pool_manager or PoolManager(config=getattr(config, "repo_pool_config", None))
        launcher = runner_launcher
        if launcher is None:
            launcher = WatchedLauncher(RunnerLauncher(retry_attempts=config.retry_max_attempts))
            launcher.check_pools(getattr(config, "agent_pools", None))
        recorder = event_recorder or EventRecorder(
            task_registry=registry,
            fallback_log_dir=Path(registry.registry_dir).parent / "dispatcher_events",
        )
        source = task_source or RegistryTaskSource(
            registry,
            spec_repos=spec_repos or getattr(config, "spec_repos", None),
            repo_names=getattr(pools, "list_pools", None),
        )
        self = super().__new__(
            cls,
            config,
            task_source=source,
            task_registry=task_registry or RegistryReports(registry),
            repo_pool_manager=pools,
            runner_launcher=launcher,
            event_recorder=recorder,
            clock=clock,
            task_state_type=task_state_type or TaskState,
        )
        self.registry = registry
        self.task_monitor = TaskMonitor(config)
        if isinstance(launcher, WatchedLauncher) and launcher.dispatcher is None:
            launcher.dispatcher = self
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        """Starts the loop; from the main thread, SIGINT and SIGTERM stop the
        dispatcher gracefully, as NecroCode's do."""
        super().start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._signal_handler)
            signal.signal(signal.SIGTERM, self._signal_handler)

    def _signal_handler(self, signum: int, frame: Any) -> None:
        logger.info("received signal %d, stopping", signum)
        self.stop(timeout=self.config.graceful_shutdown_timeout)

    def get_status(self, include_tasks: bool = True) -> dict[str, Any]:
        """NecroCode's shape: ``pool_statuses`` as ``PoolStatus`` objects,
        ``deadlock_info`` and ``event_recorder`` statistics, beside the core's
        own keys (``include_tasks=False``: see the core's ``get_status``)."""
        status = super().get_status(include_tasks)
        status["pool_statuses"] = [
            PoolStatus(
                pool_name=p["pool_name"],
                type=PoolType(p["type"]),
                enabled=p["enabled"],
                max_concurrency=p["max_concurrency"],
                current_running=p["current_running"],
                utilization=p["utilization"],
                cpu_usage=p["cpu_usage"],
                memory_usage=p["memory_usage"],
            )
            for p in status["pool_statuses"]
        ]
        stats = getattr(self.event_recorder, "get_statistics", None)
        status["event_recorder"] = stats() if callable(stats) else {}
        return status
