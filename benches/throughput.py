"""The main job's throughput against a plain process runner (SPEC §6, issue 14):
N tasks `true` through `necrocode-dispatch run` with one pool of 16, with and
without `--state`, against `xargs -P16` on the same commands. The two sides'
samples alternate; the median of each is reported, with tasks/s, the CPU
seconds the run took with every process it started, and ratios.

    python benches/throughput.py            # N = 2,000 and 10,000, 3 samples each
    python benches/throughput.py --quick    # N = 500, 1 sample

The CLI runs with its bytecode cached, as an installed package has it: a
machine that sets PYTHONDONTWRITEBYTECODE (this one does) would otherwise
compile the package's sources on every start of an editable install, about
50 ms a run that no pip-installed user pays. One untimed run fills the cache.

No timing is asserted; the targets are printed beside the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def job_file(directory: Path, n: int) -> Path:
    lines = [
        "dispatcher:",
        "  max_global_concurrency: 16",
        "agent_pools:",
        "  local: {type: local-process, max_concurrency: 16}",
        "tasks:",
    ]
    lines += [f"  - {{id: t{i:05}, command: 'true'}}" for i in range(n)]
    path = directory / f"job-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str], **kwargs) -> tuple[float, float]:
    """Wall seconds, and CPU seconds (user + system) of the run with every
    process it started (the commands included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cli(job: Path, work: Path, state: bool, env: dict[str, str]) -> tuple[float, float]:
    command = [sys.executable, "-m", "necrocode_dispatch", "run", str(job), "--quiet"]
    command += ["--workdir", str(work)]
    if state:
        command += ["--state", str(work / "state.json")]
    return timed(command, stdout=subprocess.DEVNULL, env=env)


def with_bytecode_cache(root: Path) -> dict[str, str]:
    """The environment for the CLI's runs: bytecode written to and read from
    a cache of the benchmark's own, filled here by one untimed run."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(root / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cli(job_file(root, 1), root / "warm-up", state=True, env=env)
    return env


def xargs(n: int) -> tuple[float, float]:
    return timed(
        ["xargs", "-P16", "-I{}", "sh", "-c", "true"],
        input="\n".join(map(str, range(n))).encode(),
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 500, one sample")
    args = parser.parse_args()
    sizes, samples = ([500], 1) if args.quick else ([2_000, 10_000], 3)
    header = f"{'tasks':>7}  {'runner':<22} {'seconds':>8} {'tasks/s':>9} {'cpu s':>7}"
    print(f"{header} {'vs xargs':>9}  target")
    with tempfile.TemporaryDirectory(prefix="necrocode-throughput-") as tmp:
        root = Path(tmp)
        env = with_bytecode_cache(root)
        for n in sizes:
            job = job_file(root, n)
            times: dict[str, list[tuple[float, float]]] = {
                "xargs -P16": [],
                "cli": [],
                "cli --state": [],
            }
            for sample in range(samples):
                # Alternate the sides so that a slow moment hits all of them.
                times["xargs -P16"].append(xargs(n))
                times["cli"].append(cli(job, root / f"w-{n}-{sample}", state=False, env=env))
                times["cli --state"].append(cli(job, root / f"s-{n}-{sample}", state=True, env=env))
            base = statistics.median(wall for wall, _ in times["xargs -P16"])
            plain = statistics.median(wall for wall, _ in times["cli"])
            for name, values in times.items():
                seconds = statistics.median(wall for wall, _ in values)
                used = statistics.median(cpu for _, cpu in values)
                ratio = base / seconds
                target = {"cli": ">= 0.8x", "cli --state": "<= 1.3x the cli's time"}.get(name, "")
                if name == "cli --state":
                    target += f" ({seconds / plain:.2f}x)"
                rate = n / seconds
                row = f"{n:>7,}  {name:<22} {seconds:>8.2f} {rate:>9.0f} {used:>7.2f}"
                print(f"{row} {ratio:>8.2f}x  {target}")


if __name__ == "__main__":
    main()
