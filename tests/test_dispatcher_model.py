"""The dispatcher against a small Python model (issue 12, acceptance 3):
Hypothesis drives tasks, ticks, completions, failures, heartbeats, timeouts,
clock advances, stale reports and a registry that goes down, and after every
step the dispatcher must agree with the model and with SPEC §4.5."""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from necrocode_dispatch import TaskState

from .fakes import Registry, build, make_task

MAX_ATTEMPTS = 3
INITIAL_DELAY = 1.0
HEARTBEAT_TIMEOUT = 20.0
#: Longer than any redelivery backoff (SPEC §9; the outbox caps it at 5 s).
REDELIVERY_WAIT = 6.0


class DownableRegistry(Registry):
    """A registry that refuses every update while `down` (a port failure)."""

    down = False

    def update_task_state(self, spec_name, task_id, new_state, metadata):
        if self.down:
            raise ConnectionError("registry down")
        super().update_task_state(spec_name, task_id, new_state, metadata)


class DispatcherModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.dispatcher, self.ports = build(
            pools=(("local", 2), ("docker", 1)),
            global_limit=2,
            retry_max_attempts=MAX_ATTEMPTS,
            retry_initial_delay=INITIAL_DELAY,
            retry_backoff_base=2.0,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
        )
        self.registry = DownableRegistry()
        self.dispatcher.task_source = self.dispatcher.task_registry = self.registry
        self.clock = self.ports.clock
        self.seen_launches = 0
        self.live: dict[str, str] = {}  # runner -> task
        self.last_heartbeat: dict[str, float] = {}
        self.finished: dict[str, str] = {}  # runner -> task, outcome applied
        self.failures: dict[str, int] = {}
        self.due: dict[str, float] = {}
        self.outcome: dict[str, str] = {}
        self.tasks = 0

    # -- the model's bookkeeping ------------------------------------------------

    def now(self) -> float:
        return self.clock.monotonic()

    def fail(self, runner: str) -> None:
        task = self.live.pop(runner)
        self.finished[runner] = task
        count = self.failures.get(task, 0) + 1
        self.failures[task] = count
        if count >= MAX_ATTEMPTS:
            self.outcome[task] = "failed"
        else:
            self.due[task] = self.now() + INITIAL_DELAY * 2.0 ** (count - 1)

    def take_new_launches(self) -> None:
        launches = self.ports.launcher.launches
        for launch in launches[self.seen_launches :]:
            assert launch.task_id not in self.outcome, f"{launch.task_id} ran after it finished"
            assert launch.task_id not in self.live.values(), f"{launch.task_id} runs twice"
            assert launch.at >= self.due.get(launch.task_id, float("-inf")), "before its backoff"
            self.live[launch.runner_id] = launch.task_id
            self.last_heartbeat[launch.runner_id] = self.now()
        self.seen_launches = len(launches)

    def silent(self) -> list[str]:
        return [
            r for r in self.live if self.now() - self.last_heartbeat[r] > HEARTBEAT_TIMEOUT + 1e-9
        ]

    # -- rules ------------------------------------------------------------------

    @rule()
    def add_task(self):
        self.tasks += 1
        self.registry.add(make_task(f"t{self.tasks}", spec=f"spec-{self.tasks % 2}"))

    @rule()
    def tick(self):
        silent_before = self.silent()
        counts = self.dispatcher.tick()
        self.take_new_launches()
        assert counts["timed_out"] == len(silent_before)
        for runner in silent_before:
            self.fail(runner)

    @rule()
    def check_heartbeats(self):
        silent = self.silent()
        assert self.dispatcher.check_heartbeats() == len(silent)
        for runner in silent:
            self.fail(runner)

    @rule(seconds=st.sampled_from([0.25, 1.0, 2.5, 7.0, HEARTBEAT_TIMEOUT + 1]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), success=st.booleans())
    def complete(self, data, success):
        runner = data.draw(st.sampled_from(sorted(self.live)))
        task = self.live[runner]
        applied = self.dispatcher.handle_runner_completion(
            runner, task_id=task, success=success, failure_reason=None if success else "exit 1"
        )
        assert applied is True
        if success:
            self.live.pop(runner)
            self.finished[runner] = task
            self.outcome[task] = "done"
        else:
            self.fail(runner)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fail_task(self, data):
        runner = data.draw(st.sampled_from(sorted(self.live)))
        task = self.live[runner]
        assert self.dispatcher.handle_task_failure(task, None, "crashed", runner_id=runner)
        self.fail(runner)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def heartbeat(self, data):
        runner = data.draw(st.sampled_from(sorted(self.live)))
        assert self.dispatcher.update_heartbeat(runner) is True
        self.last_heartbeat[runner] = self.now()

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), success=st.booleans())
    def stale_report(self, data, success):
        runner = data.draw(st.sampled_from(sorted(self.finished)))
        task = self.finished[runner]
        assert (
            self.dispatcher.handle_runner_completion(runner, task_id=task, success=success) is False
        )
        assert self.dispatcher.handle_task_failure(task, None, "late", runner_id=runner) is False
        assert self.dispatcher.update_heartbeat(runner) is False
        if task in self.outcome:
            assert self.dispatcher.handle_task_failure(task, None, "late") is False

    @rule(down=st.booleans())
    def registry_availability(self, down):
        self.registry.down = down

    @rule()
    def recover(self):
        """The registry comes back: after the redelivery backoff every
        pending report lands and the registry agrees with the model."""
        self.registry.down = False
        self.clock.advance(REDELIVERY_WAIT)
        self.tick()
        assert self.dispatcher.get_status()["pending_reports"] == 0
        for task, outcome in self.outcome.items():
            expected = TaskState.DONE if outcome == "done" else TaskState.FAILED
            assert self.registry.states[task] is expected, (task, self.registry.history[task])
        for task in self.live.values():
            assert self.registry.states[task] is TaskState.RUNNING

    # -- invariants -------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        if not hasattr(self, "dispatcher"):
            return
        self.dispatcher._check_invariants()
        assert self.dispatcher.get_global_running_count() == len(self.live)
        for pool in self.dispatcher.get_status()["pool_statuses"]:
            assert 0 <= pool["current_running"] <= pool["max_concurrency"]
        manager = self.dispatcher.retry_manager
        for task, count in self.failures.items():
            if task not in self.outcome:
                assert manager.get_retry_count(task) == count, task
        for task in self.outcome:
            assert self.dispatcher.get_task_place(task) is None
        # Each slot is released once, and only after its runner finished.
        released = self.ports.slots.released
        assert all(n == 1 for n in released.values())


DispatcherModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("NECROCODE_MODEL_EXAMPLES", "500")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_dispatcher_agrees_with_its_model = DispatcherModel.TestCase
