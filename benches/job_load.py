"""How long a job file with a long dependency chain takes to load and check
(issue 15): N tasks, each depending on the one before, through `load_job`
(validation, the core's graph check) and into the local registry, from a
YAML file (PyYAML) and from the same job as JSON (the json module).

    python benches/job_load.py            # N = 100,000
    python benches/job_load.py --quick    # N = 10,000

No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from necrocode_dispatch.job import load_job
from necrocode_dispatch.local import InMemoryTaskRegistry


def chain_job(n: int) -> str:
    lines = ["tasks:", "  - {id: t0, command: 'true'}"]
    lines += [f"  - {{id: t{i}, command: 'true', depends_on: [t{i - 1}]}}" for i in range(1, n)]
    return "\n".join(lines) + "\n"


def time_load(path: Path) -> tuple[float, float]:
    began = time.perf_counter()
    job = load_job(path)
    loaded = time.perf_counter()
    registry = InMemoryTaskRegistry(job.tasks, incremental=True)
    registered = time.perf_counter()
    assert [t.id for t in registry.poll_ready_tasks()] == ["t0"]
    return loaded - began, registered - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10,000")
    n = 10_000 if parser.parse_args().quick else 100_000
    print(f"{n:,}-task chain    load_job (parse, checks, graph)   into the registry   total")
    with tempfile.TemporaryDirectory() as tmp:
        text = chain_job(n)
        for kind, name, content in (
            ("YAML", "chain.yaml", text),
            (
                "JSON",
                "chain.json",
                json.dumps(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))),
            ),
        ):
            path = Path(tmp) / name
            path.write_text(content)
            load, register = time_load(path)
            print(f"{kind:<18}{load:>24.2f} s{register:>19.2f} s{load + register:>9.2f} s")


if __name__ == "__main__":
    main()
