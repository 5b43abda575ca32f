"""Recording policy: on change beyond a deadband, periodic, heartbeats, and quality changes."""

from __future__ import annotations

from collections.abc import Sequence

from agent.config import Recording
from agent.journal.recorder import Recorder
from drivers.base import Quality, Sample
from drivers.clock import ManualClock


def rig(**policies: Recording) -> tuple[Recorder, list[Sample], ManualClock]:
    clock = ManualClock()
    got: list[Sample] = []

    def sink(batch: Sequence[Sample]) -> None:
        got.extend(batch)

    return Recorder(dict(policies), sink, clock), got, clock


def s(clock: ManualClock, value: object, tag: str = "t", q: Quality = Quality.GOOD) -> Sample:
    return Sample(tag, value, q, clock.now())  # type: ignore[arg-type]


def test_on_change_records_moves_beyond_the_deadband_from_the_last_recorded_value() -> None:
    """Small steps are skipped until they add up past the deadband."""
    rec, got, clock = rig(t=Recording(mode="on_change", deadband=0.5, interval=600))
    for v in (37.0, 37.2, 37.4, 37.6, 37.7, 36.9):
        rec.offer([s(clock, v)])
    assert [x.value for x in got] == [37.0, 37.6, 36.9]


def test_quality_change_is_always_recorded() -> None:
    """A change to bad quality is recorded even when the value did not move."""
    rec, got, clock = rig(t=Recording(mode="on_change", deadband=10, interval=600))
    rec.offer(
        [s(clock, 1.0), s(clock, 1.0, q=Quality.BAD), s(clock, 1.0, q=Quality.BAD), s(clock, 1.0)]
    )
    assert [x.quality for x in got] == [Quality.GOOD, Quality.BAD, Quality.GOOD]


async def test_periodic_records_the_latest_value_every_interval() -> None:
    """A periodic tag is recorded at its interval even when its device reports nothing new."""
    rec, got, clock = rig(t=Recording(mode="periodic", interval=60))
    rec.offer([s(clock, 5.0)])
    rec.offer([s(clock, 6.0)])  # within the interval: not recorded
    await clock.advance(30)
    assert rec.tick() == 0
    await clock.advance(31)
    assert rec.tick() == 1
    assert [x.value for x in got] == [5.0, 6.0]
    assert got[-1].agent_time == clock.now()


async def test_on_change_has_a_heartbeat() -> None:
    """An unchanging on-change tag is restated every interval."""
    rec, got, clock = rig(t=Recording(mode="on_change", deadband=1, interval=10))
    rec.offer([s(clock, 2.0)])
    await clock.advance(11)
    rec.tick()
    assert len(got) == 2


def test_never_and_unknown_tags_are_not_recorded() -> None:
    """Tags with mode never, or without a policy, stay out of the journal."""
    rec, got, clock = rig(t=Recording(mode="never"))
    rec.offer([s(clock, 1.0), s(clock, 2.0, tag="other")])
    assert got == [] and rec.offered == 2


def test_text_values_are_recorded_on_any_change() -> None:
    """Non-numeric values have no deadband: any change counts."""
    rec, got, clock = rig(t=Recording(mode="on_change", deadband=5))
    for v in ("idle", "idle", "running", "complete"):
        rec.offer([s(clock, v)])
    assert [x.value for x in got] == ["idle", "running", "complete"]
