"""Data models of the dispatcher: drop-in for ``necrocode.dispatcher.models``.

Plain data stays plain Python (dataclasses and enums); the state and the
decisions live in the Rust core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class PoolType(Enum):
    """Agent Pool execution type."""

    LOCAL_PROCESS = "local-process"
    DOCKER = "docker"
    KUBERNETES = "kubernetes"
    #: Commands run as Ray tasks on a cluster (``necrocode_dispatch.ray``).
    RAY = "ray"


class RunnerState(Enum):
    """Agent Runner execution state."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class SchedulingPolicy(Enum):
    """Task scheduling policy."""

    FIFO = "fifo"
    PRIORITY = "priority"
    SKILL_BASED = "skill-based"
    FAIR_SHARE = "fair-share"


class TaskState(Enum):
    """Task states, for callers without a task registry of their own."""

    READY = "ready"
    RUNNING = "running"
    BLOCKED = "blocked"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Task:
    """A minimal task, for callers without a task registry of their own."""

    id: str
    priority: int = 0
    created_at: datetime | None = None
    required_skill: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Ids of the tasks that must be done before this one is ready (as
    #: NecroCode's tasks carry them); the local registry holds it BLOCKED
    #: until then.
    dependencies: list[str] = field(default_factory=list)


@dataclass
class AgentPool:
    """A pool of Agent Runners with one execution type and a concurrency limit."""

    name: str
    type: PoolType
    max_concurrency: int
    current_running: int = 0
    cpu_quota: int | None = None
    memory_quota: int | None = None
    enabled: bool = True
    config: dict[str, Any] = field(default_factory=dict)

    def can_accept_task(self) -> bool:
        return self.enabled and self.current_running < self.max_concurrency

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.value,
            "max_concurrency": self.max_concurrency,
            "current_running": self.current_running,
            "cpu_quota": self.cpu_quota,
            "memory_quota": self.memory_quota,
            "enabled": self.enabled,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentPool:
        return cls(
            name=data["name"],
            type=PoolType(data["type"]),
            max_concurrency=data["max_concurrency"],
            current_running=data.get("current_running", 0),
            cpu_quota=data.get("cpu_quota"),
            memory_quota=data.get("memory_quota"),
            enabled=data.get("enabled", True),
            config=data.get("config", {}),
        )


@dataclass
class Runner:
    """An Agent Runner instance executing a task."""

    runner_id: str
    task_id: str
    pool_name: str
    slot_id: str
    state: RunnerState
    started_at: datetime
    pid: int | None = None
    container_id: str | None = None
    job_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner_id": self.runner_id,
            "task_id": self.task_id,
            "pool_name": self.pool_name,
            "slot_id": self.slot_id,
            "state": self.state.value,
            "started_at": self.started_at.isoformat(),
            "pid": self.pid,
            "container_id": self.container_id,
            "job_name": self.job_name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Runner:
        return cls(
            runner_id=data["runner_id"],
            task_id=data["task_id"],
            pool_name=data["pool_name"],
            slot_id=data["slot_id"],
            state=RunnerState(data["state"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            pid=data.get("pid"),
            container_id=data.get("container_id"),
            job_name=data.get("job_name"),
        )


@dataclass
class RunnerInfo:
    """A runner with its last heartbeat."""

    runner: Runner
    last_heartbeat: datetime
    state: RunnerState

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner.to_dict(),
            "last_heartbeat": self.last_heartbeat.isoformat(),
            "state": self.state.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunnerInfo:
        return cls(
            runner=Runner.from_dict(data["runner"]),
            last_heartbeat=datetime.fromisoformat(data["last_heartbeat"]),
            state=RunnerState(data["state"]),
        )


@dataclass
class PoolStatus:
    """An Agent Pool's state and utilisation."""

    pool_name: str
    type: PoolType
    enabled: bool
    max_concurrency: int
    current_running: int
    utilization: float
    cpu_usage: float | None = None
    memory_usage: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool_name": self.pool_name,
            "type": self.type.value,
            "enabled": self.enabled,
            "max_concurrency": self.max_concurrency,
            "current_running": self.current_running,
            "utilization": self.utilization,
            "cpu_usage": self.cpu_usage,
            "memory_usage": self.memory_usage,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolStatus:
        return cls(
            pool_name=data["pool_name"],
            type=PoolType(data["type"]),
            enabled=data["enabled"],
            max_concurrency=data["max_concurrency"],
            current_running=data["current_running"],
            utilization=data["utilization"],
            cpu_usage=data.get("cpu_usage"),
            memory_usage=data.get("memory_usage"),
        )
