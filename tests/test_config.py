"""DispatcherConfig defaults and the original YAML layout."""

import textwrap

from necrocode_dispatch import DispatcherConfig, DispatcherCore, PoolType, SchedulingPolicy


def test_defaults_are_the_originals_and_construct_a_dispatcher():
    config = DispatcherConfig()
    assert (config.poll_interval, config.max_global_concurrency, config.heartbeat_timeout) == (
        5,
        10,
        60,
    )
    assert config.scheduling_policy is SchedulingPolicy.PRIORITY
    assert (config.retry_max_attempts, config.retry_backoff_base) == (3, 2.0)
    assert (config.retry_initial_delay, config.retry_max_delay) == (1.0, 300.0)
    assert config.agent_pools == [] and config.skill_mapping == {}
    DispatcherCore(config)  # the original crashed here


def test_from_yaml_reads_nested_retry_pools_by_name_and_skills(tmp_path):
    path = tmp_path / "dispatcher.yaml"
    path.write_text(
        textwrap.dedent("""
        dispatcher:
          poll_interval: 1
          scheduling_policy: fifo
          max_global_concurrency: 4
          retry:
            max_attempts: 5
            backoff_base: 3.0
            initial_delay: 0.5
            max_delay: 30
        agent_pools:
          local:
            type: local-process
            max_concurrency: 2
          docker:
            type: docker
            max_concurrency: 3
            enabled: false
        skill_mapping:
          backend: [docker, local]
          default: local
    """)
    )
    config = DispatcherConfig.from_yaml(path)
    assert config.scheduling_policy is SchedulingPolicy.FIFO
    assert (config.retry_max_attempts, config.retry_backoff_base) == (5, 3.0)
    assert (config.retry_initial_delay, config.retry_max_delay) == (0.5, 30)
    assert [(p.name, p.type, p.max_concurrency, p.enabled) for p in config.agent_pools] == [
        ("local", PoolType.LOCAL_PROCESS, 2, True),
        ("docker", PoolType.DOCKER, 3, False),
    ]
    assert config.skill_mapping == {"backend": ["docker", "local"], "default": ["local"]}
    dispatcher = DispatcherCore(config)
    assert dispatcher.retry_manager.max_attempts == 5
    assert dispatcher.get_status()["scheduling_policy"] == "fifo"


def test_from_yaml_reads_flat_retry_keys(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("dispatcher:\n  retry_max_attempts: 7\n  retry_backoff_base: 1.5\n")
    config = DispatcherConfig.from_yaml(path)
    assert (config.retry_max_attempts, config.retry_backoff_base) == (7, 1.5)


def test_assigning_a_config_updates_the_core():
    dispatcher = DispatcherCore()
    dispatcher.config = DispatcherConfig(max_global_concurrency=2, retry_max_attempts=9)
    assert dispatcher.get_status()["max_global_concurrency"] == 2
    assert dispatcher.retry_manager.max_attempts == 9
