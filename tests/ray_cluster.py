"""A local Ray cluster for the tests and the benchmark: a head without CPUs
and two worker nodes (`w1`, and `w2` offering a custom resource `special`),
each started with `ray start --block` in a process group of its own and
stopped (or killed) by its process id, every address given as loopback.
Each worker's commands see its name in `$NODE_LABEL`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


#: For every Ray process of the tests, the cluster's and the CLI's: no usage
#: reports, and no token authentication (Ray 2.60 turns it on, and writes
#: ~/.ray/auth_token, for a local instance; a cluster and its drivers must agree).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


class LocalCluster:
    """A head without CPUs (nothing runs there) and two worker nodes."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, **RAY_ENV)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, dict | None] = {}
        self.common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        try:
            self._start_all()
        except BaseException:
            self.stop()  # what did start does not outlive a failed start
            raise

    @classmethod
    def start(cls, root: Path, attempts: int = 2) -> LocalCluster:
        """A cluster under `root`. A start that fails is tried again from
        nothing, on a new port: on a loaded machine Ray's GCS can miss its
        own start-up deadline (seen once in the tests, right after another
        cluster was torn down)."""
        for attempt in range(1, attempts + 1):
            try:
                return cls(root / f"try{attempt}")
            except (AssertionError, OSError, subprocess.SubprocessError) as failure:
                if attempt == attempts:
                    raise
                print(f"Ray cluster start {attempt} failed ({failure}); again", file=sys.stderr)
        raise AssertionError("attempts must be at least 1")

    def _start_all(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                f"--temp-dir={self.root}",
                *self.common,
            ],
        )
        deadline = time.monotonic() + 60
        while not answers(self.port):
            assert self.nodes["head"].poll() is None, "the head node did not start"
            assert time.monotonic() < deadline, "the head node never answered"
            time.sleep(0.2)
        self.start_worker("w1")
        self.start_worker("w2", resources={"special": 1})
        self.wait_for_nodes(3)

    def _start(self, name: str, args: list[str], env: dict | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", *args],
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by its pid
        )

    def start_worker(self, name: str, resources: dict | None = None) -> None:
        args = [f"--address={self.address}", "--num-cpus=2", *self.common]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self.workers[name] = resources
        self._start(name, args, dict(self.env, NODE_LABEL=name))

    def alive_nodes(self) -> int:
        probe = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR',"
            " log_to_driver=False);"
            " print('alive nodes:', sum(1 for n in ray.nodes() if n['Alive']))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        # Ray's own processes may write log lines to the same stdout, before
        # or after the count (seen: a raylet's "Job ... already started").
        counts = [
            int(line.split(":", 1)[1])
            for line in out.stdout.splitlines()
            if line.startswith("alive nodes:")
        ]
        return counts[-1] if out.returncode == 0 and counts else 0

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + 90
        while self.alive_nodes() < count:
            assert time.monotonic() < deadline, f"fewer than {count} nodes came up"
            # A worker that gave up (it came before the head was ready) goes again.
            for name, resources in self.workers.items():
                node = self.nodes.get(name)
                if node is not None and node.poll() is not None:
                    self.start_worker(name, resources)
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """The node dies at once: SIGKILL to its whole process group."""
        process = self.nodes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(30)

    def stop(self) -> None:
        """Every node at once, by its process group (a test cluster has
        nothing to drain)."""
        for name in list(self.nodes):
            self.kill(name)
