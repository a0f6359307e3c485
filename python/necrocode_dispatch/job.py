"""Job files for ``necrocode-dispatch run``: the ``DispatcherConfig`` YAML layout
(``dispatcher:``, ``agent_pools:``, ``skill_mapping:``) plus a ``tasks:`` list.
Everything is checked before anything runs; a ``JobError`` names the field."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from necrocode_dispatch.config import DISPATCHER_KEYS, RETRY_KEYS, DispatcherConfig
from necrocode_dispatch.models import PoolType, SchedulingPolicy, Task

__all__ = ["Job", "JobError", "load_job", "parse_job"]

_DISPATCHER_KEYS = {*DISPATCHER_KEYS, "scheduling_policy", "retry"}
_RETRY_KEYS = set(RETRY_KEYS)
_POOL_KEYS = {"name", "type", "max_concurrency", "cpu_quota", "memory_quota", "enabled", "config"}
_TASK_KEYS = {"id", "command", "priority", "required_skill", "timeout", "spec", "keep_background"}
_TOP_KEYS = {"dispatcher", "agent_pools", "skill_mapping", "tasks"}

#: The job file's poll interval when it sets none: a retry is also picked up
#: the moment it is due, so this only paces polling.
DEFAULT_POLL_INTERVAL = 0.2
#: The pool used when the job file defines none.
DEFAULT_POOL = {"name": "local", "type": "local-process", "max_concurrency": 4}


class JobError(ValueError):
    """A job file that cannot run; the message names the field."""


@dataclass
class Job:
    config: DispatcherConfig
    tasks: list[Task]

    @property
    def slots_per_repo(self) -> int:
        """Enough slots for every task that can run at once."""
        room = sum(p.max_concurrency for p in self.config.agent_pools if p.enabled)
        return max(1, min(room, self.config.max_global_concurrency))


def load_job(path: str | Path) -> Job:
    import yaml  # a dependency of the package, imported only when used

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise JobError(f"cannot read the job file: {e.strerror}") from None
    try:
        # libyaml's loader when PyYAML was built with it: about 8x faster.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise JobError(f"not valid YAML{where}: {problem}") from None
    return parse_job(data, default_spec=path.stem)


def parse_job(data: Any, default_spec: str = "job") -> Job:
    if not isinstance(data, dict):
        raise JobError(f"the top level must be a mapping, got {type(data).__name__}")
    _no_unknown_keys("the top level", data, _TOP_KEYS)
    dispatcher = _mapping("dispatcher", data.get("dispatcher"))
    _no_unknown_keys("dispatcher", dispatcher, _DISPATCHER_KEYS)
    retry = _mapping("dispatcher.retry", dispatcher.get("retry"))
    _no_unknown_keys("dispatcher.retry", retry, _RETRY_KEYS)
    pools = _pools(data.get("agent_pools"))
    mapping = _skill_mapping(data.get("skill_mapping"), {p["name"] for p in pools})
    tasks = _tasks(data.get("tasks"), default_spec)

    section = dict(dispatcher)
    section.setdefault("poll_interval", DEFAULT_POLL_INTERVAL)
    if "scheduling_policy" in section:
        values = [p.value for p in SchedulingPolicy]
        if section["scheduling_policy"] not in values:
            raise JobError(
                f"dispatcher.scheduling_policy: must be one of {values}, "
                f"got {section['scheduling_policy']!r}"
            )
    for key in ("max_global_concurrency",):
        if key in section:
            _integer(f"dispatcher.{key}", section[key], minimum=1)
    for key in ("poll_interval", "heartbeat_timeout", "graceful_shutdown_timeout"):
        if key in section:
            _number(f"dispatcher.{key}", section[key], minimum=0)
    try:
        config = DispatcherConfig.from_dict(
            {"dispatcher": section, "agent_pools": pools, "skill_mapping": mapping}
        )
    except (TypeError, ValueError) as e:
        # DispatcherConfig names the field (e.g. "poll_interval must be > 0").
        raise JobError(f"dispatcher.{e}") from None
    return Job(config, tasks)


def _no_unknown_keys(where: str, data: dict, known: set[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise JobError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _mapping(where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _integer(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{where}: must be an integer, got {value!r}")
    if value < minimum:
        raise JobError(f"{where}: must be >= {minimum}, got {value!r}")
    return value


def _number(where: str, value: Any, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise JobError(f"{where}: must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum) or value != value:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise JobError(f"{where}: must be {bound}, got {value!r}")
    return float(value)


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JobError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _pools(value: Any) -> list[dict]:
    if value is None:
        return [dict(DEFAULT_POOL)]
    if isinstance(value, dict):
        items = [
            (f"agent_pools.{name}", dict(_mapping(f"agent_pools.{name}", spec), name=name))
            for name, spec in value.items()
        ]
    elif isinstance(value, list):
        items = [
            (f"agent_pools[{i}]", dict(_mapping(f"agent_pools[{i}]", spec)))
            for i, spec in enumerate(value)
        ]
    else:
        raise JobError(f"agent_pools: must be a mapping of pools, got {type(value).__name__}")
    if not items:
        raise JobError("agent_pools: at least one pool is needed")
    pools, names = [], set()
    for where, pool in items:
        _no_unknown_keys(where, pool, _POOL_KEYS)
        name = _text(f"{where}.name", pool.get("name"))
        if name in names:
            raise JobError(f"{where}: pool {name!r} is defined twice")
        names.add(name)
        kind = pool.get("type", PoolType.LOCAL_PROCESS.value)
        if kind != PoolType.LOCAL_PROCESS.value:
            raise JobError(
                f"{where}.type: {kind!r} pools cannot run here; "
                f"the local runner runs {PoolType.LOCAL_PROCESS.value!r} pools"
            )
        _integer(f"{where}.max_concurrency", pool.get("max_concurrency", 1), minimum=0)
        pools.append(pool)
    return pools


def _skill_mapping(value: Any, pool_names: set[str]) -> dict[str, list[str]]:
    mapping = {}
    for skill, names in _mapping("skill_mapping", value).items():
        where = f"skill_mapping.{skill}"
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list):
            raise JobError(f"{where}: must be a pool name or a list of them, got {names!r}")
        for name in names:
            if name not in pool_names:
                raise JobError(
                    f"{where}: no pool named {name!r} (pools: {', '.join(sorted(pool_names))})"
                )
        mapping[str(skill)] = list(names)
    return mapping


def _tasks(value: Any, default_spec: str) -> list[Task]:
    if not isinstance(value, list) or not value:
        raise JobError("tasks: must be a non-empty list of tasks")
    tasks, ids = [], set()
    for i, spec in enumerate(value):
        where = f"tasks[{i}]"
        spec = _mapping(where, spec)
        if isinstance(spec.get("id"), str):
            where = f"tasks[{i}] ({spec['id']!r})"
        _no_unknown_keys(where, spec, _TASK_KEYS)
        if "id" not in spec:
            raise JobError(f"{where}.id: missing")
        task_id = _text(f"{where}.id", spec["id"])
        if task_id in ids:
            raise JobError(f"{where}.id: {task_id!r} is used by another task")
        ids.add(task_id)
        if "command" not in spec:
            raise JobError(f"{where}.command: missing")
        command = _text(f"{where}.command", spec["command"])
        priority = _integer(f"{where}.priority", spec.get("priority", 0), minimum=-(2**63))
        skill = spec.get("required_skill")
        if skill is not None:
            skill = _text(f"{where}.required_skill", skill)
        timeout = spec.get("timeout")
        if timeout is not None:
            timeout = _number(f"{where}.timeout", timeout, minimum=0, strict=True)
        spec_name = _text(f"{where}.spec", spec.get("spec", default_spec))
        keep_background = spec.get("keep_background", False)
        if not isinstance(keep_background, bool):
            raise JobError(
                f"{where}.keep_background: must be true or false, got {keep_background!r}"
            )
        tasks.append(
            Task(
                id=task_id,
                priority=priority,
                required_skill=skill,
                metadata={
                    "spec_name": spec_name,
                    "repo_name": spec_name,
                    "command": command,
                    "timeout": timeout,
                    "keep_background": keep_background,
                },
            )
        )
    return tasks
