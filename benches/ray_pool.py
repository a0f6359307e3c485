"""What a Ray pool costs against a local pool (issue 17): N tasks `true`
through `necrocode-dispatch run`, once on a `type: ray` pool of a local
two-worker Ray cluster (started here, as the tests start it) and once on a
`local-process` pool, each with 4 at a time. Reports both; no target, no
assertion: it tells a user what sending each command through Ray costs.

    python benches/ray_pool.py            # N = 500
    python benches/ray_pool.py --quick    # N = 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ray_cluster import RAY_ENV, LocalCluster


def run(job: Path, work: Path) -> float:
    began = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "necrocode_dispatch",
            "run",
            str(job),
            "--quiet",
            "--workdir",
            str(work),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - began


def job(directory: Path, n: int, pool: str) -> Path:
    path = directory / f"job-{abs(hash(pool))}.yaml"
    lines = ["agent_pools:", f"  p: {pool}", "tasks:"]
    lines += [f"  - {{id: t{i:04}, command: 'true'}}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 100")
    n = 100 if parser.parse_args().quick else 500
    try:
        import ray  # noqa: F401
    except ImportError:
        print("ray is not installed (pip install 'necrocode-dispatch[ray]'): skipped")
        return
    os.environ.update(RAY_ENV)  # the CLI runs below inherit the cluster's settings
    root = Path(tempfile.mkdtemp(prefix="nd-ray-", dir="/tmp"))
    cluster = None
    try:
        cluster = LocalCluster.start(root)
        ray_pool = f'{{type: ray, address: "{cluster.address}", max_concurrency: 4}}'
        local_pool = "{type: local-process, max_concurrency: 4}"
        rows = []
        for name, pool in (("local pool", local_pool), ("ray pool (2 nodes)", ray_pool)):
            seconds = run(job(root, n, pool), root / name.split()[0])
            rows.append((name, seconds))
        print(f"{'tasks':>7}  {'pool':<20}{'seconds':>9}{'tasks/s':>10}")
        for name, seconds in rows:
            print(f"{n:>7,}  {name:<20}{seconds:>9.2f}{n / seconds:>10.0f}")
        print(f"a task through Ray costs {rows[1][1] / rows[0][1]:.1f}x a local one here")
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
