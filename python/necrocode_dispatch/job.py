"""Job files for ``necrocode-dispatch run``: the ``DispatcherConfig`` YAML layout
(``dispatcher:``, ``agent_pools:``, ``skill_mapping:``) plus a ``tasks:`` list.
Everything is checked before anything runs; a ``JobError`` names the field."""

from __future__ import annotations

import contextlib
import gc
import json
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from necrocode_dispatch.config import DISPATCHER_KEYS, RETRY_KEYS, DispatcherConfig
from necrocode_dispatch.models import PoolType, SchedulingPolicy, Task

__all__ = ["Job", "JobError", "load_job", "parse_job"]

_DISPATCHER_KEYS = {*DISPATCHER_KEYS, "scheduling_policy", "retry"}
_RETRY_KEYS = set(RETRY_KEYS)
_POOL_KEYS = {"name", "type", "max_concurrency", "cpu_quota", "memory_quota", "enabled", "config"}
#: What a ``type: ray`` pool may say besides (kept in the pool's ``config``).
_RAY_KEYS = {"address", "num_cpus", "num_gpus", "resources", "skill_resources"}
_RUNNABLE = (PoolType.LOCAL_PROCESS.value, PoolType.RAY.value)
_TASK_KEYS = {
    "id",
    "command",
    "priority",
    "required_skill",
    "timeout",
    "spec",
    "keep_background",
    "depends_on",
}
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

    def fingerprint(self) -> str:
        """A digest of the work: each task's id, command and dependencies. A
        state file records it, so that another job never resumes from it
        (options such as a timeout or a priority may change between runs)."""
        import hashlib  # only a --state run asks: not imported at start

        digest = hashlib.sha256()
        for t in self.tasks:
            fields = [t.id, t.metadata["command"], t.dependencies]
            digest.update(json.dumps(fields).encode("utf-8", "surrogatepass") + b"\n")
        return digest.hexdigest()[:32]

    @property
    def slots_per_repo(self) -> int:
        """Enough slots for every task that can run at once."""
        room = sum(p.max_concurrency for p in self.config.agent_pools if p.enabled)
        return max(1, min(room, self.config.max_global_concurrency))


def load_job(path: str | Path) -> Job:
    # The cyclic collector waits while the job is read: a document's nodes
    # and the tasks made from them are new containers by the hundred
    # thousand, none of them garbage, and collecting them again and again
    # took over half of a 10^5-task job's load.
    with collector_paused():
        return _load_job(path)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, then as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load_job(path: str | Path) -> Job:
    import yaml  # a dependency of the package, imported only when used

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise JobError(f"cannot read the job file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise JobError(f"not UTF-8 text: byte {e.start} is {e.object[e.start]:#04x}") from None
    if _looks_like_json(path, text):
        # A JSON document is YAML too; the json module reads a 10^5-task job
        # in 0.07 s where PyYAML (even with libyaml) takes 2-3 s.
        try:
            return parse_job(json.loads(text), default_spec=path.stem)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise JobError(
                    f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                ) from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise JobError(f"not valid YAML{where}: {problem}") from None
    return parse_job(data, default_spec=path.stem)


_LOADER: Any = None


def _yaml_loader() -> Any:
    """PyYAML's safe loader (libyaml's when PyYAML was built with it: about
    8x faster) that builds plain documents (mappings with text keys, lists,
    text) without its generic constructor: a third of a 2,000-task job's load.
    Anything else (numbers, booleans, anchors, merge keys, other tags) goes
    through the safe constructor as before, so the result is the same."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    text_tag, map_tag, seq_tag = (f"tag:yaml.org,2002:{t}" for t in ("str", "map", "seq"))

    class NotPlain(Exception):
        pass

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        def construct_document(self, node: Any) -> Any:
            seen: set[int] = set()
            try:
                data = self._plain(node, seen)
                # As the safe constructor leaves itself after a document.
                self.constructed_objects = {}
                return data
            except NotPlain:
                # A shared or self-referencing node (an alias), a merge key,
                # a key that is not text: the safe constructor's own rules.
                return super().construct_document(node)

        def _plain(self, node: Any, seen: set[int]) -> Any:
            tag = node.tag
            if tag == text_tag and type(node) is ScalarNode:
                return node.value
            if type(node) is ScalarNode:
                return self.construct_object(node)
            if id(node) in seen:
                raise NotPlain
            seen.add(id(node))
            if tag == map_tag and type(node) is MappingNode:
                out = {}
                for key, value in node.value:
                    if key.tag != text_tag or type(key) is not ScalarNode:
                        raise NotPlain
                    out[key.value] = self._plain(value, seen)
                return out
            if tag == seq_tag and type(node) is SequenceNode:
                return [self._plain(item, seen) for item in node.value]
            raise NotPlain

    _LOADER = Loader
    return Loader


def _looks_like_json(path: Path, text: str) -> bool:
    return path.suffix.lower() == ".json" or text.lstrip()[:1] == "{"


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
    for key in ("poll_interval", "heartbeat_timeout"):
        # 0 would mean a loop that never sleeps, or every task timing out.
        _number(f"dispatcher.{key}", section.get(key, 1), minimum=0, strict=True)
    if "graceful_shutdown_timeout" in section:
        _number(
            "dispatcher.graceful_shutdown_timeout",
            section["graceful_shutdown_timeout"],
            minimum=0,
        )
    try:
        config = DispatcherConfig.from_dict(
            {"dispatcher": section, "agent_pools": pools, "skill_mapping": mapping}
        )
    except (TypeError, ValueError) as e:
        # DispatcherConfig names the field (e.g. "poll_interval must be > 0").
        raise JobError(f"dispatcher.{e}") from None
    _check_schedulable(pools, mapping, tasks)
    return Job(config, tasks)


def _check_schedulable(pools: list[dict], mapping: dict[str, list[str]], tasks: list[Task]) -> None:
    """Every task has a pool that can run it: enabled, with room for one
    (a job that can never finish would otherwise wait forever)."""
    usable = {
        p["name"]
        for p in pools
        if p.get("enabled", True) is not False and p.get("max_concurrency", 1) >= 1
    }
    if not usable:
        raise JobError(
            "agent_pools: every pool is disabled or has max_concurrency 0; no task could ever run"
        )
    routes: dict[str | None, bool] = {}
    for i, task in enumerate(tasks):
        skill = task.required_skill
        if skill not in routes:
            names = mapping.get(skill or "", mapping.get("default")) if mapping else None
            routes[skill] = names is None or any(n in usable for n in names)
        if not routes[skill]:
            names = mapping.get(skill or "", mapping.get("default"))
            via = f"skill_mapping.{skill}" if skill in mapping else "skill_mapping.default"
            raise JobError(
                f"tasks[{i}] ({task.id!r}): no pool can run it: {via} names "
                f"{', '.join(map(repr, names))}, each disabled or with max_concurrency 0"
            )


def _no_unknown_keys(where: str, data: dict, known: set[str]) -> None:
    if data.keys() <= known:
        return
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
    addresses: dict[Any, str] = {}
    for where, pool in items:
        kind = pool.get("type", PoolType.LOCAL_PROCESS.value)
        _no_unknown_keys(where, pool, _POOL_KEYS | (_RAY_KEYS if kind == "ray" else set()))
        name = _text(f"{where}.name", pool.get("name"))
        if name in names:
            raise JobError(f"{where}: pool {name!r} is defined twice")
        names.add(name)
        if kind not in _RUNNABLE:
            raise JobError(
                f"{where}.type: {kind!r} pools cannot run here; "
                f"necrocode-dispatch run runs {' and '.join(map(repr, _RUNNABLE))} pools"
            )
        _integer(f"{where}.max_concurrency", pool.get("max_concurrency", 1), minimum=0)
        if kind == PoolType.RAY.value:
            pool = _ray_pool(where, pool)
            addresses.setdefault(pool["config"]["address"], where)
        pools.append(pool)
    if len(addresses) > 1:
        first, second = list(addresses.values())[:2]
        raise JobError(
            f"{second}.address: every ray pool of a job uses one cluster; {first} names another"
        )
    return pools


def _ray_pool(where: str, pool: dict) -> dict:
    """A ``type: ray`` pool's settings, checked, moved into its ``config``."""
    config = dict(_mapping(f"{where}.config", pool.get("config")))
    address = pool.get("address")
    if address is not None:
        address = _text(f"{where}.address", address)
        if address != "auto" and not re.fullmatch(r"(ray://)?[^\s:/]+:\d{1,5}", address):
            raise JobError(
                f"{where}.address: expected 'auto', 'host:port' or 'ray://host:port', "
                f"got {address!r}"
            )
    config["address"] = address
    for key in ("num_cpus", "num_gpus"):
        if key in pool:
            config[key] = _number(f"{where}.{key}", pool[key], minimum=0)
    resources = _mapping(f"{where}.resources", pool.get("resources"))
    for resource, amount in resources.items():
        _text(f"{where}.resources key", resource)
        _number(f"{where}.resources.{resource}", amount, minimum=0, strict=True)
    config["resources"] = {str(k): float(v) for k, v in resources.items()}
    skill_resources = pool.get("skill_resources", False)
    if not isinstance(skill_resources, bool):
        raise JobError(f"{where}.skill_resources: must be true or false, got {skill_resources!r}")
    config["skill_resources"] = skill_resources
    kept = {k: v for k, v in pool.items() if k not in _RAY_KEYS}
    return dict(kept, config=config)


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


#: Linux refuses a single argument of this many bytes or more
#: (MAX_ARG_STRLEN); a command is one argument of ``/bin/sh -c``.
MAX_COMMAND_BYTES = 32 * 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT64 = (-(2**63), 2**63 - 1)


def _tasks(value: Any, default_spec: str) -> list[Task]:
    if not isinstance(value, list) or not value:
        raise JobError("tasks: must be a non-empty list of tasks")
    tasks, ids = [], set()
    for i, spec in enumerate(value):
        # The common case is checked inline; a field's name is formatted
        # only for its error (a 10^5-task job loads in well under a second).
        if not isinstance(spec, dict):
            _mapping(f"tasks[{i}]", spec)
        task_id = spec.get("id")
        where = f"tasks[{i}] ({task_id!r})" if isinstance(task_id, str) else f"tasks[{i}]"
        _no_unknown_keys(where, spec, _TASK_KEYS)
        if "id" not in spec:
            raise JobError(f"{where}.id: missing")
        task_id = _name(f"{where}.id", task_id)
        if task_id in ids:
            raise JobError(f"{where}.id: {task_id!r} is used by another task")
        ids.add(task_id)
        if "command" not in spec:
            raise JobError(f"{where}.command: missing")
        command = _command(where, spec["command"])
        priority = spec.get("priority", 0)
        if type(priority) is not int or not _INT64[0] <= priority <= _INT64[1]:
            priority = _integer(f"{where}.priority", priority, minimum=_INT64[0])
            raise JobError(f"{where}.priority: must be at most 2**63 - 1, got {priority!r}")
        skill = spec.get("required_skill")
        if skill is not None:
            skill = _text(f"{where}.required_skill", skill)
        timeout = spec.get("timeout")
        if timeout is not None:
            timeout = _number(f"{where}.timeout", timeout, minimum=0, strict=True)
        spec_name = spec.get("spec", default_spec)
        if spec_name is not default_spec:
            spec_name = _name(f"{where}.spec", spec_name)
        depends_on = spec.get("depends_on")
        depends_on = _depends_on(f"{where}.depends_on", depends_on) if depends_on else []
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
                dependencies=depends_on,
            )
        )
    _check_dependencies(tasks)
    return tasks


def _name(where: str, value: Any) -> str:
    """An id or spec name: a non-empty single line (it is a column of the
    table, a line of the progress and part of file names)."""
    if isinstance(value, str) and value.strip() and not _CONTROL.search(value):
        return value
    value = _text(where, value)
    raise JobError(
        f"{where}: must not contain control characters (such as a newline), got {value!r}"
    )


def _command(where: str, value: Any) -> str:
    command = _text(f"{where}.command", value)
    if "\0" in command:
        raise JobError(f"{where}.command: must not contain a NUL character")
    size = len(command.encode("utf-8", "surrogateescape"))
    if size >= MAX_COMMAND_BYTES:
        raise JobError(
            f"{where}.command: {size:,} bytes; the system takes at most "
            f"{MAX_COMMAND_BYTES - 1:,} bytes in one argument (put it in a script)"
        )
    return command


def _depends_on(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise JobError(f"{where}: must be a task id or a list of them, got {value!r}")
    for i, dep in enumerate(value):
        if not isinstance(dep, str) or not dep.strip():
            _text(f"{where}[{i}]", dep)
    return list(dict.fromkeys(value)) if len(value) > 1 else value


def _check_dependencies(tasks: list[Task]) -> None:
    """Every dependency names a task of the job, and none waits for itself
    through others (the core's graph check: linear time)."""
    if not any(t.dependencies for t in tasks):
        return
    from necrocode_dispatch._core import check_dependencies

    unknown, cycles = check_dependencies({t.id: t.dependencies for t in tasks})
    if unknown:
        task_id, missing = unknown[0]
        index = next(i for i, t in enumerate(tasks) if t.id == task_id)
        raise JobError(f"tasks[{index}] ({task_id!r}).depends_on: no task {missing!r} in the job")
    if cycles:
        more = f" (and {len(cycles) - 1} more)" if len(cycles) > 1 else ""
        raise JobError(f"tasks: a dependency cycle can never run: {' -> '.join(cycles[0])}{more}")
