"""How the dispatcher's per-pass costs grow with what it holds (SPEC §6,
"Scale"; issue 14): one `tick()` against N queued tasks for each policy with
every pool full and with the tasks' own pool full while another has room,
one `tick()` against N running runners (none expired), and
`get_status()` with and without its per-task lists and `export_prometheus()`
against N delayed retries. Prints each row's time per call and its growth
exponent (the slope of log(time) over log(N); <= 0.1 is "O(work), not
O(tasks held)").

    python benches/scaling.py            # N = 10^2 .. 10^6
    python benches/scaling.py --quick    # N = 10^2 .. 10^4

No timing is asserted.
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

from necrocode_dispatch import (
    AgentPool,
    DispatcherConfig,
    DispatcherCore,
    ManualClock,
    PoolType,
    SchedulingPolicy,
    Task,
)


class Source:
    def __init__(self, tasks):
        self.tasks = tasks
        self.first = True

    def poll_ready_tasks(self):
        # The whole set once; afterwards nothing new (what an incremental
        # source gives), so a pass measures the dispatcher, not the poll.
        if self.first:
            self.first = False
            return self.tasks
        return []


class Launcher:
    def __init__(self):
        self.count = 0

    def launch(self, task, slot, pool):
        self.count += 1
        return SimpleNamespace(runner_id=f"r{self.count}")


def dispatcher(policy, pools=1, per_pool=1):
    config = DispatcherConfig(
        max_global_concurrency=10**7,
        heartbeat_timeout=10**6,
        scheduling_policy=policy,
        agent_pools=[
            AgentPool(name=f"p{i}", type=PoolType.LOCAL_PROCESS, max_concurrency=per_pool)
            for i in range(pools)
        ],
        skill_mapping={"default": [f"p{i}" for i in range(pools)]},
    )
    return DispatcherCore(config, runner_launcher=Launcher(), clock=ManualClock())


def per_call(call, repeat):
    began = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - began) / repeat


def tick_with_queued(policy, n):
    d = dispatcher(policy)
    d.task_source = Source(
        [Task(id=f"t{i}", priority=i % 7, metadata={"spec_name": f"s{i % 50}"}) for i in range(n)]
    )
    d.tick()  # queues them all; the one pool fills
    return per_call(d.tick, 50)


def tick_with_own_pools_full(policy, n):
    """Every task needs pool p0 (full); p1 has room but no task may use it."""
    d = dispatcher(policy, pools=2, per_pool=1)
    config = d.config
    config.skill_mapping = {"gpu": ["p0"], "default": ["p1"]}
    d.config = config  # re-read: the mapping changes, the pools stay
    d.task_source = Source(
        [
            Task(
                id=f"t{i}",
                required_skill="gpu",
                priority=i % 7,
                metadata={"spec_name": f"s{i % 50}"},
            )
            for i in range(n)
        ]
    )
    d.tick()
    return per_call(d.tick, 20)


def tick_with_running(n):
    d = dispatcher(SchedulingPolicy.PRIORITY, per_pool=n)
    d.task_source = Source([Task(id=f"t{i}") for i in range(n)])
    d.tick()  # every task running
    return per_call(d.tick, 50)


def with_delayed(n):
    d = dispatcher(SchedulingPolicy.PRIORITY)
    for i in range(n):
        d.handle_task_failure(f"t{i}", "spec", "exit 1")
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N up to 10^4")
    args = parser.parse_args()
    sizes = [10**k for k in range(2, 5 if args.quick else 7)]
    rows: dict[str, list[float]] = {}
    for policy in SchedulingPolicy:
        rows[f"tick, {policy.value}, pools full"] = [tick_with_queued(policy, n) for n in sizes]
    for policy in SchedulingPolicy:
        rows[f"tick, {policy.value}, own pool full"] = [
            tick_with_own_pools_full(policy, n) for n in sizes
        ]
    rows["tick, running runners"] = [tick_with_running(n) for n in sizes]
    status, light, prometheus = [], [], []
    for n in sizes:
        d = with_delayed(n)
        status.append(per_call(d.get_status, 3))
        light.append(per_call(lambda d=d: d.get_status(include_tasks=False), 50))
        prometheus.append(per_call(d.export_prometheus, 50))
        del d
    rows["get_status() with lists, delayed"] = status
    rows["get_status(include_tasks=False)"] = light
    rows["export_prometheus(), delayed"] = prometheus
    header = "".join(f"{'N=' + format(n, ','):>14}" for n in sizes)
    print(f"{'per call':<40}{header}  exponent")
    for name, times in rows.items():
        cells = "".join(f"{t * 1e6:>12.1f}µs" for t in times)
        slope = math.log(times[-1] / times[0]) / math.log(sizes[-1] / sizes[0])
        print(f"{name:<40}{cells}  {slope:8.2f}")


if __name__ == "__main__":
    main()
