"""SPEC §2, §3 and §5 beyond the original scenarios: settings, bad input,
RetryInfo as a value, copies, ordering, clocks and logging."""

import copy
import logging
import math
import pickle
import time
from datetime import datetime, timedelta, timezone

import pytest

from necrocode_dispatch import RetryInfo, RetryManager, SystemClock

from .conftest import START

LOGGER = "necrocode_dispatch.retry_manager"


def state(manager):
    """Everything observable about a manager, to prove a rejected call changed nothing."""
    return (
        manager.max_attempts,
        manager.backoff_base,
        manager.initial_delay,
        manager.max_delay,
        {k: v.to_dict() for k, v in manager.get_all_retry_info().items()},
        manager.get_tasks_ready_for_retry(),
    )


# --- settings -------------------------------------------------------------


def test_attribute_writes_take_effect(manager, clock):
    manager.initial_delay = 10.0
    manager.backoff_base = 3.0
    manager.max_delay = 50.0
    assert [manager._calculate_backoff_delay(n) for n in range(1, 5)] == [10.0, 30.0, 50.0, 50.0]
    info = manager.record_failure("t")
    assert info.next_retry_at - info.last_retry_at == timedelta(seconds=10)
    clock.advance(9.5)
    assert not manager.should_retry("t")
    clock.advance(0.5)
    assert manager.should_retry("t")
    manager.max_attempts = 1
    assert not manager.should_retry("t")
    assert manager.get_tasks_ready_for_retry() == []
    manager.max_attempts = 2
    assert manager.get_tasks_ready_for_retry() == ["t"]


def test_settings_accept_ints_for_floats():
    manager = RetryManager(max_attempts=0, backoff_base=2, initial_delay=0, max_delay=5)
    assert manager.backoff_base == 2.0 and isinstance(manager.backoff_base, float)
    assert manager._calculate_backoff_delay(3) == 0.0
    assert not manager.should_retry("unknown")  # 0 >= max_attempts


BAD_SETTINGS = [
    ("max_attempts", -1, ValueError),
    ("max_attempts", -(10**30), ValueError),
    ("max_attempts", 2.5, TypeError),
    ("max_attempts", "3", TypeError),
    ("max_attempts", None, TypeError),
    ("max_attempts", True, TypeError),
    ("backoff_base", 0, ValueError),
    ("backoff_base", -2.0, ValueError),
    ("backoff_base", math.nan, ValueError),
    ("backoff_base", math.inf, ValueError),
    ("backoff_base", "2", TypeError),
    ("initial_delay", -0.5, ValueError),
    ("initial_delay", math.nan, ValueError),
    ("initial_delay", -math.inf, ValueError),
    ("initial_delay", None, TypeError),
    ("max_delay", -1, ValueError),
    ("max_delay", math.inf, ValueError),
    ("max_delay", math.nan, ValueError),
    ("max_delay", [1], TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_SETTINGS)
def test_bad_settings_in_the_constructor(name, value, error):
    with pytest.raises(error) as excinfo:
        RetryManager(**{name: value})
    assert name in str(excinfo.value)
    assert repr(value).lower() in str(excinfo.value).lower()


@pytest.mark.parametrize(("name", "value", "error"), BAD_SETTINGS)
def test_bad_settings_written_change_nothing(manager, name, value, error):
    manager.record_failure("t", "boom")
    before = state(manager)
    with pytest.raises(error, match=name):
        setattr(manager, name, value)
    assert state(manager) == before


def test_settings_cannot_be_deleted(manager):
    with pytest.raises(AttributeError):
        del manager.max_delay
    assert manager.max_delay == 300.0


def test_huge_max_attempts_means_unlimited(clock):
    manager = RetryManager(max_attempts=10**40, clock=clock)
    for _ in range(100):
        manager.record_failure("t")
    clock.advance(10**6)
    assert manager.should_retry("t")


def test_clock_must_be_one_of_ours():
    class PyClock:
        def now(self):
            return datetime.now()

        def monotonic(self):
            return time.monotonic()

    with pytest.raises(TypeError, match="clock"):
        RetryManager(clock=PyClock())
    assert isinstance(RetryManager().clock, SystemClock)
    assert isinstance(RetryManager(clock=None).clock, SystemClock)


# --- bad task ids and arguments ---------------------------------------------

TASK_ID_CALLS = [
    lambda m, v: m.record_failure(v, "x"),
    lambda m, v: m.should_retry(v),
    lambda m, v: m.get_retry_count(v),
    lambda m, v: m.get_retry_info(v),
    lambda m, v: m.clear_retry_info(v),
    lambda m, v: v in m,
]


@pytest.mark.parametrize("call", TASK_ID_CALLS)
@pytest.mark.parametrize("bad_id", [42, None, b"t", ["t"]])
def test_non_str_task_ids_raise_type_error(manager, call, bad_id):
    manager.record_failure("t", "boom")
    before = state(manager)
    with pytest.raises(TypeError, match="task_id") as excinfo:
        call(manager, bad_id)
    assert repr(bad_id) in str(excinfo.value)
    assert state(manager) == before


def test_non_str_failure_reason_is_rejected_without_counting(manager):
    with pytest.raises(TypeError, match="failure_reason"):
        manager.record_failure("t", 500)
    assert manager.get_retry_count("t") == 0
    assert len(manager) == 0


@pytest.mark.parametrize("bad_count", [1.0, "3", None, True])
def test_non_int_retry_counts_raise_type_error(manager, bad_count):
    with pytest.raises(TypeError, match="retry_count"):
        manager._calculate_backoff_delay(bad_count)


# --- backoff edge cases -----------------------------------------------------


def test_huge_retry_counts_give_max_delay_not_overflow(manager):
    assert manager._calculate_backoff_delay(5000) == manager.max_delay
    assert manager._calculate_backoff_delay(10**30) == manager.max_delay
    assert manager._calculate_backoff_delay(10**400) == manager.max_delay
    assert manager._calculate_backoff_delay(-(10**30)) == manager.initial_delay


@pytest.mark.parametrize(
    ("base", "initial", "maximum"),
    [
        (2.0, 1.0, 300.0),
        (3.0, 0.5, 1e9),
        (1.5, 2.0, 1e300),
        (0.5, 8.0, 100.0),
        (1.0, 3.0, 2.0),
        (1.0001, 1e-3, 1e6),
        (10.0, 1e-9, 1e200),
    ],
)
def test_backoff_is_bit_for_bit_the_python_formula(base, initial, maximum):
    manager = RetryManager(backoff_base=base, initial_delay=initial, max_delay=maximum)
    for n in range(-2, 1100):
        if n <= 0:
            expected = initial
        else:
            try:
                expected = min(initial * base ** (n - 1), maximum)
            except OverflowError:
                expected = maximum
        got = manager._calculate_backoff_delay(n)
        assert got.hex() == expected.hex(), (n, got, expected)


def test_large_delays_cap_next_retry_at_instead_of_overflowing(clock):
    manager = RetryManager(initial_delay=1e300, max_delay=1e300, clock=clock)
    info = manager.record_failure("t")
    assert info.next_retry_at == datetime.max
    assert not manager.should_retry("t")


# --- RetryInfo as a value ---------------------------------------------------


def test_retry_info_equality():
    a = RetryInfo("t", 2, START, START + timedelta(seconds=4), "boom")
    b = RetryInfo(
        task_id="t",
        retry_count=2,
        last_retry_at=START,
        next_retry_at=START + timedelta(seconds=4),
        failure_reason="boom",
    )
    assert a == b
    assert not (a != b)
    assert a != RetryInfo("t", 3, START, START + timedelta(seconds=4), "boom")
    assert a != "t"
    with pytest.raises(TypeError):
        hash(a)


def test_retry_info_repr_reads_like_a_dataclass():
    info = RetryInfo("t", 1, START, None, "it's")
    assert repr(info) == (
        "RetryInfo(task_id='t', retry_count=1, "
        f'last_retry_at={START!r}, next_retry_at=None, failure_reason="it\'s")'
    )


def test_retry_info_attributes_are_writable_and_checked():
    info = RetryInfo("t")
    info.retry_count = 5
    info.last_retry_at = START
    info.failure_reason = "late"
    info.task_id = "u"
    assert (info.task_id, info.retry_count, info.last_retry_at, info.failure_reason) == (
        "u",
        5,
        START,
        "late",
    )
    with pytest.raises(TypeError, match="retry_count"):
        info.retry_count = "5"
    with pytest.raises(TypeError, match="last_retry_at"):
        info.last_retry_at = "2024-01-01"
    with pytest.raises(ValueError, match="naive"):
        info.next_retry_at = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(TypeError, match="task_id"):
        RetryInfo(7)
    assert info.retry_count == 5


def test_from_dict_inverts_to_dict(manager, clock):
    clock.advance(1.000001)
    info = manager.record_failure("task-1", "boom")
    data = info.to_dict()
    assert RetryInfo.from_dict(data) == info
    assert RetryInfo.from_dict(data).to_dict() == data
    empty = RetryInfo("x")
    assert RetryInfo.from_dict(empty.to_dict()) == empty


def test_from_dict_rejects_bad_data():
    with pytest.raises(KeyError, match="task_id"):
        RetryInfo.from_dict({"retry_count": 1})
    with pytest.raises(ValueError, match="last_retry_at"):
        RetryInfo.from_dict({"task_id": "t", "last_retry_at": "yesterday"})


def test_retry_info_pickles_and_copies(manager):
    info = manager.record_failure("task-1", "boom")
    for clone in (pickle.loads(pickle.dumps(info)), copy.copy(info), copy.deepcopy(info)):
        assert clone == info
        assert clone is not info
        assert type(clone) is RetryInfo


class _Id(str):
    """A str subclass whose behaviour must not reach what the manager hands back."""

    def __eq__(self, other):
        return False

    __hash__ = str.__hash__


def test_a_recorded_failure_holds_the_given_id_str(manager):
    task_id = "".join(["task-", "1"])  # made at run time, not a shared constant
    info = manager.record_failure(task_id, "boom")
    assert info.task_id is task_id
    info.task_id = task_id.upper()
    assert info.task_id == "TASK-1"
    # A subclass's value is kept as a plain str of the same text.
    sub = manager.record_failure(_Id("task-2"), "boom")
    assert type(sub.task_id) is str and sub.task_id == "task-2"
    assert type(RetryInfo(_Id("x")).task_id) is str
    assert manager.get_retry_count("task-2") == 1


@pytest.mark.parametrize("task_id", ["tâche-é", "задача-7", "任务", "task-\U0001f680"])
def test_ids_beyond_ascii_are_kept_exactly(manager, clock, task_id):
    info = manager.record_failure(task_id, "boom")
    assert info.task_id == task_id and manager.get_retry_count(task_id) == 1
    assert manager.should_retry(task_id) is False
    clock.advance(1.0)
    assert manager.should_retry(task_id) is True
    assert list(manager.get_all_retry_info()) == [task_id]
    assert manager.get_tasks_ready_for_retry() == [task_id]
    assert RetryInfo.from_dict(info.to_dict()) == info


def test_retry_infos_compare_ids_by_text():
    assert RetryInfo("t-1") == RetryInfo("".join(["t-", "1"]))
    assert RetryInfo("t-1") != RetryInfo("t-2")
    assert RetryInfo("é") == RetryInfo("\u00e9") != RetryInfo("e\u0301")


def test_get_retry_info_returns_a_copy(manager):
    manager.record_failure("task-1", "boom")
    info = manager.get_retry_info("task-1")
    info.retry_count = 99
    info.failure_reason = "changed"
    assert manager.get_retry_count("task-1") == 1
    assert manager.get_retry_info("task-1").failure_reason == "boom"
    everything = manager.get_all_retry_info()
    everything["task-1"].retry_count = 42
    everything.clear()
    assert manager.get_retry_count("task-1") == 1


# --- ordering and time ------------------------------------------------------


def test_ready_list_is_ordered_by_due_time(clock):
    manager = RetryManager(max_attempts=10, initial_delay=10.0, backoff_base=2.0, clock=clock)
    manager.record_failure("c")  # due 10
    manager.record_failure("c")  # due 20
    clock.advance(1)
    manager.record_failure("a")  # due 11
    clock.advance(1)
    manager.record_failure("b")  # due 12
    clock.advance(5)
    manager.record_failure("d")  # due 17
    assert manager.get_tasks_ready_for_retry() == []
    clock.advance(100)
    assert manager.get_tasks_ready_for_retry() == ["a", "b", "d", "c"]


def test_wall_clock_jump_does_not_change_decisions(manager, clock):
    manager.record_failure("t")
    clock.set_wall_time(START + timedelta(days=365))  # jump forward a year
    assert not manager.should_retry("t")
    assert manager.get_tasks_ready_for_retry() == []
    clock.set_wall_time(START - timedelta(days=365))  # and back
    clock.advance(1.0)
    assert manager.should_retry("t")
    assert manager.get_tasks_ready_for_retry() == ["t"]
    # Reports follow the wall clock as it is now.
    info = manager.record_failure("t")
    assert info.last_retry_at == START - timedelta(days=365) + timedelta(seconds=1)


def test_one_clock_shared_by_two_managers(clock):
    a = RetryManager(clock=clock)
    b = RetryManager(clock=clock)
    assert a.clock is clock and b.clock is clock
    a.record_failure("t")
    b.record_failure("t")
    clock.advance(1)
    assert a.should_retry("t") and b.should_retry("t")


def test_manual_clock_rejects_bad_advances(clock):
    for bad, error in [
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
    ]:
        with pytest.raises(error, match="seconds"):
            clock.advance(bad)
    assert clock.monotonic() == 0.0
    assert clock.now() == START


def test_system_clock_matches_the_standard_library():
    clock = SystemClock()
    before = datetime.now()
    now = clock.now()
    after = datetime.now()
    assert before <= now <= after
    assert now.tzinfo is None
    m_before = time.monotonic()
    m = clock.monotonic()
    assert m_before <= m <= time.monotonic()


def test_system_clock_manager_times_are_local_naive():
    manager = RetryManager()
    before = datetime.now()
    info = manager.record_failure("t")
    after = datetime.now()
    assert before <= info.last_retry_at <= after
    assert info.next_retry_at == info.last_retry_at + timedelta(seconds=1)


# --- logging ----------------------------------------------------------------


def test_failures_are_logged_at_info_and_details_at_debug(manager, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    manager.record_failure("task-1", "disk full")
    records = [r for r in caplog.records if r.name == LOGGER]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert any("task-1" in m and "retry_count=1/3" in m for m in info)
    assert any("disk full" in m for m in debug)
    assert any("delay" in m for m in debug)


def test_reaching_the_limit_is_logged_at_info(manager, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        manager.record_failure("task-1", "boom")
    limit = [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.INFO and "max retry attempts" in r.getMessage()
    ]
    assert len(limit) == 1
    assert "3/3" in limit[0].getMessage()


def test_debug_records_are_filtered_by_the_python_level(manager, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    manager.record_failure("task-1", "boom")
    assert [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG] == []
    assert [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


def test_a_task_backing_off_says_how_long_it_must_wait(manager, clock, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    manager.record_failure("t")
    clock.advance(0.25)
    caplog.clear()
    assert not manager.should_retry("t")
    waits = [r.getMessage() for r in caplog.records if "must wait" in r.getMessage()]
    assert waits == ["Task t must wait 0.8s before retry"]


def test_records_known_unwanted_come_back_with_any_level_change(manager, caplog):
    # record_failure and should_retry skip making the records that the
    # logger's cache says are unwanted; a change of level anywhere (the
    # logger, a parent, logging.disable) must bring them back at once.
    logger = logging.getLogger(LOGGER)
    parent = logging.getLogger("necrocode_dispatch")

    def logged():
        caplog.clear()
        manager.clear_retry_info("t")
        for _ in range(3):  # the first fills the cache, the rest use it
            manager.record_failure("t", "boom")
            manager.should_retry("t")
        mine = [r for r in caplog.records if r.name == LOGGER]
        return (
            sum(r.levelno == logging.INFO for r in mine),
            sum(r.levelno == logging.DEBUG and "must wait" in r.getMessage() for r in mine),
            sum(r.levelno == logging.DEBUG and "boom" in r.getMessage() for r in mine),
        )

    try:
        logger.setLevel(logging.WARNING)
        # INFO x3 and the limit's INFO; DEBUG "must wait" only while retrying.
        assert logged() == (0, 0, 0)
        logger.setLevel(logging.NOTSET)
        parent.setLevel(logging.DEBUG)
        assert logged() == (4, 2, 3)
        parent.setLevel(logging.INFO)
        assert logged() == (4, 0, 0)
        logging.disable(logging.INFO)
        assert logged() == (0, 0, 0)
        logging.disable(logging.NOTSET)
        parent.setLevel(logging.DEBUG)
        assert logged() == (4, 2, 3)
    finally:
        logging.disable(logging.NOTSET)
        parent.setLevel(logging.NOTSET)
        logger.setLevel(logging.NOTSET)


def test_level_changes_take_effect_at_once(manager, caplog):
    # The core answers "is DEBUG enabled?" from the logger's own cache; every
    # level change must still be seen by the very next call.
    logger = logging.getLogger(LOGGER)
    try:
        for level, expected in [
            (logging.WARNING, 0),
            (logging.DEBUG, 1),
            (logging.ERROR, 0),
            (logging.DEBUG, 1),
        ]:
            logger.setLevel(level)
            manager.clear_retry_info("t")
            caplog.clear()
            manager.record_failure("t")
            # Backing off: a DEBUG record each time; the second call finds
            # the level's answer remembered from the first.
            assert not manager.should_retry("t")
            assert not manager.should_retry("t")
            waits = [r for r in caplog.records if "must wait" in r.getMessage()]
            assert len(waits) == 2 * expected, level
        logging.disable(logging.CRITICAL)
        caplog.clear()
        manager.should_retry("t")
        assert caplog.records == []
    finally:
        logging.disable(logging.NOTSET)
        logger.setLevel(logging.NOTSET)
