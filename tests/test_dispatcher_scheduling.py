"""Scheduling per policy (SPEC §4.4): order, pool choice by skill and load,
and the pool and global limits within one pass."""

from datetime import datetime, timedelta

import pytest

from necrocode_dispatch import PoolNotFoundError, SchedulingPolicy

from .fakes import build, make_task

DAY = datetime(2025, 1, 1)


def aged(task_id, minutes, **kw):
    return make_task(task_id, created_at=DAY + timedelta(minutes=minutes), **kw)


def finish_all(dispatcher, ports):
    for launch in ports.launcher.launches:
        dispatcher.handle_runner_completion(launch.runner_id, success=True)


def test_priority_order_with_fifo_tie_break():
    tasks = [
        aged("low-old", 0, priority=1),
        aged("high-new", 3, priority=5),
        aged("high-old", 2, priority=5),
        aged("mid", 1, priority=3),
    ]
    dispatcher, ports = build(tasks, pools=(("one", 1),))
    for _ in tasks:
        dispatcher.tick()
        finish_all(dispatcher, ports)
    assert ports.launcher.order() == ["high-old", "high-new", "mid", "low-old"]


def test_fifo_takes_the_oldest_first_whatever_the_priority():
    tasks = [aged("b", 2, priority=9), aged("a", 1, priority=0), aged("c", 3, priority=5)]
    dispatcher, ports = build(tasks, pools=(("one", 1),), policy=SchedulingPolicy.FIFO)
    for _ in tasks:
        dispatcher.tick()
        finish_all(dispatcher, ports)
    assert ports.launcher.order() == ["a", "b", "c"]


@pytest.mark.parametrize("policy", list(SchedulingPolicy))
def test_a_full_pool_does_not_block_tasks_for_other_pools(policy):
    tasks = [
        aged("ml-1", 0, priority=9, skill="ml"),
        aged("ml-2", 1, priority=9, skill="ml"),
        aged("web-1", 2, priority=1, skill="web"),
    ]
    dispatcher, ports = build(
        tasks,
        pools=(("gpu", 1), ("cpu", 2)),
        skill_mapping={"ml": ["gpu"], "web": ["cpu"]},
        policy=policy,
    )
    dispatcher.tick()
    assert sorted(ports.launcher.order()) == ["ml-1", "web-1"]
    assert dispatcher.get_queued_task_ids() == ["ml-2"]


@pytest.mark.parametrize("policy", list(SchedulingPolicy))
def test_a_pool_never_exceeds_max_concurrency_within_one_tick(policy):
    tasks = [aged(f"t{i}", i, spec=f"spec-{i % 3}") for i in range(20)]
    dispatcher, ports = build(tasks, pools=(("small", 3),), global_limit=50, policy=policy)
    result = dispatcher.tick()
    assert result["assigned"] == 3
    # The pass reserved all three places before the first launch, and no more.
    assert [launch.pool_running for launch in ports.launcher.launches] == [3, 3, 3]
    status = dispatcher.get_status()
    assert status["pool_statuses"][0]["current_running"] == 3
    assert status["queue_size"] == 17
    dispatcher._check_invariants()


def test_the_global_limit_holds_across_pools():
    tasks = [aged(f"t{i}", i) for i in range(10)]
    dispatcher, ports = build(tasks, pools=(("a", 5), ("b", 5)), global_limit=4)
    assert dispatcher.tick()["assigned"] == 4
    assert dispatcher.get_global_running_count() == 4
    assert dispatcher.can_accept_task_globally() is False
    assert dispatcher.tick()["assigned"] == 0
    finish_all(dispatcher, ports)
    assert dispatcher.tick()["assigned"] == 4


def test_skill_routing_with_default_fallback_and_least_loaded_choice():
    tasks = [
        aged("py-1", 0, skill="python"),
        aged("py-2", 1, skill="python"),
        aged("py-3", 2, skill="python"),
        aged("rust-1", 3, skill="rust"),  # no mapping: default
        aged("plain", 4),  # no skill: default
    ]
    dispatcher, ports = build(
        tasks,
        pools=(("py-a", 2), ("py-b", 4), ("general", 5), ("unused", 5)),
        skill_mapping={"python": ["py-a", "py-b"], "default": ["general"]},
        policy=SchedulingPolicy.SKILL_BASED,
    )
    dispatcher.tick()
    pools = {launch.task_id: launch.pool for launch in ports.launcher.launches}
    # py-1: both empty, configuration order -> py-a (1/2); py-2: py-b (0/4) is
    # less loaded; py-3: py-b at 1/4 beats py-a at 1/2.
    assert pools == {
        "py-1": "py-a",
        "py-2": "py-b",
        "py-3": "py-b",
        "rust-1": "general",
        "plain": "general",
    }


def test_without_any_mapping_the_least_loaded_enabled_pool_serves():
    dispatcher, ports = build([aged(f"t{i}", i) for i in range(4)], pools=(("a", 2), ("b", 2)))
    dispatcher.disable_pool("b")
    dispatcher.tick()
    assert {launch.pool for launch in ports.launcher.launches} == {"a"}
    assert dispatcher.get_queued_task_ids() == ["t2", "t3"]


def test_fair_share_alternates_between_specs():
    tasks = [aged(f"a{i}", i, spec="alpha") for i in range(4)] + [
        aged(f"b{i}", 10 + i, spec="beta") for i in range(2)
    ]
    dispatcher, ports = build(tasks, pools=(("one", 1),), policy=SchedulingPolicy.FAIR_SHARE)
    for _ in tasks:
        dispatcher.tick()
        finish_all(dispatcher, ports)
    assert ports.launcher.order() == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_fair_share_within_one_pass():
    tasks = [aged(f"a{i}", i, spec="alpha") for i in range(3)] + [
        aged("b0", 10, spec="beta"),
        aged("c0", 20, spec="gamma"),
    ]
    dispatcher, ports = build(tasks, pools=(("big", 4),), policy=SchedulingPolicy.FAIR_SHARE)
    dispatcher.tick()
    assert ports.launcher.order() == ["a0", "b0", "c0", "a1"]


def test_a_skill_mapping_naming_an_unknown_pool_is_refused():
    with pytest.raises(PoolNotFoundError, match=r"skill_mapping\[.ml.\].*gpu"):
        build(pools=(("cpu", 1),), skill_mapping={"ml": ["gpu"]})


@pytest.mark.parametrize("bad", ["lifo", 3, None.__class__])
def test_a_bad_policy_is_refused_without_change(bad):
    dispatcher, _ = build()
    with pytest.raises((ValueError, TypeError), match="policy"):
        dispatcher.set_scheduling_policy(bad)
    assert dispatcher.get_status()["scheduling_policy"] == "priority"


def test_reassigning_the_config_changes_policy_and_mapping():
    dispatcher, ports = build(
        [aged("x", 0, skill="ml")], pools=(("gpu", 1), ("cpu", 1)), skill_mapping={"ml": ["gpu"]}
    )
    config = ports.config
    config.skill_mapping = {"ml": ["cpu"]}
    config.scheduling_policy = SchedulingPolicy.FIFO
    dispatcher.config = config
    assert dispatcher.get_status()["scheduling_policy"] == "fifo"
    dispatcher.tick()
    assert ports.launcher.launches[0].pool == "cpu"
