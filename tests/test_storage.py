"""Journal storage of a CAR-T run with the shipped recording policies (tests/bench/storage.py).

The 12-day campaign is slow (about two minutes) and marked so; the fast test runs its first
simulated hour to keep the measurement honest between campaigns.
"""

from __future__ import annotations

import pytest

from agent.config import default_config_path, load_config
from tests.bench import storage


def test_every_tag_is_on_the_record_within_its_heartbeat() -> None:
    """In the first simulated hour every recorded tag of the unit enters the journal, and
    the recording policies keep it far below one record per sample offered."""
    r = storage.measure(days=1 / 24)
    config = load_config(default_config_path())
    recorded = {t for t in config.all_tags() if config.tag(t)[1].record.mode != "never"}
    assert set(r["per_tag"]) == recorded
    assert r["recorded"] < r["offered"] / 10
    assert r["journal_bytes"] > 0


def test_a_clock_running_ahead_of_the_writer_checkpoints_at_most_once_a_minute() -> None:
    """With time running far faster than the journal's writer commits (a ManualClock), the
    periodic checkpoint is written at most once a minute, not once per flush while one waits."""
    r = storage.measure(days=1 / 24)
    # at most 60 periodic and the closing seal; fewer when the writer lags the clock
    assert 10 <= r["checkpoints"] <= 61


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_12_day_run_fits_in_200_mb() -> None:
    """Twelve simulated days of the unit's tags, at their sampling intervals and recording
    policies, leave a journal under 200 MB."""
    r = storage.measure(days=storage.RUN_DAYS)
    print({k: v for k, v in r.items() if k != "per_tag"})
    assert r["journal_bytes"] < storage.BUDGET_BYTES
