"""Side-by-side benchmarks: the Rust core against the pure-Python reference
(benches/reference.py) in one process, on identical inputs.

    python benches/bench.py                  # the full table (a few minutes)
    python benches/bench.py --quick          # a smoke run for CI (under 30 s)
    python benches/bench.py --plot perf.png  # also draw time per op vs tracked tasks

Every figure is the median of repeated runs, the two sides' runs alternating
so that both see the same machine. Logging is configured the same for
both sides (WARNING: the INFO and DEBUG calls both make are checked and skipped,
as in production). No figure is asserted: speed goals are read off the table.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference

import necrocode_dispatch as rust
from necrocode_dispatch import AgentPool, DispatcherConfig, PoolType, Task

# SPEC §6 (as revised on 2026-11-30): the ratio each row must reach
# (reference time / Rust time).
TARGETS = {
    "record_failure": 15,
    "should_retry": 8,
    "get_tasks_ready_for_retry (100 due)": 1000,
    "handle_task_failure (running task)": 8,
    "handle_runner_completion (success)": 4,
    "cycle assign->complete": 4,
    "cycle assign->fail->retry->complete": 5,
}
READY_TARGET_SIZE = 1_000_000
RUNNING = 1_000


@dataclass
class Row:
    operation: str
    size: int
    reference: float  # seconds per op
    rust: float

    @property
    def ratio(self) -> float:
        return self.reference / self.rust if self.rust > 0 else float("inf")


# What one side of a row does: `setup()` untimed, then `run()` timed; `run`
# returns how many operations it did.
Side = tuple[Callable[[], None], Callable[[], int]]


def sample(side: Side) -> float:
    """Seconds per op of one timed run."""
    setup, run = side
    setup()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        ops = run()
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / 1e9 / max(1, ops)


def measure(operation: str, size: int, side: Callable[[str], Side], repeat: int) -> Row:
    """The median seconds per op of each side. The samples alternate between
    the sides, so both see the same machine: on a shared VM the speed drifts
    over seconds, and two blocks timed one after the other would not."""
    sides = {kind: side(kind) for kind in ("reference", "rust")}
    samples: dict[str, list[float]] = {kind: [] for kind in sides}
    for _ in range(repeat):
        for kind, s in sides.items():
            samples[kind].append(sample(s))
    return Row(
        operation,
        size,
        statistics.median(samples["reference"]),
        statistics.median(samples["rust"]),
    )


def rounds_for(n: int, ops: int = 100_000) -> int:
    """How many passes over `n` tasks make a sample of about `ops` operations:
    a sample of a few hundred microseconds would mostly time cold caches."""
    return max(1, ops // n)


class NoOpPorts:
    """Ports that do nothing, with the original signatures: the event
    recorder's are NecroCode's `EventRecorder`'s (named parameters)."""

    def update_task_state(self, spec_name, task_id, new_state, metadata=None):
        pass

    def release_slot(self, slot_id, cleanup=True):
        pass

    def allocate_slot(self, repo_name, metadata=None):
        return SLOT

    def launch(self, task, slot, pool):
        runner_id = f"r-{task.id}-{next_launch()}"
        RUNNER_OF[task.id] = runner_id
        return SimpleNamespace(runner_id=runner_id)

    def stop(self, runner_id):
        pass

    def record_task_assigned(
        self, spec_name, task_id, runner_id, slot_id, pool_name, timestamp=None
    ):
        pass

    def record_runner_started(
        self,
        spec_name,
        task_id,
        runner_id,
        slot_id,
        pool_name,
        pid=None,
        container_id=None,
        job_name=None,
        timestamp=None,
    ):
        pass

    def record_runner_finished(
        self,
        spec_name,
        task_id,
        runner_id,
        slot_id,
        success,
        execution_time_seconds=None,
        failure_reason=None,
        timestamp=None,
    ):
        pass

    def record_task_completed(
        self, spec_name, task_id, runner_id, execution_time_seconds=None, timestamp=None
    ):
        pass

    def record_task_failed(
        self, spec_name, task_id, runner_id, failure_reason, retry_count=0, timestamp=None
    ):
        pass


class KwargsPorts(NoOpPorts):
    """NoOpPorts whose event recorder takes the optional details as `**kwargs`.
    CPython then compares each such keyword with every named parameter by
    value before filing it (about 100 instructions a comparison), on both
    sides alike: 4 keywords x 5 parameters for a launch, 2 x 5 for a
    finished runner."""

    def record_runner_started(self, spec_name, task_id, runner_id, slot_id, pool_name, **details):
        pass  # details: pid, container_id, job_name, timestamp

    def record_runner_finished(self, spec_name, task_id, runner_id, slot_id, success, **timing):
        pass  # timing: execution_time_seconds, failure_reason


SLOT = SimpleNamespace(slot_id="slot-1")
RUNNER_OF: dict[str, str] = {}  # task id -> its latest runner id
_launches = iter(range(1 << 62))


def next_launch() -> int:
    return next(_launches)


def ids(n: int, prefix: str = "task") -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


# ---- RetryManager ------------------------------------------------------------------


def bench_record_failure(n: int, repeat: int) -> Row:
    keys = ids(n)
    rounds = rounds_for(n)
    box = {}

    def side(kind) -> Side:
        factory = rust.RetryManager if kind == "rust" else reference.RetryManager

        def setup():
            # Fresh managers: every call records a task's first failure.
            box[kind] = [factory() for _ in range(rounds)]

        def run():
            for manager in box[kind]:
                record = manager.record_failure
                for k in keys:
                    record(k, "exit 1")
            return n * rounds

        return setup, run

    return measure("record_failure", n, side, repeat)


def bench_should_retry(n: int, repeat: int) -> Row:
    keys = ids(n)
    rounds = rounds_for(n)

    def side(kind) -> Side:
        m = rust.RetryManager() if kind == "rust" else reference.RetryManager()
        for k in keys:
            m.record_failure(k, "exit 1")  # every task backing off: the DEBUG branch
        should = m.should_retry

        def run():
            for _ in range(rounds):
                for k in keys:
                    should(k)
            return n * rounds

        return (lambda: None), run

    return measure("should_retry", n, side, repeat)


def tracked_managers(n: int, due: int = 100):
    """Managers tracking `n` tasks of which `due` are due now."""
    keys = ids(n)
    out = {}
    for kind, factory in (("rust", rust.RetryManager), ("reference", reference.RetryManager)):
        m = factory(max_attempts=3, initial_delay=0.0)
        for k in keys[:due]:
            m.record_failure(k)
        m.initial_delay = 1e6
        for k in keys[due:]:
            m.record_failure(k)
        out[kind] = m
    return out


def bench_ready_query(n: int, repeat: int) -> Row:
    managers = tracked_managers(n)
    loops = max(1, 100_000 // n)

    def side(kind) -> Side:
        query = managers[kind].get_tasks_ready_for_retry

        def run():
            for _ in range(loops):
                assert len(query()) == 100
            return loops

        return (lambda: None), run

    return measure("get_tasks_ready_for_retry (100 due)", n, side, repeat)


_RUST_MEMORY = """
import gc, os, sys
import necrocode_dispatch as rust
n = int(sys.argv[1])
keys = [f"task-{i:07d}" for i in range(n)]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

gc.collect()
manager = rust.RetryManager()
before = rss()
for k in keys:
    manager.record_failure(k, "exit 1")
print((rss() - before) / n)
"""


def memory_per_task(n: int) -> tuple[float, float]:
    """Bytes per tracked task: tracemalloc for the reference's Python objects;
    for the Rust manager (its memory is not Python's) the RSS growth of a fresh
    process, so that no memory freed by the Python side is reused."""
    keys = ids(n)
    gc.collect()
    tracemalloc.start()
    m = reference.RetryManager()
    before = tracemalloc.get_traced_memory()[0]
    for k in keys:
        m.record_failure(k, "exit 1")
    py_bytes = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    del m
    out = subprocess.run(
        [sys.executable, "-c", _RUST_MEMORY, str(n)], capture_output=True, text=True, check=True
    )
    return py_bytes, float(out.stdout.strip())


# ---- DispatcherCore -----------------------------------------------------------------


def make_task(task_id: str) -> Task:
    return Task(id=task_id, metadata={"spec_name": "spec", "repo_name": "repo"})


def dispatchers(
    capacity: int,
    max_attempts: int = 3,
    initial_delay: float = 1.0,
    ports: NoOpPorts | None = None,
):
    ports = ports or NoOpPorts()
    config = DispatcherConfig(
        max_global_concurrency=capacity,
        retry_max_attempts=max_attempts,
        retry_initial_delay=initial_delay,
        agent_pools=[AgentPool(name="pool", type=PoolType.LOCAL_PROCESS, max_concurrency=capacity)],
    )
    core = rust.DispatcherCore(
        config,
        task_registry=ports,
        repo_pool_manager=ports,
        runner_launcher=ports,
        event_recorder=ports,
    )
    ref = reference.Dispatcher(
        {"pool": capacity},
        max_global_concurrency=capacity,
        max_attempts=max_attempts,
        task_registry=ports,
        repo_pool_manager=ports,
        runner_launcher=ports,
        event_recorder=ports,
    )
    ref.retry_manager.initial_delay = initial_delay
    return {"rust": core, "reference": ref}, ports


def bench_outcome_path(
    name: str, n: int, repeat: int, method: str, arguments, ports: type[NoOpPorts] = NoOpPorts
) -> Row:
    """`dispatcher.<method>(*arguments(task))` on each of `n` running tasks.
    The arguments are made before timing: the caller has its ids already."""
    tasks = [make_task(k) for k in ids(n)]
    calls = [arguments(t) for t in tasks]
    box = {}

    def side(kind) -> Side:
        def setup():
            d = dispatchers(n, ports=ports())[0][kind]
            for t in tasks:
                d.track_running(t, f"r-{t.id}", "pool", f"s-{t.id}")
            box[kind] = getattr(d, method)

        def run():
            report = box[kind]
            for args in calls:
                report(*args)
            return n

        return setup, run

    return measure(name, n, side, repeat)


def bench_failure_path(n: int, repeat: int) -> Row:
    return bench_outcome_path(
        "handle_task_failure (running task)",
        n,
        repeat,
        "handle_task_failure",
        lambda t: (t.id, "spec", "exit 1", f"r-{t.id}", f"s-{t.id}", "pool"),
    )


def bench_completion_path(n: int, repeat: int, ports: type[NoOpPorts] = NoOpPorts) -> Row:
    return bench_outcome_path(
        "handle_runner_completion (success)" + PORTS_SUFFIX[ports],
        n,
        repeat,
        "handle_runner_completion",
        lambda t: (f"r-{t.id}", t.id, "spec", True, f"s-{t.id}", "pool"),
        ports,
    )


#: How a row's name says its ports were not NoOpPorts.
PORTS_SUFFIX = {NoOpPorts: "", KwargsPorts: ", **kwargs ports"}


class ListSource:
    def __init__(self):
        self.pending: list[Task] = []

    def poll_ready_tasks(self):
        out, self.pending = self.pending, []
        return out


def bench_cycles(
    n: int, repeat: int, ports: type[NoOpPorts] = NoOpPorts, retries: bool = True
) -> list[Row]:
    """assign -> complete, and (with `retries`) assign -> fail -> retry ->
    assign -> complete, per task, through no-op Python ports."""
    rows = []
    cycles = (("cycle assign->complete", False), ("cycle assign->fail->retry->complete", True))
    for name, retry in cycles[: 2 if retries else 1]:
        box: dict = {}
        name += PORTS_SUFFIX[ports]

        def side(kind, retry=retry, box=box) -> Side:
            def setup():
                box["d"] = dispatchers(n, initial_delay=0.0, ports=ports())[0][kind]
                box["tasks"] = [make_task(k) for k in ids(n, prefix=f"c{next_launch()}")]

            def run():
                d = box["d"]
                tasks = box["tasks"]
                rounds = 2 if retry else 1
                if kind == "rust":
                    source = ListSource()
                    d.task_source = source
                    source.pending = list(tasks)
                    for attempt in range(rounds):
                        assert d.tick()["assigned"] == n
                        last = attempt == rounds - 1
                        for t in tasks:
                            rid = RUNNER_OF[t.id]
                            if last:
                                d.handle_runner_completion(rid, t.id, "spec", True)
                            else:
                                d.handle_task_failure(t.id, "spec", "exit 1", rid)
                else:
                    for t in tasks:
                        d.enqueue(t)
                    for attempt in range(rounds):
                        while d.assign_next():
                            pass
                        last = attempt == rounds - 1
                        for rid, info in list(d.runners.items()):
                            task_id = info.runner.task_id
                            if last:
                                d.handle_runner_completion(rid, task_id, "spec", True)
                            else:
                                d.handle_task_failure(task_id, "spec", "exit 1", rid)
                        if not last:
                            d.promote_due()
                            for t in tasks:
                                d.enqueue(t)
                return n

            return setup, run

        rows.append(measure(name, n, side, repeat))
    return rows


# ---- report -------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def print_table(rows: list[Row], memory: tuple[int, float, float] | None) -> None:
    print(f"{'operation':<52} {'size':>9} {'reference':>11} {'rust':>11} {'ratio':>9}  target")
    for r in rows:
        target = TARGETS.get(r.operation)
        if r.operation.startswith("get_tasks_ready") and r.size != READY_TARGET_SIZE:
            target = None
        mark = ""
        if target:
            mark = f">= {target}x " + ("ok" if r.ratio >= target else "MISSED")
        print(
            f"{r.operation:<52} {r.size:>9,} {fmt_time(r.reference):>11} {fmt_time(r.rust):>11} "
            f"{r.ratio:>8.1f}x  {mark}"
        )
    if memory:
        n, py_bytes, rust_bytes = memory
        share = rust_bytes / py_bytes
        verdict = "ok" if share <= 1 / 3 else "MISSED"
        print(
            f"{'memory per tracked task':<52} {n:>9,} {py_bytes:>9.0f} B {rust_bytes:>9.0f} B "
            f"{share:>8.2f}x  <= 0.33x {verdict}"
        )


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op, style in (("get_tasks_ready_for_retry (100 due)", "o-"), ("should_retry", "s--")):
        points = sorted((r.size, r) for r in rows if r.operation == op)
        if not points:
            continue
        sizes = [s for s, _ in points]
        ax.plot(sizes, [r.reference * 1e6 for _, r in points], style, label=f"{op} — Python")
        ax.plot(sizes, [r.rust * 1e6 for _, r in points], style, label=f"{op} — Rust")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tracked tasks")
    ax.set_ylabel("time per call (µs)")
    ax.set_title("necrocode-dispatch: Rust core vs pure Python")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI (< 30 s)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw time per op vs tracked tasks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    # The dispatcher paths run with RUNNING tasks running at once: a fleet of
    # agents is tens to hundreds of runners (the default limit is 10), so
    # 1,000 is generous; each sample is one batch, and more samples are taken.
    if args.quick:
        repeat, sizes, mem_n = 3, [1_000, 10_000], 20_000
    else:
        repeat, sizes, mem_n = 7, [1_000, 10_000, 100_000, 1_000_000], 1_000_000
    running, batches = RUNNING, repeat * 3
    print(
        f"necrocode-dispatch {rust.__version__} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {repeat} runs; logging at WARNING on both sides"
    )
    began = time.monotonic()
    rows = [bench_record_failure(s, repeat) for s in sizes[:3]]
    rows += [bench_should_retry(s, repeat) for s in sizes]
    rows += [bench_ready_query(s, repeat) for s in sizes]
    rows += [bench_failure_path(running, batches), bench_completion_path(running, batches)]
    rows += bench_cycles(running, batches)
    rows += [bench_completion_path(running, batches, KwargsPorts)]
    rows += bench_cycles(running, batches, KwargsPorts, retries=False)
    memory = (mem_n, *memory_per_task(mem_n))
    print_table(rows, memory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"({time.monotonic() - began:.1f} s; peak RSS {peak} MiB)")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
