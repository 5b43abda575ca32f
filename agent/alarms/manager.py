"""Alarm management after ISA-18.2 / IEC 62682: alarm states, operator actions, floods.

An alarm is defined once (id, priority, message). Its process condition is raised and cleared
by the engine (usually from a monitor); the operator acknowledges, shelves and unshelves it;
design logic suppresses it; maintenance takes it out of service::

                 raise                       acknowledge
      NORMAL ────────────► UNACK ────────────────────────► ACKED
        ▲  ▲                 │ clear                         │ clear
        │  │ acknowledge     ▼                               │
        │  └──────────── RTN_UNACK ◄── (raise again: UNACK)  │
        └────────────────────────────────────────────────────┘

      shelve (time-limited, audited) ──► SHELVED ──unshelve / expiry──┐
      suppress (by design, audited)  ──► SUPPRESSED ──unsuppress──────┤
      remove_from_service (audited)  ──► OUT_OF_SERVICE ──return──────┤
                                   UNACK if the condition is active ◄─┘ else NORMAL

While shelved, suppressed or out of service the condition is still tracked (and journaled) but
not annunciated. Rules:

- Acknowledge is accepted only in UNACK and RTN_UNACK; anything else is refused.
- Shelving needs a duration up to ``max_shelve`` (8 h by default) and is refused for CRITICAL
  alarms: those hold the procedure (DOMAIN.md §4) and hiding them would hide why it is held.
  ``tick()`` unshelves alarms whose time is up.
- Operator actions need a ``who`` and a reason. Each is written to the sink as an ``audit``
  record before it takes effect; a refused action is audited too, then ``AlarmRefused`` raised.
- Every state change is written to the sink as an ``alarm`` record before the call returns.
- Flood (ISA-18.2): more than ``flood_count`` (10) annunciations within ``flood_window``
  (10 min) begin a flood; it ends when fewer than ``flood_end`` (5) remain in the window. Begin
  and end are ``alarm`` records for the pseudo-alarm ``alarm_flood``.

Record bodies (the engine's sink journals them as they come, with the run)::

    alarm: {"alarm", "state", "old", "active", "priority", "message", "cause",
            "value"?, "detail"?, "who"?, "shelved_until"?}
    audit: {"action": "alarm_<action>", "alarm", "who", "why", "old", "new"}
           or {..., "refused": reason} for a refused action

The sink must not call back into the manager (calls are serialised by a lock).
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, NoReturn

import structlog

from drivers.clock import Clock

log = structlog.get_logger(__name__)

Sink = Callable[[str, dict[str, Any]], Awaitable[None]]
FLOOD_ALARM = "alarm_flood"


class Priority(enum.StrEnum):
    """Alarm priority; aim for roughly 80 % low, 15 % medium, 5 % high and critical."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for low up to 3 for critical (for sorting)."""
        return list(Priority).index(self)


class AlarmState(enum.StrEnum):
    """What the operator sees of an alarm."""

    NORMAL = "normal"
    UNACK = "unack"  # active, unacknowledged
    ACKED = "acked"  # active, acknowledged
    RTN_UNACK = "rtn_unack"  # returned to normal, unacknowledged
    SHELVED = "shelved"
    SUPPRESSED = "suppressed"  # by design
    OUT_OF_SERVICE = "out_of_service"


ANNUNCIATED = frozenset({AlarmState.UNACK, AlarmState.ACKED, AlarmState.RTN_UNACK})
HIDDEN = frozenset({AlarmState.SHELVED, AlarmState.SUPPRESSED, AlarmState.OUT_OF_SERVICE})


class AlarmError(Exception):
    """Any misuse of the alarm manager."""


class UnknownAlarm(AlarmError):
    """No alarm of that id is defined."""


class AlarmRefused(AlarmError):
    """An operator action the alarm's state or the rules do not allow (already audited)."""

    def __init__(self, alarm_id: str, action: str, reason: str) -> None:
        super().__init__(f"{action} of alarm {alarm_id!r} refused: {reason}")
        self.alarm_id = alarm_id
        self.action = action
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AlarmView:
    """An alarm as the HMI shows it."""

    id: str
    priority: Priority
    message: str
    state: AlarmState
    active: bool  # the process condition, also while shelved, suppressed or out of service
    since: datetime  # when the state last changed
    value: Any = None
    detail: str = ""
    acked_by: str | None = None
    shelved_until: datetime | None = None


@dataclass
class _Alarm:
    id: str
    priority: Priority
    message: str
    since: datetime
    state: AlarmState = AlarmState.NORMAL
    active: bool = False
    value: Any = None
    detail: str = ""
    acked_by: str | None = None
    shelved_until: datetime | None = None
    shelve_deadline: float | None = None  # on the clock's monotonic scale

    def view(self) -> AlarmView:
        return AlarmView(**{f.name: getattr(self, f.name) for f in fields(AlarmView)})


def _jsonable(value: Any) -> Any:
    """A value the journal can hold exactly (canonical JSON refuses NaN and Infinity)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return str(value)


class AlarmManager:
    """The alarms of one unit (see the module docstring)."""

    def __init__(
        self,
        clock: Clock,
        sink: Sink,
        *,
        max_shelve: float = 8 * 3600.0,
        flood_count: int = 10,
        flood_end: int = 5,
        flood_window: float = 600.0,
    ) -> None:
        self._clock = clock
        self._sink = sink
        self.max_shelve = max_shelve
        self.flood_count = flood_count
        self.flood_end = flood_end
        self.flood_window = flood_window
        self._alarms: dict[str, _Alarm] = {}
        self._annunciated: deque[float] = deque()
        self._flooding = False
        self._lock = asyncio.Lock()

    # --- configuration and views --------------------------------------------------------------

    def define(self, alarm_id: str, priority: Priority | str, message: str) -> None:
        """Declare an alarm (normal, in service). Ids are unique; ``alarm_flood`` is reserved."""
        if alarm_id in self._alarms or alarm_id == FLOOD_ALARM:
            raise AlarmError(f"alarm {alarm_id!r} is already defined")
        self._alarms[alarm_id] = _Alarm(alarm_id, Priority(priority), message, self._clock.now())

    def get(self, alarm_id: str) -> AlarmView:
        """One alarm's current view."""
        return self._alarm(alarm_id).view()

    def views(self) -> list[AlarmView]:
        """Every defined alarm, in definition order."""
        return [a.view() for a in self._alarms.values()]

    def active(self) -> list[AlarmView]:
        """The annunciated alarms (UNACK, ACKED, RTN_UNACK), highest priority first, then oldest."""
        shown = [a for a in self._alarms.values() if a.state in ANNUNCIATED]
        shown.sort(key=lambda a: (-a.priority.rank, a.since))
        return [a.view() for a in shown]

    def flood(self) -> bool:
        """True while an alarm flood lasts."""
        return self._flooding

    def recent(self) -> int:
        """How many annunciations fall within the flood window (as of the last call or tick)."""
        return len(self._annunciated)

    # --- the process condition ----------------------------------------------------------------

    async def raise_(self, alarm_id: str, value: Any = None, detail: str = "") -> AlarmView:
        """The alarm's condition is active. Repeating it while active only updates the value."""
        async with self._lock:
            alarm = self._alarm(alarm_id)
            alarm.value, alarm.detail = _jsonable(value), detail
            if not alarm.active:
                alarm.active = True
                hidden = alarm.state in HIDDEN
                await self._change(alarm, alarm.state if hidden else AlarmState.UNACK, "raise")
            return alarm.view()

    async def clear(self, alarm_id: str) -> AlarmView:
        """The alarm's condition returned to normal."""
        async with self._lock:
            alarm = self._alarm(alarm_id)
            if alarm.active:
                alarm.active = False
                new = {AlarmState.UNACK: AlarmState.RTN_UNACK, AlarmState.ACKED: AlarmState.NORMAL}
                await self._change(alarm, new.get(alarm.state, alarm.state), "clear")
            return alarm.view()

    async def tick(self) -> None:
        """Unshelve alarms whose shelving expired and end a flood that has passed."""
        async with self._lock:
            now = self._clock.monotonic()
            for alarm in self._alarms.values():
                deadline = alarm.shelve_deadline
                if alarm.state is AlarmState.SHELVED and deadline is not None and now >= deadline:
                    await self._restore(alarm, "shelve_expired", who="system")
            await self._check_flood()

    # --- operator actions ---------------------------------------------------------------------

    async def acknowledge(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """Acknowledge an unacknowledged alarm (UNACK -> ACKED, RTN_UNACK -> NORMAL)."""
        async with self._lock:
            alarm = await self._target("acknowledge", alarm_id, who, reason)
            if alarm.state is AlarmState.UNACK:
                new = AlarmState.ACKED
            elif alarm.state is AlarmState.RTN_UNACK:
                new = AlarmState.NORMAL
            else:
                await self._refuse(
                    "acknowledge", alarm_id, who, reason, f"it is {alarm.state}, not unacknowledged"
                )
            await self._audit("acknowledge", alarm, who, reason, new)
            alarm.acked_by = who
            await self._change(alarm, new, "acknowledge", who=who)
            return alarm.view()

    async def shelve(self, alarm_id: str, who: str, reason: str, duration: float) -> AlarmView:
        """Hide an alarm for ``duration`` seconds (at most ``max_shelve``; never a critical one)."""
        return await self._enter(AlarmState.SHELVED, "shelve", alarm_id, who, reason, duration)

    async def unshelve(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """End shelving early."""
        return await self._leave(AlarmState.SHELVED, "unshelve", alarm_id, who, reason)

    async def suppress(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """Suppress by design (e.g. process alarms while the unit is idle)."""
        return await self._enter(AlarmState.SUPPRESSED, "suppress", alarm_id, who, reason)

    async def unsuppress(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """End a suppression by design."""
        return await self._leave(AlarmState.SUPPRESSED, "unsuppress", alarm_id, who, reason)

    async def remove_from_service(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """Take an alarm out of service (maintenance, a failed sensor)."""
        return await self._enter(
            AlarmState.OUT_OF_SERVICE, "remove_from_service", alarm_id, who, reason
        )

    async def return_to_service(self, alarm_id: str, who: str, reason: str) -> AlarmView:
        """Put an out-of-service alarm back in service."""
        return await self._leave(
            AlarmState.OUT_OF_SERVICE, "return_to_service", alarm_id, who, reason
        )

    # --- internals ----------------------------------------------------------------------------

    def _alarm(self, alarm_id: str) -> _Alarm:
        try:
            return self._alarms[alarm_id]
        except KeyError:
            raise UnknownAlarm(f"alarm {alarm_id!r} is not defined") from None

    async def _target(self, action: str, alarm_id: str, who: str, reason: str) -> _Alarm:
        """The alarm an operator action is about, once its who, reason and id are checked."""
        if not who.strip():
            await self._refuse(action, alarm_id, who, reason, "who must be given")
        if not reason.strip():
            await self._refuse(action, alarm_id, who, reason, "a reason must be given")
        if alarm_id not in self._alarms:
            await self._refuse(action, alarm_id, who, reason, "no such alarm is defined")
        return self._alarms[alarm_id]

    async def _enter(
        self,
        mode: AlarmState,
        action: str,
        alarm_id: str,
        who: str,
        reason: str,
        duration: float | None = None,  # shelving only
    ) -> AlarmView:
        async with self._lock:
            alarm = await self._target(action, alarm_id, who, reason)
            problem = None
            if duration is not None and alarm.priority is Priority.CRITICAL:
                problem = "critical alarms cannot be shelved"
            elif alarm.state in HIDDEN:
                problem = f"it is already {alarm.state}"
            elif duration is not None and not 0 < duration <= self.max_shelve:
                problem = f"duration {duration:g} s is not within (0, {self.max_shelve:g}] s"
            if problem is not None:
                await self._refuse(action, alarm_id, who, reason, problem)
            extra = {} if duration is None else {"duration": duration}
            await self._audit(action, alarm, who, reason, mode, **extra)
            if duration is not None:
                alarm.shelve_deadline = self._clock.monotonic() + duration
                alarm.shelved_until = self._clock.now() + timedelta(seconds=duration)
            await self._change(alarm, mode, action, who=who)
            return alarm.view()

    async def _leave(
        self, mode: AlarmState, action: str, alarm_id: str, who: str, reason: str
    ) -> AlarmView:
        async with self._lock:
            alarm = await self._target(action, alarm_id, who, reason)
            if alarm.state is not mode:
                await self._refuse(
                    action, alarm_id, who, reason, f"it is {alarm.state}, not {mode}"
                )
            await self._audit(action, alarm, who, reason, self._back(alarm))
            await self._restore(alarm, action, who=who)
            return alarm.view()

    @staticmethod
    def _back(alarm: _Alarm) -> AlarmState:
        """Where an alarm returns from shelving, suppression or out of service."""
        return AlarmState.UNACK if alarm.active else AlarmState.NORMAL

    async def _restore(self, alarm: _Alarm, cause: str, *, who: str) -> None:
        alarm.shelve_deadline = alarm.shelved_until = None
        await self._change(alarm, self._back(alarm), cause, who=who)

    async def _change(
        self, alarm: _Alarm, new: AlarmState, cause: str, *, who: str | None = None
    ) -> None:
        """Apply a state change (or a condition change under a hidden state) and record it."""
        old = alarm.state
        if new is not old:
            alarm.state, alarm.since = new, self._clock.now()
        if new is AlarmState.UNACK:
            alarm.acked_by = None
        body: dict[str, Any] = {
            "alarm": alarm.id,
            "state": new.value,
            "old": old.value,
            "active": alarm.active,
            "priority": alarm.priority.value,
            "message": alarm.message,
            "cause": cause,
        }
        optional = {
            "value": alarm.value,
            "detail": alarm.detail or None,
            "who": who,
            "shelved_until": alarm.shelved_until.isoformat() if alarm.shelved_until else None,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        level = log.warning if new is AlarmState.UNACK else log.info
        level("alarm_changed", alarm=alarm.id, old=old.value, new=new.value, cause=cause)
        await self._sink("alarm", body)
        if new is AlarmState.UNACK and old is not AlarmState.UNACK:
            self._annunciated.append(self._clock.monotonic())
            await self._check_flood()

    async def _audit(
        self, action: str, alarm: _Alarm, who: str, reason: str, new: AlarmState, **extra: Any
    ) -> None:
        body = {"action": f"alarm_{action}", "alarm": alarm.id, "who": who, "why": reason}
        await self._sink("audit", {**body, "old": alarm.state.value, "new": new.value, **extra})

    async def _refuse(
        self, action: str, alarm_id: str, who: str, reason: str, problem: str
    ) -> NoReturn:
        log.warning("alarm_action_refused", alarm=alarm_id, action=action, who=who, reason=problem)
        body = {"action": f"alarm_{action}", "alarm": alarm_id, "who": who, "why": reason}
        await self._sink("audit", {**body, "refused": problem})
        raise AlarmRefused(alarm_id, action, problem)

    async def _check_flood(self) -> None:
        horizon = self._clock.monotonic() - self.flood_window
        while self._annunciated and self._annunciated[0] <= horizon:
            self._annunciated.popleft()
        count = len(self._annunciated)
        if not self._flooding and count > self.flood_count:
            self._flooding = True
        elif self._flooding and count < self.flood_end:
            self._flooding = False
        else:
            return
        flooding = self._flooding
        (log.warning if flooding else log.info)(
            "alarm_flood_begin" if flooding else "alarm_flood_end", count=count
        )
        window = f"{count} alarms in the last {self.flood_window / 60:g} min"
        body = {"alarm": FLOOD_ALARM, "state": "active" if flooding else "normal", "count": count}
        message = f"alarm flood: {window}" if flooding else f"alarm flood over: {window}"
        await self._sink("alarm", {**body, "priority": "high", "message": message})
