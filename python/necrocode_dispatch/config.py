"""Dispatcher configuration: drop-in for ``necrocode.dispatcher.config``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from necrocode_dispatch.models import AgentPool, PoolType, SchedulingPolicy

#: The keys of the YAML ``dispatcher:`` section that map to fields as they are.
DISPATCHER_KEYS = (
    "poll_interval",
    "max_global_concurrency",
    "heartbeat_timeout",
    "retry_max_attempts",
    "retry_backoff_base",
    "retry_initial_delay",
    "retry_max_delay",
    "retry_jitter",
    "retry_seed",
    "retry_non_retryable",
    "retry_policies",
    "retry_max_duration",
    "retry_budget",
    "graceful_shutdown_timeout",
    "task_registry_dir",
    "deadlock_check_interval",
)
#: The keys of a nested ``retry:`` section (``retry_`` + key on the config).
RETRY_KEYS = (
    "max_attempts",
    "backoff_base",
    "initial_delay",
    "max_delay",
    "jitter",
    "seed",
    "non_retryable",
    "policies",
    "max_duration",
    "budget",
)


#: Numeric fields, with their lower bound and whether the bound is allowed.
_SECONDS = {
    "poll_interval": (0, False),
    "heartbeat_timeout": (0, False),
    "graceful_shutdown_timeout": (0, True),
    "retry_backoff_base": (0, False),
    "retry_initial_delay": (0, True),
    "retry_max_delay": (0, True),
    "deadlock_check_interval": (0, False),
}
#: Whole-number fields, with their least value.
_COUNTS = {"max_global_concurrency": 1, "retry_max_attempts": 0}


def check_field(name: str, value: Any) -> None:
    """Raises TypeError or ValueError, naming the field, for a value the
    dispatcher cannot use; checked at construction and on every assignment."""
    if name in _SECONDS:
        low, inclusive = _SECONDS[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        bound_ok = value >= low if inclusive else value > low
        if not (math.isfinite(value) and bound_ok):
            relation = ">=" if inclusive else ">"
            raise ValueError(f"{name} must be a finite number {relation} {low}, got {value!r}")
    elif name in _COUNTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < _COUNTS[name]:
            raise ValueError(f"{name} must be >= {_COUNTS[name]}, got {value!r}")


@dataclass
class DispatcherConfig:
    """Settings of a DispatcherCore. Fields stay assignable after construction;
    every numeric field is checked when set (TypeError or ValueError naming it)."""

    poll_interval: float = 5
    scheduling_policy: SchedulingPolicy = SchedulingPolicy.PRIORITY
    max_global_concurrency: int = 10
    heartbeat_timeout: float = 60
    retry_max_attempts: int = 3
    retry_backoff_base: float = 2.0
    graceful_shutdown_timeout: float = 300
    task_registry_dir: str | None = None
    agent_pools: list[AgentPool] = field(default_factory=list)
    skill_mapping: dict[str, list[str]] = field(default_factory=dict)
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 300.0
    # Beyond the original (README, "Retry policies"); the defaults keep its
    # behaviour: no jitter, every reason retried, no time limit, no budget.
    retry_jitter: str = "none"
    retry_seed: int | None = None
    retry_non_retryable: list[str] = field(default_factory=list)
    retry_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    retry_max_duration: float | None = None
    retry_budget: int | dict[str, int] | None = None
    # How often the loop looks for dependency cycles (NecroCode: 60 s).
    deadlock_check_interval: float = 60

    def __setattr__(self, name: str, value: Any) -> None:
        check_field(name, value)
        super().__setattr__(name, value)

    def get_pool(self, name: str) -> AgentPool | None:
        return next((p for p in self.agent_pools if p.name == name), None)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DispatcherConfig:
        """Read the original YAML layout: ``dispatcher:`` (with flat ``retry_*`` or
        nested ``retry:`` keys), ``agent_pools:`` by name, ``skill_mapping:``."""
        import yaml  # only needed here

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DispatcherConfig:
        section = dict(data.get("dispatcher") or {})
        retry = section.pop("retry", None) or {}
        kwargs: dict[str, Any] = {}
        for key in DISPATCHER_KEYS:
            if key in section:
                kwargs[key] = section[key]
        for key in RETRY_KEYS:
            if key in retry:
                kwargs[f"retry_{key}"] = retry[key]
        if "scheduling_policy" in section:
            kwargs["scheduling_policy"] = SchedulingPolicy(section["scheduling_policy"])
        pools = data.get("agent_pools") or {}
        if isinstance(pools, dict):
            items = [dict(spec or {}, name=name) for name, spec in pools.items()]
        else:
            items = [dict(spec) for spec in pools]
        kwargs["agent_pools"] = [
            AgentPool(
                name=str(p["name"]),
                type=PoolType(p.get("type", PoolType.LOCAL_PROCESS.value)),
                max_concurrency=p.get("max_concurrency", 1),
                cpu_quota=p.get("cpu_quota"),
                memory_quota=p.get("memory_quota"),
                enabled=p.get("enabled", True),
                config=p.get("config") or {},
            )
            for p in items
        ]
        mapping = data.get("skill_mapping") or {}
        kwargs["skill_mapping"] = {
            str(skill): [pools] if isinstance(pools, str) else list(pools)
            for skill, pools in mapping.items()
        }
        return cls(**kwargs)
