"""start()/stop() under pressure, interpreter exit, fork, Ctrl-C and config
values checked up front: issue 12, findings 1, 4, 5 and 6."""

import gc
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest

from necrocode_dispatch import DispatcherConfig, DispatcherCore, SystemClock, TaskState

from .fakes import build, make_task

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs fork and signals")


def wait_for(condition, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def loop_threads():
    return [t for t in threading.enumerate() if t.name == "necrocode-dispatch-loop"]


# -- finding 1: exit with loops running ---------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from necrocode_dispatch import DispatcherCore

    class SleepySource:
        def poll_ready_tasks(self):
            time.sleep(0.2)  # the loop is inside a port, GIL released
            return []

    dispatchers = []
    for _ in range(int(sys.argv[1])):
        d = DispatcherCore(task_source=SleepySource())
        d.config.poll_interval = 0.001
        d.start()
        dispatchers.append(d)
    time.sleep(0.05)
    """
)


@pytest.mark.parametrize(("dispatchers", "runs"), [(1, 30), (5, 10)])
def test_exiting_with_loops_inside_a_sleeping_port_exits_0(tmp_path, dispatchers, runs):
    script = tmp_path / "exit_with_loop.py"
    script.write_text(EXIT_SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(dispatchers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(runs)
    ]
    results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0] * runs, [e for _, e in results if e][:1]


def test_a_dropped_running_dispatcher_stops_its_loop():
    polls = []
    source = SimpleNamespace(poll_ready_tasks=lambda: polls.append(1) or [])
    before = len(loop_threads())
    dispatcher = DispatcherCore(DispatcherConfig(poll_interval=0.005), task_source=source)
    dispatcher.start()
    assert wait_for(lambda: len(polls) > 2)
    del dispatcher
    gc.collect()
    assert wait_for(lambda: len(loop_threads()) == before)
    seen = len(polls)
    time.sleep(0.05)
    assert len(polls) == seen


@posix_only
def test_a_forked_child_holds_a_stopped_dispatcher_with_free_locks():
    dispatcher, _ = build(
        [make_task(f"t{i}") for i in range(3)], clock=SystemClock(), poll_interval=0.001
    )
    dispatcher.start()
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:  # the child: report through the exit code
                code = 0
                try:
                    if dispatcher.running:
                        code = 3
                    dispatcher.get_status()
                    dispatcher.tick()
                    dispatcher.stop(timeout=0)
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        dispatcher.stop(timeout=0)


_FORK_AT_FIRST_TICK = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.fakes import build, make_task
from necrocode_dispatch import SystemClock

dispatcher, _ = build(
    [make_task(f"t{i}") for i in range(3)], clock=SystemClock(), poll_interval=0.0005
)
dispatcher.start()
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        try:
            dispatcher.get_status()
            dispatcher.tick()
            dispatcher.stop(timeout=0)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("a forked child hung")
            os._exit(1)
        time.sleep(0.001)
dispatcher.stop(timeout=0)
print("ok")
"""


@posix_only
def test_a_fork_while_the_loop_makes_its_names_leaves_a_working_child():
    """In a fresh interpreter every name the core interns is made on first use,
    often by the loop thread; a fork taken meanwhile must not leave the child
    waiting for a name whose maker it does not have (it did, one run in four)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, "-c", _FORK_AT_FIRST_TICK, root],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


# -- finding 5: start() and stop() from several threads ---------------------------------


def test_start_during_stop_waits_and_ends_running():
    dispatcher, ports = build(
        [make_task("a")], clock=SystemClock(), poll_interval=0.005, heartbeat_timeout=600
    )
    dispatcher.start()
    assert wait_for(lambda: ports.launcher.launches)
    stopping = threading.Thread(target=dispatcher.stop, kwargs={"timeout": 0.3})
    stopping.start()
    assert wait_for(lambda: not dispatcher.running)
    dispatcher.start()  # waits for the stop to end, then starts
    stopping.join()
    try:
        assert dispatcher.running
        assert len(loop_threads()) >= 1
        ports.registry.add(make_task("b"))
        assert wait_for(lambda: "b" in [launch.task_id for launch in ports.launcher.launches])
    finally:
        dispatcher.stop(timeout=0)
    assert not dispatcher.running


def test_every_concurrent_stop_returns_only_once_stopped():
    dispatcher, ports = build(
        [make_task("a")], clock=SystemClock(), poll_interval=0.005, heartbeat_timeout=600
    )
    dispatcher.start()
    assert wait_for(lambda: ports.launcher.launches)
    runner = ports.launcher.launches[0].runner_id
    threading.Timer(
        0.3, lambda: dispatcher.handle_runner_completion(runner, task_id="a", success=True)
    ).start()
    seen = []

    def stop():
        dispatcher.stop(timeout=10)
        seen.append((dispatcher.running, dispatcher.get_global_running_count()))

    threads = [threading.Thread(target=stop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert seen == [(False, 0)] * 4
    assert ports.registry.states["a"] is TaskState.DONE


# -- finding 4: Ctrl-C and SystemExit ------------------------------------------------


def test_ctrl_c_in_launch_reaches_the_caller_and_the_task_is_not_failed():
    dispatcher, ports = build([make_task("a"), make_task("b")])

    def launch(task, slot, pool):
        raise KeyboardInterrupt

    ports.launcher.launch = launch
    with pytest.raises(KeyboardInterrupt):
        dispatcher.tick()
    assert dispatcher.retry_manager.get_retry_count("a") == 0
    assert sorted(dispatcher.get_queued_task_ids()) == ["a", "b"]
    assert dispatcher.get_global_running_count() == 0
    assert ports.slots.each_released_once()
    assert ports.registry.history["a"] == []
    dispatcher._check_invariants()


def test_system_exit_in_a_registry_update_reaches_the_caller_and_is_delivered_later():
    dispatcher, ports = build([make_task("a")])
    exit_once = [True]
    update = ports.registry.update_task_state

    def update_task_state(**kwargs):
        if exit_once.pop() if exit_once else False:
            raise SystemExit(3)
        update(**kwargs)

    ports.registry.update_task_state = update_task_state
    with pytest.raises(SystemExit):
        dispatcher.tick()
    assert dispatcher.get_task_place("a") == "running"
    assert dispatcher.get_status()["pending_reports"] > 0
    ports.clock.advance(1)
    dispatcher.tick()
    assert ports.registry.states["a"] is TaskState.RUNNING
    assert dispatcher.get_status()["pending_reports"] == 0


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as Ctrl-C at a terminal does, even in
    a process started in the background by a shell without job control
    (which inherits SIGINT ignored, and Python then keeps it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@posix_only
def test_ctrl_c_during_stop_forces_the_runners_and_reaches_the_caller(ctrl_c_raises):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    dispatcher, ports = build(
        [make_task("a")], clock=SystemClock(), poll_interval=0.005, heartbeat_timeout=600
    )
    dispatcher.start()
    assert wait_for(lambda: ports.launcher.launches)
    runner = ports.launcher.launches[0].runner_id
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        dispatcher.stop(timeout=30)
    assert time.monotonic() - began < 5
    assert ports.launcher.stopped == [runner]
    assert ports.slots.each_released_once()
    assert ports.registry.history["a"][-1][1] == {"interrupted": True}
    assert not dispatcher.running
    assert dispatcher.get_global_running_count() == 0


# -- finding 6: config values checked up front ----------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("graceful_shutdown_timeout", math.nan, ValueError),
        ("graceful_shutdown_timeout", -1, ValueError),
        ("graceful_shutdown_timeout", "10", TypeError),
        ("poll_interval", -1, ValueError),
        ("poll_interval", math.nan, ValueError),
        ("poll_interval", 0, ValueError),
        ("poll_interval", True, TypeError),
        ("heartbeat_timeout", math.inf, ValueError),
        ("max_global_concurrency", 0, ValueError),
        ("retry_max_attempts", 2.5, TypeError),
    ],
)
def test_a_bad_config_value_is_refused_where_it_is_set(field, value, error):
    with pytest.raises(error, match=field):
        DispatcherConfig(**{field: value})
    config = DispatcherConfig()
    with pytest.raises(error, match=field):
        setattr(config, field, value)
    assert getattr(config, field) == getattr(DispatcherConfig(), field)


@pytest.mark.parametrize(
    ("field", "value"), [("poll_interval", 0), ("graceful_shutdown_timeout", -1)]
)
def test_the_core_refuses_a_foreign_config_with_a_bad_value(field, value):
    config = SimpleNamespace(**{field: value})
    with pytest.raises(ValueError, match=f"config.{field}"):
        DispatcherCore(config)
    dispatcher = DispatcherCore()
    with pytest.raises(ValueError, match=f"config.{field}"):
        dispatcher.config = config
