"""`type: ray` pools (issue 17) on a real local Ray cluster: a head and two
worker nodes started here with `ray start --block`, every address given as
loopback (`--node-ip-address=127.0.0.1`), each node in a process group of
its own that the tests stop (or kill) by its process id. The second worker
offers a custom resource `special`; each worker's commands see its name in
`$NODE_LABEL`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not installed: pip install 'necrocode-dispatch[ray]'"
)

from .test_cli import cli_args, events, run_cli, write_job  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")

from .ray_cluster import RAY_ENV, LocalCluster, free_port  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def ray_environment():
    """The CLI runs started here inherit the tests' Ray settings."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under its temp dir.
    root = Path(tempfile.mkdtemp(prefix="nd-ray-", dir="/tmp"))
    made = None
    try:
        made = LocalCluster.start(root)
        yield made
    finally:
        if made is not None:
            made.stop()
        shutil.rmtree(root, ignore_errors=True)


def ray_job(
    tmp_path, cluster, tasks: str, pool: str = "", dispatcher: str = "", limit: int = 3
) -> Path:
    """A job of `tasks` (YAML list items, any common indentation) on one ray
    pool of the cluster."""
    head = (
        f"dispatcher: {{{dispatcher}}}\n"
        "agent_pools:\n"
        f'  cluster: {{type: ray, address: "{cluster.address}", max_concurrency: {limit}{pool}}}\n'
        "tasks:\n"
    )
    items = textwrap.indent(textwrap.dedent(tasks).strip("\n"), "  ")
    return write_job(tmp_path, head + items + "\n")


def node_of(tmp_path, task_id: str, attempt: int = 1, field: int = 0) -> str:
    """What the command echoed first (its node's label) or after."""
    log = tmp_path / "work" / "logs" / f"{task_id}.{attempt}.log"
    return log.read_text().split()[field]


def test_twenty_tasks_spread_over_the_nodes_within_the_pool_limit(tmp_path, cluster):
    tasks = "".join(
        f"- {{id: t{i}, command: 'echo $NODE_LABEL $NECROCODE_NODE_ID; sleep 0.3'}}\n"
        for i in range(20)
    )
    result = run_cli(tmp_path, ray_job(tmp_path, cluster, tasks), "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    outcomes = {r["id"]: r["outcome"] for r in json.loads(result.stdout)["tasks"]}
    assert set(outcomes.values()) == {"done"} and len(outcomes) == 20
    nodes = {node_of(tmp_path, f"t{i}") for i in range(20)}
    assert nodes == {"w1", "w2"}, nodes
    # The Ray node ids the commands ran on, as Ray names them.
    ray_ids = {node_of(tmp_path, f"t{i}", field=1) for i in range(20)}
    assert len(ray_ids) == 2 and all(len(node) == 56 for node in ray_ids), ray_ids
    running = peak = 0
    for event in events(tmp_path):
        running += {"runner_started": 1, "runner_finished": -1}.get(event["event"], 0)
        peak = max(peak, running)
    assert peak == 3, "the pool's limit was reached and never passed"


def test_a_task_needing_a_resource_only_one_node_has_runs_only_there(tmp_path, cluster):
    tasks = "".join(
        f"          - {{id: s{i}, command: 'echo $NODE_LABEL', required_skill: special}}\n"
        for i in range(4)
    )
    job = ray_job(tmp_path, cluster, tasks, pool=", skill_resources: true")
    result = run_cli(tmp_path, job, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {node_of(tmp_path, f"s{i}") for i in range(4)} == {"w2"}


def test_flaky_and_hanging_tasks_are_retried_as_on_local_pools(tmp_path, cluster):
    tasks = """
          - id: flaky
            command: '[ "$NECROCODE_ATTEMPT" -ge 2 ] || {{ echo "flaky: reset" >&2; exit 1; }}'
          - id: hangs
            timeout: 1
            command: >-
              echo $$ > {pids}/$NECROCODE_ATTEMPT;
              [ "$NECROCODE_ATTEMPT" -ge 2 ] || exec sleep 60
    """
    pids = tmp_path / "pids"
    pids.mkdir()
    job = ray_job(
        tmp_path,
        cluster,
        tasks.format(pids=pids).replace("{{", "{").replace("}}", "}"),
        dispatcher="retry: {initial_delay: 0.5, max_attempts: 3}",
    )
    result = run_cli(tmp_path, job, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in json.loads(result.stdout)["tasks"]}
    assert rows["flaky"]["attempts"] == 2
    assert rows["flaky"]["last_failure"] == "exit code 1: flaky: reset"
    assert rows["hangs"]["attempts"] == 2
    assert rows["hangs"]["last_failure"] == "timeout after 1 s"
    # The retry waited for its backoff: the second run was reported started
    # after the due time the core gave with the failure (an ordering the core
    # guarantees, not a measured margin).
    history = rows["flaky"]["history"]
    due = next(c["metadata"]["next_retry_at"] for c in history if c["state"] == "ready")
    second = [c["at"] for c in history if c["state"] == "running"][1]
    assert datetime.fromisoformat(second) >= datetime.fromisoformat(due)
    # The hanging command was killed on its node.
    hung = int((pids / "1").read_text())
    assert not process_alive(hung)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_worker_node_dying_fails_its_tasks_which_are_retried_elsewhere(tmp_path, cluster):
    marks = tmp_path / "marks"
    marks.mkdir()
    tasks = "".join(
        f"          - {{id: n{i}, command: 'echo $NODE_LABEL; echo start $NECROCODE_ATTEMPT "
        f"$(date +%s.%N) >> {marks}/n{i}; sleep 4; echo end $(date +%s.%N) >> {marks}/n{i}'}}\n"
        for i in range(4)
    )
    # Four tasks on four CPUs: both nodes run two.
    job = ray_job(tmp_path, cluster, tasks, dispatcher="retry: {initial_delay: 0.2}", limit=4)
    run = subprocess.Popen(
        cli_args(tmp_path, job, "--quiet", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 4:
            assert time.monotonic() < deadline, "the tasks never started"
            time.sleep(0.1)
        cluster.kill("w1")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
        cluster.start_worker("w1")
    assert run.returncode == 0, err
    assert out.lstrip().startswith("{"), (out[:2000], err[-2000:])
    rows = {r["id"]: r for r in json.loads(out)["tasks"]}
    died = [r for r in rows.values() if (r["last_failure"] or "").startswith("node died")]
    assert died, f"no task ran on the killed node: {rows}"
    for row in rows.values():
        assert row["outcome"] == "done"
    for task in rows:
        lines = (marks / task).read_text().split("\n")
        # Each attempt's run ended (or was killed) before the next began.
        starts = [float(line.split()[2]) for line in lines if line.startswith("start")]
        ends = [float(line.split()[1]) for line in lines if line.startswith("end")]
        assert len(ends) == 1 and ends[0] >= starts[-1]
        assert all(s <= starts[-1] for s in starts)
    cluster.wait_for_nodes(3)


def test_ctrl_c_cancels_the_ray_tasks(tmp_path, cluster):
    pids = tmp_path / "pids"
    pids.mkdir()
    tasks = "".join(
        f"          - {{id: h{i}, command: 'echo $$ > {pids}/h{i}; exec sleep 60'}}\n"
        for i in range(3)
    )
    job = ray_job(tmp_path, cluster, tasks)
    run = subprocess.Popen(cli_args(tmp_path, job, "--quiet"), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # Whole lines: each shell opens its file before it writes.
        while sum(p.read_text().endswith("\n") for p in pids.iterdir()) < 3:
            assert time.monotonic() < deadline, "the tasks never started"
            time.sleep(0.1)
        time.sleep(0.3)
        run.send_signal(signal.SIGINT)
        assert run.wait(60) == 130
    finally:
        if run.poll() is None:
            run.kill()
    commands = [int(p.read_text()) for p in pids.iterdir()]
    deadline = time.monotonic() + 15
    while any(process_alive(pid) for pid in commands) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in commands), "a Ray task kept running"


def test_an_unreachable_address_is_refused_before_anything_runs(tmp_path):
    port = free_port()
    job = write_job(
        tmp_path,
        f"""
        agent_pools:
          far: {{type: ray, address: "127.0.0.1:{port}"}}
        tasks:
          - {{id: a, command: "touch MARKER"}}
        """,
    )
    result = run_cli(tmp_path, job)
    assert result.returncode == 2
    assert f"agent_pools.far.address: cannot reach Ray at '127.0.0.1:{port}'" in result.stderr
    assert not list(tmp_path.rglob("MARKER"))


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ("{type: ray, address: 'nowhere'}", "agent_pools.p.address: expected 'auto'"),
        ("{type: ray, num_cpus: -1}", "agent_pools.p.num_cpus: must be >= 0"),
        ("{type: ray, resources: {gpu: 0}}", "agent_pools.p.resources.gpu: must be > 0"),
        ("{type: ray, skill_resources: maybe}", "agent_pools.p.skill_resources: must be true"),
        ("{type: ray, adress: 'x:1'}", "agent_pools.p: unknown key 'adress'"),
    ],
)
def test_bad_ray_pool_values_are_refused_naming_the_field(tmp_path, pool, message):
    job = write_job(tmp_path, f"agent_pools:\n  p: {pool}\ntasks:\n  - {{id: a, command: x}}\n")
    result = run_cli(tmp_path, job)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_ray_pool_without_an_address_runs_on_a_local_ray_started_for_the_run(tmp_path):
    job = write_job(
        tmp_path,
        """
        agent_pools:
          here: {type: ray, max_concurrency: 2, num_cpus: 0.5}
        tasks:
          - {id: a, command: 'echo $NECROCODE_NODE_ID'}
          - {id: b, command: 'echo $NECROCODE_NODE_ID', depends_on: [a]}
        """,
    )
    result = subprocess.run(
        cli_args(tmp_path, job, "--quiet"), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    logs = tmp_path / "work" / "logs"
    nodes = {(logs / f"{t}.1.log").read_text().strip() for t in ("a", "b")}
    assert len(nodes) == 1 and len(nodes.pop()) == 56


def test_a_task_no_node_can_run_fails_instead_of_waiting_for_ever(tmp_path, cluster):
    tasks = """
        - {id: ok, command: 'true'}
        - {id: nowhere, command: 'true', required_skill: quantum}
    """
    job = ray_job(
        tmp_path,
        cluster,
        tasks,
        pool=", skill_resources: true",
        dispatcher="retry: {initial_delay: 0.05, max_attempts: 2}",
    )
    result = run_cli(tmp_path, job, "--json", timeout=120)
    assert result.returncode == 1, result.stderr
    rows = {r["id"]: r for r in json.loads(result.stdout)["tasks"]}
    assert rows["ok"]["outcome"] == "done"
    assert rows["nowhere"]["outcome"] == "failed"
    assert "no node of the Ray cluster offers 0.001 quantum" in rows["nowhere"]["last_failure"]
