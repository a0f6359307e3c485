"""Working fakes of the dispatcher's ports, for the scheduling, end-to-end and
loop tests: a registry that is also the task source, a repo pool with
numbered slots, and a launcher whose runners the test completes by hand."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from necrocode_dispatch import (
    AgentPool,
    DispatcherConfig,
    DispatcherCore,
    ManualClock,
    PoolType,
    Task,
    TaskState,
)

from .dispatcher_helpers import START


class Registry:
    """Task states by id, with their history; polls return the READY ones."""

    def __init__(self, tasks=()):
        self._lock = threading.Lock()
        self.tasks: dict[str, Task] = {}
        self.states: dict[str, TaskState] = {}
        self.history: dict[str, list[tuple[TaskState, dict]]] = {}
        for t in tasks:
            self.add(t)

    def add(self, task: Task) -> None:
        with self._lock:
            self.tasks[task.id] = task
            self.states[task.id] = TaskState.READY
            self.history[task.id] = []

    def poll_ready_tasks(self) -> list[Task]:
        with self._lock:
            return [self.tasks[i] for i, s in self.states.items() if s is TaskState.READY]

    def update_task_state(self, spec_name, task_id, new_state, metadata):
        with self._lock:
            self.states[task_id] = new_state
            self.history.setdefault(task_id, []).append((new_state, dict(metadata)))

    def in_state(self, state: TaskState) -> list[str]:
        with self._lock:
            return sorted(i for i, s in self.states.items() if s is state)


class Slots:
    """A repo pool handing out numbered slots; `free=None` never runs out.
    Counts releases per slot id."""

    def __init__(self, free: int | None = None):
        self._lock = threading.Lock()
        self.free = free
        self.allocated: list[str] = []
        self.released: Counter[str] = Counter()
        self.requests: list[tuple[str, dict]] = []
        self.error: Exception | None = None

    def allocate_slot(self, repo_name, metadata=None):
        with self._lock:
            self.requests.append((repo_name, dict(metadata or {})))
            if self.error is not None:
                raise self.error
            outstanding = len(self.allocated) - sum(self.released.values())
            if self.free is not None and outstanding >= self.free:
                return None
            slot_id = f"slot-{len(self.allocated) + 1}"
            self.allocated.append(slot_id)
            return SimpleNamespace(slot_id=slot_id, repo_name=repo_name)

    def release_slot(self, slot_id, cleanup=True):
        with self._lock:
            self.released[slot_id] += 1

    def each_released_once(self) -> bool:
        with self._lock:
            return sorted(self.released) == sorted(self.allocated) and all(
                n == 1 for n in self.released.values()
            )


@dataclass
class Launch:
    task_id: str
    runner_id: str
    slot_id: str | None
    pool: str
    at: float  # the dispatcher clock's monotonic reading
    pool_running: int  # the pool's running count seen by the launch


@dataclass
class Launcher:
    """Launches runners that do nothing; the test reports their outcomes."""

    clock: Any
    dispatcher: DispatcherCore | None = None
    fail_tasks: set[str] = field(default_factory=set)
    launches: list[Launch] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    on_launch: Any = None

    def launch(self, task, slot, pool):
        if task.id in self.fail_tasks:
            raise RuntimeError("no executor available")
        runner_id = f"runner-{len(self.launches) + 1}"
        running = 0
        if self.dispatcher is not None:
            status = self.dispatcher.get_status()["pool_statuses"]
            running = next(p["current_running"] for p in status if p["pool_name"] == pool.name)
        launch = Launch(
            task.id,
            runner_id,
            getattr(slot, "slot_id", None),
            pool.name,
            self.clock.monotonic(),
            running,
        )
        self.launches.append(launch)
        if self.on_launch is not None:
            self.on_launch(launch)
        return SimpleNamespace(runner_id=runner_id, pid=4000 + len(self.launches))

    def stop(self, runner_id):
        self.stopped.append(runner_id)

    def order(self) -> list[str]:
        return [launch.task_id for launch in self.launches]


def build(
    tasks=(),
    pools=(("local", 4),),
    global_limit=10,
    policy=None,
    skill_mapping=None,
    clock=None,
    slots=None,
    **config,
):
    """A dispatcher wired to working fakes; returns (dispatcher, ports namespace)."""
    cfg = DispatcherConfig(
        max_global_concurrency=global_limit,
        agent_pools=[
            AgentPool(name=n, type=PoolType.LOCAL_PROCESS, max_concurrency=m) for n, m in pools
        ],
        skill_mapping=dict(skill_mapping or {}),
        **config,
    )
    if policy is not None:
        cfg.scheduling_policy = policy
    clock = clock or ManualClock(START)
    registry = Registry(tasks)
    slots = slots or Slots()
    launcher = Launcher(clock)
    dispatcher = DispatcherCore(
        cfg,
        task_source=registry,
        task_registry=registry,
        repo_pool_manager=slots,
        runner_launcher=launcher,
        clock=clock,
    )
    launcher.dispatcher = dispatcher
    return dispatcher, SimpleNamespace(
        registry=registry, slots=slots, launcher=launcher, clock=clock, config=cfg
    )


def make_task(task_id, spec="spec-a", priority=0, skill=None, created_at=None, **meta):
    return Task(
        id=task_id,
        priority=priority,
        required_skill=skill,
        created_at=created_at,
        metadata={"spec_name": spec, **meta},
    )
