from datetime import datetime

import pytest

from necrocode_dispatch import ManualClock, RetryManager

START = datetime(2025, 3, 14, 9, 26, 53, 589793)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def manager(clock: ManualClock) -> RetryManager:
    return RetryManager(
        max_attempts=3, backoff_base=2.0, initial_delay=1.0, max_delay=300.0, clock=clock
    )
