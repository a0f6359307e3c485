"""Mock ports and a dispatcher factory shared by the dispatcher tests."""

from collections import Counter
from datetime import datetime
from unittest.mock import Mock

from necrocode_dispatch import (
    AgentPool,
    DispatcherConfig,
    DispatcherCore,
    ManualClock,
    PoolType,
    Task,
    TaskState,
)

START = datetime(2025, 6, 1, 12, 0, 0)


class SlotPool:
    """A repo pool that counts releases per slot id (thread-safe enough: Counter
    updates happen under the GIL)."""

    def __init__(self):
        self.released = Counter()
        self.release_slot = Mock(side_effect=self._release)
        self.allocate_slot = Mock()

    def _release(self, slot_id, cleanup=True):
        self.released[slot_id] += 1


def make_dispatcher(max_attempts=3, pools=(("local", 4), ("docker", 2)), global_limit=10, **kw):
    config = DispatcherConfig(
        retry_max_attempts=max_attempts,
        max_global_concurrency=global_limit,
        heartbeat_timeout=60,
        agent_pools=[
            AgentPool(name=n, type=PoolType.LOCAL_PROCESS, max_concurrency=m) for n, m in pools
        ],
    )
    clock = ManualClock(START)
    ports = {
        "task_registry": Mock(),
        "repo_pool_manager": SlotPool(),
        "event_recorder": Mock(),
        "runner_launcher": Mock(),
        "task_source": Mock(),
    }
    ports["task_source"].poll_ready_tasks.return_value = []
    ports.update(kw)
    dispatcher = DispatcherCore(config, clock=clock, **ports)
    return dispatcher, clock


def task(task_id, spec="spec-a", priority=0):
    return Task(id=task_id, priority=priority, metadata={"spec_name": spec})


def run(dispatcher, task_id, runner_id=None, pool="local", spec="spec-a"):
    runner_id = runner_id or f"runner-{task_id}"
    dispatcher.track_running(task(task_id, spec), runner_id, pool, f"slot-{task_id}")
    return runner_id


def last_state_update(registry):
    kwargs = registry.update_task_state.call_args.kwargs
    return kwargs["task_id"], kwargs["new_state"], kwargs["metadata"]


__all__ = ["START", "TaskState", "last_state_update", "make_dispatcher", "run", "task"]
