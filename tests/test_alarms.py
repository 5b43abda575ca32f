"""The alarm manager: ISA-18.2 states, audited operator actions, shelving limits, floods."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agent.alarms.manager import (
    FLOOD_ALARM,
    AlarmError,
    AlarmManager,
    AlarmRefused,
    AlarmState,
    Priority,
    UnknownAlarm,
)
from agent.record.format import canonical
from drivers.clock import ManualClock

HOUR = 3600.0


class Sink:
    """Collects what the manager sends; checks each body is journal-able canonical JSON."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, kind: str, body: dict[str, Any]) -> None:
        canonical(body, what="body")
        self.records.append((kind, body))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.records]

    def last(self, kind: str) -> dict[str, Any]:
        return next(body for k, body in reversed(self.records) if k == kind)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def alarms(clock: ManualClock, sink: Sink) -> AlarmManager:
    manager = AlarmManager(clock, sink)
    manager.define("temp_high", Priority.HIGH, "Culture temperature above limit")
    manager.define("do_low", "medium", "Dissolved oxygen low")
    manager.define("door_open", Priority.CRITICAL, "Incubator door open")
    return manager


async def test_raise_makes_alarm_active_unacknowledged(alarms: AlarmManager, sink: Sink) -> None:
    """A raised alarm is UNACK, listed as active, and journaled with value and detail."""
    view = await alarms.raise_("temp_high", 38.7, "probe T1")
    assert view.state is AlarmState.UNACK and view.active
    assert [a.id for a in alarms.active()] == ["temp_high"]
    assert sink.records == [
        (
            "alarm",
            {
                "alarm": "temp_high",
                "state": "unack",
                "old": "normal",
                "active": True,
                "priority": "high",
                "message": "Culture temperature above limit",
                "cause": "raise",
                "value": 38.7,
                "detail": "probe T1",
            },
        )
    ]


async def test_acknowledge_is_audited_before_the_state_change(
    alarms: AlarmManager, sink: Sink
) -> None:
    """Acknowledging an UNACK alarm audits who/why/old/new first, then records ACKED."""
    await alarms.raise_("temp_high", 38.7)
    view = await alarms.acknowledge("temp_high", "alice", "seen, checking heater")
    assert view.state is AlarmState.ACKED and view.acked_by == "alice"
    assert sink.kinds() == ["alarm", "audit", "alarm"]
    assert sink.records[1][1] == {
        "action": "alarm_acknowledge",
        "alarm": "temp_high",
        "who": "alice",
        "why": "seen, checking heater",
        "old": "unack",
        "new": "acked",
    }
    assert sink.last("alarm")["state"] == "acked" and sink.last("alarm")["who"] == "alice"


async def test_acknowledged_alarm_clears_to_normal(alarms: AlarmManager) -> None:
    """An ACKED alarm whose condition clears goes back to NORMAL and leaves the active list."""
    await alarms.raise_("temp_high")
    await alarms.acknowledge("temp_high", "alice", "seen")
    view = await alarms.clear("temp_high")
    assert view.state is AlarmState.NORMAL and not view.active
    assert alarms.active() == []


async def test_unacknowledged_alarm_clears_to_rtn_unack(alarms: AlarmManager) -> None:
    """An UNACK alarm that clears stays listed as RTN_UNACK until acknowledged, then NORMAL."""
    await alarms.raise_("temp_high")
    assert (await alarms.clear("temp_high")).state is AlarmState.RTN_UNACK
    assert [a.state for a in alarms.active()] == [AlarmState.RTN_UNACK]
    assert (await alarms.acknowledge("temp_high", "alice", "seen")).state is AlarmState.NORMAL


async def test_rtn_unack_alarm_raised_again_is_unack(alarms: AlarmManager) -> None:
    """A returned-unacknowledged alarm that comes back is UNACK again."""
    await alarms.raise_("temp_high")
    await alarms.clear("temp_high")
    assert (await alarms.raise_("temp_high")).state is AlarmState.UNACK


@pytest.mark.parametrize("setup", ["normal", "acked"])
async def test_acknowledge_refused_unless_unacknowledged(
    alarms: AlarmManager, sink: Sink, setup: str
) -> None:
    """Acknowledging a NORMAL or ACKED alarm is refused with a clear error, audited, no change."""
    if setup == "acked":
        await alarms.raise_("temp_high")
        await alarms.acknowledge("temp_high", "alice", "seen")
    before = alarms.get("temp_high")
    with pytest.raises(AlarmRefused) as caught:
        await alarms.acknowledge("temp_high", "bob", "again")
    assert str(caught.value) == (
        f"acknowledge of alarm 'temp_high' refused: it is {setup}, not unacknowledged"
    )
    assert alarms.get("temp_high") == before
    assert sink.last("audit")["refused"] == f"it is {setup}, not unacknowledged"
    assert sink.last("audit")["who"] == "bob"


async def test_repeated_raise_updates_value_without_a_record(
    alarms: AlarmManager, sink: Sink
) -> None:
    """Raising an already active alarm updates its value but journals nothing new."""
    await alarms.raise_("temp_high", 38.7)
    await alarms.raise_("temp_high", 38.9)
    assert len(sink.records) == 1
    assert alarms.get("temp_high").value == 38.9


async def test_clear_of_normal_alarm_does_nothing(alarms: AlarmManager, sink: Sink) -> None:
    """Clearing an alarm whose condition is not active journals nothing."""
    await alarms.clear("temp_high")
    assert sink.records == []


async def test_non_finite_value_is_journaled_as_text(alarms: AlarmManager, sink: Sink) -> None:
    """A NaN value (refused by canonical JSON) is journaled as its text."""
    await alarms.raise_("temp_high", float("nan"))
    assert sink.last("alarm")["value"] == "nan"


async def test_shelve_hides_alarm_until_expiry(
    alarms: AlarmManager, sink: Sink, clock: ManualClock
) -> None:
    """A shelved alarm leaves the active list; at expiry tick() brings it back UNACK if active."""
    await alarms.raise_("temp_high")
    view = await alarms.shelve("temp_high", "alice", "probe being replaced", 2 * HOUR)
    assert view.state is AlarmState.SHELVED and view.shelved_until is not None
    assert alarms.active() == []
    assert sink.last("audit")["duration"] == 2 * HOUR
    await clock.advance(2 * HOUR - 1)
    await alarms.tick()
    assert alarms.get("temp_high").state is AlarmState.SHELVED
    await clock.advance(1)
    await alarms.tick()
    assert alarms.get("temp_high").state is AlarmState.UNACK
    assert sink.last("alarm")["cause"] == "shelve_expired"
    assert alarms.get("temp_high").shelved_until is None


async def test_condition_changes_while_shelved_are_recorded_not_annunciated(
    alarms: AlarmManager, sink: Sink
) -> None:
    """Raise and clear under shelving are journaled; unshelving an inactive alarm gives NORMAL."""
    await alarms.shelve("temp_high", "alice", "maintenance", HOUR)
    await alarms.raise_("temp_high", 39.0)
    assert sink.last("alarm")["state"] == "shelved" and sink.last("alarm")["active"] is True
    await alarms.clear("temp_high")
    assert alarms.active() == [] and alarms.recent() == 0
    view = await alarms.unshelve("temp_high", "alice", "maintenance done")
    assert view.state is AlarmState.NORMAL
    assert sink.last("audit")["action"] == "alarm_unshelve"


@pytest.mark.parametrize(
    ("alarm", "duration", "problem"),
    [
        ("door_open", HOUR, "critical alarms cannot be shelved"),
        ("temp_high", 8 * HOUR + 1, "duration 28801 s is not within (0, 28800] s"),
        ("temp_high", 0.0, "duration 0 s is not within (0, 28800] s"),
    ],
)
async def test_shelve_refusals(
    alarms: AlarmManager, sink: Sink, alarm: str, duration: float, problem: str
) -> None:
    """Shelving a critical alarm or beyond the 8 h maximum is refused and audited."""
    with pytest.raises(AlarmRefused, match=re.escape(problem)):
        await alarms.shelve(alarm, "alice", "too noisy", duration)
    assert alarms.get(alarm).state is AlarmState.NORMAL
    assert sink.records == [
        (
            "audit",
            {
                "action": "alarm_shelve",
                "alarm": alarm,
                "who": "alice",
                "why": "too noisy",
                "refused": problem,
            },
        )
    ]


async def test_shelving_twice_is_refused(alarms: AlarmManager) -> None:
    """A shelved alarm cannot be shelved again (unshelve first)."""
    await alarms.shelve("temp_high", "alice", "noisy", HOUR)
    with pytest.raises(AlarmRefused, match="already shelved"):
        await alarms.shelve("temp_high", "alice", "noisy", HOUR)


async def test_unshelve_of_unshelved_alarm_is_refused(alarms: AlarmManager) -> None:
    """Unshelving an alarm that is not shelved is refused."""
    with pytest.raises(AlarmRefused, match="it is normal, not shelved"):
        await alarms.unshelve("temp_high", "alice", "oops")


async def test_suppression_by_design_hides_and_restores(alarms: AlarmManager, sink: Sink) -> None:
    """A suppressed alarm is not annunciated; unsuppressing an active one annunciates it."""
    await alarms.suppress("do_low", "engine", "unit idle")
    await alarms.raise_("do_low", 12.0)
    assert alarms.active() == []
    view = await alarms.unsuppress("do_low", "engine", "run started")
    assert view.state is AlarmState.UNACK
    assert [b["action"] for k, b in sink.records if k == "audit"] == [
        "alarm_suppress",
        "alarm_unsuppress",
    ]


async def test_out_of_service_round_trip(alarms: AlarmManager) -> None:
    """An alarm taken out of service comes back NORMAL when its condition is inactive."""
    await alarms.raise_("door_open")
    await alarms.remove_from_service("door_open", "tech", "door switch replaced")
    assert alarms.get("door_open").state is AlarmState.OUT_OF_SERVICE
    await alarms.clear("door_open")
    view = await alarms.return_to_service("door_open", "tech", "switch tested")
    assert view.state is AlarmState.NORMAL


@pytest.mark.parametrize(("who", "reason"), [("", "seen"), ("alice", " ")])
async def test_operator_action_needs_who_and_reason(
    alarms: AlarmManager, who: str, reason: str
) -> None:
    """An operator action without a who or a reason is refused."""
    await alarms.raise_("temp_high")
    with pytest.raises(AlarmRefused, match="must be given"):
        await alarms.acknowledge("temp_high", who, reason)
    assert alarms.get("temp_high").state is AlarmState.UNACK


async def test_unknown_alarm(alarms: AlarmManager, sink: Sink) -> None:
    """Raising an undefined alarm is an error; acknowledging one is a refused, audited action."""
    with pytest.raises(UnknownAlarm, match="'nope' is not defined"):
        await alarms.raise_("nope")
    with pytest.raises(AlarmRefused, match="no such alarm"):
        await alarms.acknowledge("nope", "alice", "seen")
    assert sink.kinds() == ["audit"]


def test_define_refuses_duplicates_and_the_flood_id(alarms: AlarmManager) -> None:
    """Alarm ids are unique and the flood pseudo-alarm id is reserved."""
    with pytest.raises(AlarmError, match="already defined"):
        alarms.define("temp_high", Priority.LOW, "again")
    with pytest.raises(AlarmError):
        alarms.define(FLOOD_ALARM, Priority.LOW, "flood")


async def test_active_list_orders_by_priority_then_age(
    alarms: AlarmManager, clock: ManualClock
) -> None:
    """active() lists critical before high before medium, and older first within a priority."""
    alarms.define("temp_high_2", Priority.HIGH, "Second probe high")
    for alarm_id in ("do_low", "temp_high_2", "temp_high", "door_open"):
        await alarms.raise_(alarm_id)
        await clock.advance(1)
    assert [a.id for a in alarms.active()] == ["door_open", "temp_high_2", "temp_high", "do_low"]


def many(clock: ManualClock, sink: Sink, n: int) -> AlarmManager:
    manager = AlarmManager(clock, sink)
    for i in range(n):
        manager.define(f"a{i}", Priority.LOW, f"alarm {i}")
    return manager


async def test_eleven_alarms_in_ten_minutes_begin_a_flood(clock: ManualClock, sink: Sink) -> None:
    """The 11th annunciation within 10 minutes starts a flood (journaled); ten do not."""
    alarms = many(clock, sink, 11)
    for i in range(10):
        await alarms.raise_(f"a{i}")
        await clock.advance(50)
    assert not alarms.flood()
    await alarms.raise_("a10")
    assert alarms.flood()
    flood = sink.last("alarm")
    assert (flood["alarm"], flood["state"], flood["count"]) == (FLOOD_ALARM, "active", 11)


async def test_flood_ends_when_rate_falls_below_five(clock: ManualClock, sink: Sink) -> None:
    """A flood ends (journaled) once fewer than 5 annunciations remain in the window."""
    alarms = many(clock, sink, 11)
    for i in range(11):
        await alarms.raise_(f"a{i}")
        await clock.advance(10)
    assert alarms.flood()
    await clock.advance(600 - 110 + 60)  # the first 7 have left the window: 4 remain
    await alarms.tick()
    assert not alarms.flood()
    assert sink.last("alarm") == {
        "alarm": FLOOD_ALARM,
        "state": "normal",
        "count": 4,
        "priority": "high",
        "message": "alarm flood over: 4 alarms in the last 10 min",
    }


async def test_alarms_spread_out_are_no_flood(clock: ManualClock, sink: Sink) -> None:
    """Eleven alarms over twenty minutes are not a flood."""
    alarms = many(clock, sink, 11)
    for i in range(11):
        await alarms.raise_(f"a{i}")
        await clock.advance(120)
    assert not alarms.flood()
    assert all(body["alarm"] != FLOOD_ALARM for _, body in sink.records)


async def test_failed_audit_leaves_the_alarm_unchanged(clock: ManualClock) -> None:
    """An operator action whose audit record cannot be written does not take effect."""
    records: list[str] = []

    async def sink(kind: str, body: dict[str, Any]) -> None:
        if kind == "audit":
            raise OSError("disk full")
        records.append(kind)

    alarms = AlarmManager(clock, sink)
    alarms.define("temp_high", Priority.HIGH, "Culture temperature above limit")
    await alarms.raise_("temp_high")
    with pytest.raises(OSError, match="disk full"):
        await alarms.acknowledge("temp_high", "alice", "seen")
    assert alarms.get("temp_high").state is AlarmState.UNACK
    assert records == ["alarm"]
