"""NecroCode itself on the Rust core (issue 13, SPEC §8): NecroCode's real
file-based TaskRegistry, a real repo_pool.PoolManager whose slots are clones
of a git repository made here, and NecroCode's local-process launcher (watched)
running a small runner script.

Needs NecroCode's source: `NECROCODE_SRC` names it (`.ci/run` sets it to
../shared/necrocode-upstream); without it every test here is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SOURCE = os.environ.get("NECROCODE_SRC")
if not SOURCE or not (Path(SOURCE) / "necrocode" / "dispatcher").is_dir():
    pytest.skip(
        "NecroCode's source is not available: set NECROCODE_SRC to a checkout of "
        "necrocode-upstream to run the NecroCode integration tests",
        allow_module_level=True,
    )
if str(Path(SOURCE).resolve()) not in sys.path:
    sys.path.insert(0, str(Path(SOURCE).resolve()))

from necrocode.dispatcher.config import DispatcherConfig  # noqa: E402
from necrocode.dispatcher.models import AgentPool, PoolType, SchedulingPolicy  # noqa: E402
from necrocode.repo_pool.config import PoolConfig  # noqa: E402
from necrocode.repo_pool.pool_manager import PoolManager  # noqa: E402
from necrocode.task_registry import TaskRegistry  # noqa: E402
from necrocode.task_registry.kiro_sync import TaskDefinition  # noqa: E402
from necrocode.task_registry.models import EventType, TaskState  # noqa: E402

from necrocode_dispatch.integrations.necrocode import NecroCodeDispatcherCore  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")

RUNNER = textwrap.dedent(
    """
    import json, os, sys, time
    task = json.loads(os.environ["TASK_CONTEXT"])["task_id"]
    marks = os.environ["RUNNER_MARKS_DIR"]
    with open(os.path.join(marks, "launches"), "a") as f:
        f.write(f"{task} {time.time()} {os.getpid()}\\n")
    if task == "ok":
        sys.exit(0)
    if task == "flaky":
        flag = os.path.join(marks, "flaky-failed")
        if os.path.exists(flag):
            sys.exit(0)
        open(flag, "w").close()
        print("flaky: first run fails")
        sys.exit(1)
    if task == "sleepy":
        time.sleep(60)
    print("bad: always fails")
    sys.exit(2)
    """
)


class World:
    """A registry, a repo pool of clones and a runner script in `root`."""

    def __init__(self, root: Path):
        self.root = root
        origin = root / "origin"
        origin.mkdir()
        commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"]
        for command in (["git", "init", "-q"], [*commit, "--allow-empty", "-m", "init"]):
            subprocess.run(command, cwd=origin, check=True)
        self.origin = origin
        self.script = root / "runner.py"
        self.script.write_text(RUNNER)
        self.marks = root / "marks"
        self.marks.mkdir()
        self.registry_dir = root / "registry"
        self.registry = TaskRegistry(registry_dir=self.registry_dir)

    def make_pool(self, workspaces: Path) -> PoolConfig:
        config = PoolConfig(workspaces_dir=workspaces)
        PoolManager(config=config).create_pool("repo", str(self.origin), 2)
        return config

    def taskset(self, spec: str, tasks: dict[str, list[str]]) -> None:
        definitions = [
            TaskDefinition(
                id=task_id,
                title=task_id,
                description=task_id,
                is_optional=False,
                is_completed=False,
                dependencies=deps,
            )
            for task_id, deps in tasks.items()
        ]
        self.registry.create_taskset(spec, definitions)

    def pool(self, script: str | None = None) -> AgentPool:
        return AgentPool(
            name="local",
            type=PoolType.LOCAL_PROCESS,
            max_concurrency=2,
            config={
                "runner_script": script or f"{sys.executable} {self.script}",
                "marks_dir": str(self.marks),
            },
        )

    def config(self, script: str | None = None) -> DispatcherConfig:
        config = DispatcherConfig(
            poll_interval=0.05,
            task_registry_dir=self.registry_dir,
            retry_max_attempts=3,
            heartbeat_timeout=30,
            agent_pools=[self.pool(script)],
        )
        config.repo_pool_config = self.make_pool(self.root / "workspaces")
        return config

    def states(self, spec: str) -> dict[str, TaskState]:
        return {t.id: t.state for t in self.registry.get_taskset(spec).tasks}

    def launches(self) -> list[tuple[str, float, int]]:
        path = self.marks / "launches"
        if not path.exists():
            return []
        rows = [line.split() for line in path.read_text().splitlines()]
        return [(task, float(at), int(pid)) for task, at, pid in rows]

    def wait(self, spec: str, done, within: float = 30.0) -> dict[str, TaskState]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            states = self.states(spec)
            if done(states):
                return states
            time.sleep(0.05)
        return self.states(spec)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def finished(states):
    return all(s in (TaskState.DONE, TaskState.FAILED) for s in states.values())


def events(world: World, spec: str, task_id: str) -> list:
    return [e for e in world.registry.event_store.get_all_events(spec) if e.task_id == task_id]


def test_ok_flaky_and_bad_end_as_necrocode_expects(world):
    world.taskset("spec1", {"ok": [], "flaky": [], "bad": []})
    config = world.config()
    dispatcher = NecroCodeDispatcherCore(config)
    dispatcher.retry_manager.initial_delay = 0.3
    dispatcher.start()
    try:
        states = world.wait("spec1", finished)
    finally:
        dispatcher.stop(timeout=5)
    assert states == {"ok": TaskState.DONE, "flaky": TaskState.DONE, "bad": TaskState.FAILED}
    launches = world.launches()
    flaky = [at for task, at, _ in launches if task == "flaky"]
    assert len(flaky) == 2 and flaky[1] - flaky[0] >= 0.3
    assert [task for task, _, _ in launches].count("bad") == 3
    assert [task for task, _, _ in launches].count("ok") == 1
    failed = [e for e in events(world, "spec1", "bad") if e.event_type is EventType.TASK_FAILED]
    assert failed and failed[-1].details.get("retry_count", failed[-1].details.get("retries")) == 3
    kinds = {e.event_type for e in events(world, "spec1", "ok")}
    assert {
        EventType.TASK_ASSIGNED,
        EventType.RUNNER_STARTED,
        EventType.RUNNER_FINISHED,
        EventType.TASK_COMPLETED,
    } <= kinds
    summary = PoolManager(config=config.repo_pool_config).get_pool_summary()["repo"]
    assert (summary.available_slots, summary.allocated_slots) == (2, 0)
    for slot in Path(config.repo_pool_config.workspaces_dir).glob("repo/slot*"):
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=slot, capture_output=True, text=True
        ).stdout.splitlines()
        # slot.json is the repo pool's own record of the slot.
        assert [line for line in status if not line.endswith("slot.json")] == [], slot
    status = dispatcher.get_status()
    assert status["pool_statuses"][0].pool_name == "local"
    assert "event_recorder" in status and "deadlock_info" in status
    assert dispatcher.registry.get_taskset("spec1")  # NecroCode's own components


def test_stop_while_a_runner_sleeps_ends_its_process_group(world):
    world.taskset("spec1", {"sleepy": []})
    dispatcher = NecroCodeDispatcherCore(world.config())
    dispatcher.start()
    try:
        world.wait("spec1", lambda s: s["sleepy"] is TaskState.RUNNING)
        deadline = time.monotonic() + 10
        while not world.launches() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        dispatcher.stop(timeout=0.2)
    (_, _, pid) = world.launches()[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the runner's process group outlived stop()")
    assert world.states("spec1")["sleepy"] is TaskState.READY
    ready = [e for e in events(world, "spec1", "sleepy") if e.event_type is EventType.TASK_READY]
    assert ready[-1].details.get("interrupted") is True


def test_a_launch_failing_at_the_retry_limit_ends_failed_and_is_not_started_again(world):
    world.taskset("spec1", {"doomed": []})
    dispatcher = NecroCodeDispatcherCore(world.config(script="/nonexistent/runner"))
    dispatcher.retry_manager.initial_delay = 0.05
    launches = []
    launch = dispatcher.runner_launcher.launch

    def counting_launch(task, slot, pool):
        launches.append(task.id)
        return launch(task, slot, pool)

    dispatcher.runner_launcher.launch = counting_launch
    dispatcher.start()
    try:
        states = world.wait("spec1", finished)
        time.sleep(0.5)  # would it start again?
    finally:
        dispatcher.stop(timeout=1)
    assert states["doomed"] is TaskState.FAILED
    assert launches == ["doomed"] * 3


def test_a_dependency_cycle_is_reported_and_what_it_blocks_never_starts(world):
    world.taskset("spec1", {"a": ["b"], "b": ["a"], "c": ["a"], "ok": []})
    dispatcher = NecroCodeDispatcherCore(world.config())
    assert dispatcher.check_deadlock_now() == [["a", "b"]]
    info = dispatcher.get_status()["deadlock_info"]
    assert info["detected_cycles"] == [["a", "b"]] and info["blocked_tasks"] == ["c"]
    dispatcher.start()
    try:
        world.wait("spec1", lambda s: s["ok"] is TaskState.DONE)
        time.sleep(0.3)
    finally:
        dispatcher.stop(timeout=1)
    assert sorted(task for task, _, _ in world.launches()) == ["ok"]


def test_the_policy_written_back_keeps_necrocodes_enum(world):
    world.taskset("spec1", {"ok": []})
    config = world.config()
    dispatcher = NecroCodeDispatcherCore(config)
    dispatcher.set_scheduling_policy(SchedulingPolicy.FIFO)
    assert config.scheduling_policy == SchedulingPolicy.FIFO
    dispatcher.patched = "attributes can be set"
    assert dispatcher.patched == "attributes can be set"


def test_necrocodes_service_entry_point_runs_on_the_core(world, tmp_path):
    """main.py copied with its one import line changed, run as NecroCode runs
    it (a JSON config), stopped by SIGTERM."""
    world.taskset("spec1", {"ok": [], "flaky": [], "bad": []})
    home = tmp_path / "home"
    # NecroCode's main.py builds its PoolManager with the default config:
    # the pool lives under $HOME/.necrocode/workspaces.
    world.make_pool(home / ".necrocode" / "workspaces")
    main = (Path(SOURCE) / "necrocode" / "dispatcher" / "main.py").read_text()
    original = "from necrocode.dispatcher.dispatcher_core import DispatcherCore"
    assert main.count(original) == 1
    service = tmp_path / "service.py"
    service.write_text(
        main.replace(original, "from necrocode_dispatch.dispatcher_core import DispatcherCore")
    )
    config = tmp_path / "dispatcher.json"
    pool = world.pool()
    config.write_text(
        json.dumps(
            {
                "poll_interval": 0.05,
                "task_registry_dir": str(world.registry_dir),
                "retry_max_attempts": 3,
                "agent_pools": [
                    {
                        "name": pool.name,
                        "type": pool.type.value,
                        "max_concurrency": 2,
                        "config": pool.config,
                    }
                ],
            }
        )
    )
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(Path(SOURCE).resolve()))
    process = subprocess.Popen(
        [sys.executable, str(service), "--config", str(config), "--log-level", "WARNING"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        states = world.wait("spec1", finished, within=60)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert states == {"ok": TaskState.DONE, "flaky": TaskState.DONE, "bad": TaskState.FAILED}, (
        output[-3000:]
    )
    assert process.returncode == 0, output[-3000:]


def test_the_one_line_switch_builds_necrocode_components_from_any_config_form(tmp_path):
    """`DispatcherCore()`, `DispatcherCore(config)` and `DispatcherCore(config=...)`
    through the switched import; a config without task_registry_dir gets the
    registry's own default under $HOME instead of NecroCode's crash."""
    script = textwrap.dedent(
        """
        from pathlib import Path
        from necrocode.dispatcher.config import DispatcherConfig
        from necrocode_dispatch.dispatcher_core import DispatcherCore
        import necrocode_dispatch

        assert DispatcherCore is not necrocode_dispatch.DispatcherCore
        assert issubclass(DispatcherCore, necrocode_dispatch.DispatcherCore)
        for make in (
            lambda: DispatcherCore(),
            lambda: DispatcherCore(DispatcherConfig()),
            lambda: DispatcherCore(config=DispatcherConfig()),
        ):
            dispatcher = make()
            assert dispatcher.task_source.__class__.__name__ == "RegistryTaskSource"
            assert Path(dispatcher.registry.registry_dir).is_relative_to(Path.home())
            assert dispatcher.tick()["enqueued"] == 0
        print("ok")
        """
    )
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(Path(SOURCE).resolve()))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    assert (tmp_path / ".necrocode" / "registry").is_dir()
