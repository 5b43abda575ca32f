"""Tamper alarms: which refusals raise one, what text they keep, and how a flood is bounded.

A tamper alarm is evidence that an enrolled unit sent something its journal should never hold
(a changed, missing or foreign record, a checkpoint signed by another key). Only a request that
proves the unit's key raises one (``controlsite.ingest``): a stranger, or anyone with a wrong
signature, is refused without a single row written, so nobody can fill the table or plant a
false alarm against a unit whose key they do not hold.

The text kept is bounded and inert. Reasons may quote record content (a unit id, a key id, a
checkpoint's ``signed`` member), which a forger chooses: ``clean_text`` cuts it to ``TEXT_LIMIT``
characters, writes control, format and separator characters (ANSI escapes, NUL, bidi overrides)
as ``\\xNN``/``\\uNNNN`` and markup characters as HTML entities, so a reason can be shown on a
terminal or a web page as it is, and stored in PostgreSQL (whose text refuses NUL).

Repeats and floods are handled in the database (``Store.add_alarm``), so any number of ingest
processes agree: an alarm's ``key`` is a hash of its error, seq and reason, and a repeat bumps
that row's count; a unit gets at most ``limit`` new alarm rows per ``window`` seconds, after
which one overflow row per window counts the rest (their detail is in the log).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.record.format import format_time
from controlsite.store.base import NewAlarm, Store

TEXT_LIMIT = 400
ALARM_LIMIT = 20
ALARM_WINDOW = 3600.0
OVERFLOW = "overflow"

_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
# control, format (bidi overrides), surrogate, private, unassigned, and separators but " "
_INERT_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def clean_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` safe to store and show: at most ``limit`` characters of it, control, format and
    separator characters escaped as ``\\xNN``/``\\uNNNN``, ``< > &`` as HTML entities, and a
    note of how much was cut. Reads no more of ``text`` than it keeps (a 1 MB reason is cheap)."""
    out: list[str] = []
    for ch in text[:limit]:
        entity = _ENTITIES.get(ch)
        if entity is not None:
            out.append(entity)
        elif ch != " " and unicodedata.category(ch) in _INERT_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    if len(text) > limit:
        out.append(f" ...[{len(text) - limit} more characters]")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class AlarmPolicy:
    """How many distinct alarm rows a unit may gain per window (the rest are counted)."""

    limit: int = ALARM_LIMIT
    window: float = ALARM_WINDOW

    def record(
        self, store: Store, unit: str, now: datetime, error: str, reason: str, seq: int | None
    ) -> None:
        """Record a tamper alarm of the enrolled, authenticated ``unit``; ``reason`` is the raw
        text, cleaned here, so that no caller can store it uncleaned."""
        text = clean_text(reason)
        key = hashlib.sha256(f"{error}\n{seq}\n{text}".encode()).hexdigest()[:32]
        stamp = int(now.timestamp() // self.window * self.window)
        start = format_time(datetime.fromtimestamp(stamp, UTC))
        when = format_time(now)
        overflow = NewAlarm(
            unit=unit,
            time=when,
            error=OVERFLOW,
            reason=(
                f"more than {self.limit} different tamper alarms of unit {unit} since {start}: "
                "the rest are counted here (details in the control site's log)"
            ),
            seq=None,
            key=f"{OVERFLOW}/{start}",
        )
        alarm = NewAlarm(unit=unit, time=when, error=error, reason=text, seq=seq, key=key)
        store.add_alarm(alarm, overflow, window_start=start, limit=self.limit)
