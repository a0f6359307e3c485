"""Instructions per call of the hot paths, counted by callgrind: a figure
that repeats where timings on a shared machine move by up to 1.5x.

    python benches/instructions.py            # every path, both sides, N = 2,000
    python benches/instructions.py completion failure --n 1000

Each path runs twice under `valgrind --tool=callgrind` in a fresh process
(PYTHONHASHSEED=0, ending without teardown): once with its setup only, once
with the setup and N calls. The difference over N is the instructions a
call, for the Rust core
and for the pure-Python reference alike, the Python port calls included
(benches/bench.py's no-op ports). Needs valgrind; nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench


def completion(
    kind: str, n: int, ports: type[bench.NoOpPorts] = bench.NoOpPorts
) -> Callable[[], None]:
    d = bench.dispatchers(n, ports=ports())[0][kind]
    tasks = [bench.make_task(k) for k in bench.ids(n)]
    for t in tasks:
        d.track_running(t, f"r-{t.id}", "pool", f"s-{t.id}")
    calls = [(f"r-{t.id}", t.id, "spec", True, f"s-{t.id}", "pool") for t in tasks]

    def run():
        for args in calls:
            d.handle_runner_completion(*args)

    return run


def failure(kind: str, n: int) -> Callable[[], None]:
    d = bench.dispatchers(n)[0][kind]
    tasks = [bench.make_task(k) for k in bench.ids(n)]
    for t in tasks:
        d.track_running(t, f"r-{t.id}", "pool", f"s-{t.id}")
    calls = [(t.id, "spec", "exit 1", f"r-{t.id}", f"s-{t.id}", "pool") for t in tasks]

    def run():
        for args in calls:
            d.handle_task_failure(*args)

    return run


def cycle(kind: str, n: int, ports: type[bench.NoOpPorts] = bench.NoOpPorts) -> Callable[[], None]:
    """assign -> complete for each of N tasks, as bench.py's cycle row."""
    d = bench.dispatchers(n, initial_delay=0.0, ports=ports())[0][kind]
    tasks = [bench.make_task(k) for k in bench.ids(n, prefix="c")]

    def run():
        if kind == "rust":
            source = bench.ListSource()
            source.pending = list(tasks)
            d.task_source = source
            d.tick()
            for t in tasks:
                d.handle_runner_completion(bench.RUNNER_OF[t.id], t.id, "spec", True)
        else:
            for t in tasks:
                d.enqueue(t)
            while d.assign_next():
                pass
            for rid, info in list(d.runners.items()):
                d.handle_runner_completion(rid, info.runner.task_id, "spec", True)

    return run


def record_failure(kind: str, n: int) -> Callable[[], None]:
    m = (bench.rust.RetryManager if kind == "rust" else bench.reference.RetryManager)()
    keys = bench.ids(n)

    def run():
        for k in keys:
            m.record_failure(k, "exit 1")

    return run


def should_retry(kind: str, n: int) -> Callable[[], None]:
    m = (bench.rust.RetryManager if kind == "rust" else bench.reference.RetryManager)()
    keys = bench.ids(n)
    for k in keys:
        m.record_failure(k, "exit 1")

    def run():
        for k in keys:
            m.should_retry(k)

    return run


PATHS: dict[str, Callable[[str, int], Callable[[], None]]] = {
    "completion": completion,
    "failure": failure,
    "cycle": cycle,
    "record_failure": record_failure,
    "should_retry": should_retry,
    # The event recorder taking its optional details as **kwargs (bench.KwargsPorts).
    "completion-kwargs": lambda kind, n: completion(kind, n, bench.KwargsPorts),
    "cycle-kwargs": lambda kind, n: cycle(kind, n, bench.KwargsPorts),
}


def counted(path: str, kind: str, n: int, calls: bool) -> int:
    """Instructions of one fresh process: the path's setup, and its N calls
    when `calls`."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--run",
        path,
        kind,
        str(n),
        "1" if calls else "0",
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help=f"of {', '.join(PATHS)} (default: all)")
    parser.add_argument("--n", type=int, default=2000, help="calls per path (default 2,000)")
    parser.add_argument("--run", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.run:
        path, kind, n, calls = args.run
        run = PATHS[path](kind, int(n))
        if calls == "1":
            run()
        # No teardown: what the calls left behind would be freed in one
        # process and not in the other.
        sys.stdout.flush()
        os._exit(0)
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path {unknown[0]!r}: one of {', '.join(PATHS)}")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    print(f"instructions a call, callgrind, PYTHONHASHSEED=0, N={args.n:,}")
    print(f"{'path':<20}{'reference':>12}{'rust':>10}{'ratio':>8}")
    for path in args.paths or PATHS:
        per_call = {}
        for kind in ("reference", "rust"):
            with_calls = counted(path, kind, args.n, calls=True)
            setup = counted(path, kind, args.n, calls=False)
            per_call[kind] = (with_calls - setup) / args.n
        ratio = per_call["reference"] / per_call["rust"]
        print(f"{path:<20}{per_call['reference']:>12,.0f}{per_call['rust']:>10,.0f}{ratio:>7.1f}x")


if __name__ == "__main__":
    main()
