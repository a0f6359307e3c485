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
    python benches/scaling.py --plot benches/scaling.png   # also the log-log plot

No timing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
import time
import tracemalloc
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


# ---- memory per task held (SPEC §6 "Scale"; issue 14, acceptance 4) -----------------

#: Run in a fresh process: the Rust side's memory is not Python's, so it is the
#: growth of the resident set while the dispatcher takes the tasks (made before),
#: read once the allocator has given back what was freed.
_RUST_HELD = """
import os, sys
from types import SimpleNamespace
sys.path.insert(0, os.path.dirname(sys.argv[3]))
from scaling import Launcher, Source, dispatcher
from necrocode_dispatch import SchedulingPolicy, Task
kind, n = sys.argv[1], int(sys.argv[2])
tasks = [Task(id=f"task-{i:07d}", metadata={"spec_name": "spec"}) for i in range(n)]
runners = [SimpleNamespace(runner_id=f"runner-{i:07d}") for i in range(n)]
d = dispatcher(SchedulingPolicy.PRIORITY, per_pool=n if kind == "running" else 0)
d.runner_launcher = Launcher()
d.runner_launcher.runners = iter(runners)
d.runner_launcher.launch = lambda task, slot, pool: next(d.runner_launcher.runners)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
if kind == "delayed":
    for t in tasks:
        d.handle_task_failure(t.id, "spec", "exit 1")
else:
    d.task_source = Source(tasks)
    d.tick()
# Memory the tick's reports used and freed stays with glibc for reuse: given
# back first, so that what is counted is what the dispatcher holds, as
# tracemalloc counts the reference's live objects.
try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
print((rss() - before) / n)
"""


def reference_held(kind: str, n: int) -> float:
    """Bytes per task the reference dispatcher holds (its Python objects)."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import reference

    ports = SimpleNamespace(
        update_task_state=lambda *a, **k: None,
        record_event=lambda *a, **k: None,
        release_slot=lambda *a, **k: None,
    )
    tasks = [Task(id=f"task-{i:07d}", metadata={"spec_name": "spec"}) for i in range(n)]
    runner_ids = [f"runner-{i:07d}" for i in range(n)]
    ref = reference.Dispatcher(
        {"pool": n},
        max_global_concurrency=n,
        task_registry=ports,
        repo_pool_manager=ports,
        runner_launcher=ports,
        event_recorder=ports,
    )
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if kind == "queued":
        for t in tasks:
            ref.enqueue(t)
    else:
        for t, r in zip(tasks, runner_ids, strict=True):
            ref.track_running(t, r, "pool", None)
        if kind == "delayed":
            for t, r in zip(tasks, runner_ids, strict=True):
                ref.handle_task_failure(t.id, "spec", "exit 1", runner_id=r)
    held = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    return held


def rust_held(kind: str, n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _RUST_HELD, kind, str(n), __file__],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def plot(sizes: list[int], rows: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, times in rows.items():
        style = "--" if name.startswith("get_status() with lists") else "-"
        ax.plot(sizes, [t * 1e6 for t in times], style, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks held (queued, running or delayed)")
    ax.set_ylabel("time per call (µs)")
    ax.set_title("necrocode-dispatch: cost of a call against what the dispatcher holds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N up to 10^4")
    parser.add_argument("--plot", metavar="PNG", help="also draw time per call against N, log-log")
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
    if args.plot:
        plot(sizes, rows, args.plot)
    n = sizes[-1]
    print(
        f"\n{'memory per task held':<40}{'N':>14}{'reference':>12}{'rust':>12}{'ratio':>9}  target"
    )
    for kind in ("queued", "running", "delayed"):
        ref, rust = reference_held(kind, n), rust_held(kind, n)
        ok = "ok" if rust <= 0.5 * ref else "MISSED"
        print(f"{kind:<40}{n:>14,}{ref:>10.0f} B{rust:>10.0f} B{rust / ref:>8.2f}x  <= 0.5x {ok}")


if __name__ == "__main__":
    main()
