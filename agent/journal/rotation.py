"""Rotating the unit key without breaking the chain (``bedside keys rotate``).

The agent must be stopped (the journal's lock says so). The steps, each safe to interrupt:

1. a new key is written to ``unit.key.next`` (0600);
2. the journal gets a rotation checkpoint signed by the current key and by the new one
   (docs/record-format.md §3.1), and is closed with a checkpoint signed by the new key;
3. ``unit.key.next`` replaces ``unit.key`` and ``unit.pub`` is rewritten.

Interrupted after step 2, the agent refuses to start (its key no longer holds the chain); running
the command again finds the journal already handed to ``unit.key.next`` and finishes step 3.
Not yet done: the control site does not follow a rotation by itself (its ingest checks request
and checkpoint signatures against the key enrolled there), so a rotated unit's uplink is refused
until the control site's enrolment is updated; rotation today serves offline verification and
the unit's own start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.journal.files import connect_readonly, read_meta, verify_path
from agent.journal.journal import Journal
from agent.record.format import JournalError
from agent.record.keys import UnitKey, load_key_file, load_unit_key, write_key_files
from drivers.clock import SystemClock

NEXT_FILE = "unit.key.next"
JOURNAL_FILE = "journal.db"


@dataclass(frozen=True)
class Rotation:
    """What a rotation did: the old and new key ids, the rotation record, whether it resumed."""

    old_key_id: str
    new_key_id: str
    public_key: str
    seq: int | None
    resumed: bool


def _held_by(journal: Path, key: UnitKey) -> bool:
    """Whether ``key`` holds the journal's chain now (its last rotation handed it over)."""
    report = verify_path(journal, key.public_key, allow_unsealed=True)
    return report.ok and bool(report.rotations) and report.rotations[-1][2] == key.key_id


def rotate_unit_key(state_dir: str | Path, reason: str = "key rotation") -> Rotation:
    """Rotate the unit key of the stopped agent whose state is in ``state_dir``."""
    state = Path(state_dir)
    journal, next_path = state / JOURNAL_FILE, state / NEXT_FILE
    old = load_unit_key(state)
    if next_path.exists():
        pending = load_key_file(next_path)
        if journal.exists() and _held_by(journal, pending):
            write_key_files(state, pending)
            next_path.unlink()
            return Rotation(old.key_id, pending.key_id, pending.public_key.b64, None, True)
        next_path.unlink()  # an earlier attempt stopped before the journal took it: start over
    new = UnitKey.generate()
    write_key_files(state, new, key_name=NEXT_FILE, public=False)
    seq = None
    if journal.exists():
        conn = connect_readonly(journal)
        try:
            unit = read_meta(conn).get("unit")
        finally:
            conn.close()
        if unit is None:
            raise JournalError(f"{journal} names no unit: not a journal to rotate")
        try:
            with Journal.open(journal, unit=unit, signer=old, clock=SystemClock()) as j:
                seq = j.rotate_key_sync(new, reason).seq
        except BaseException:
            if not _held_by(journal, new):  # the journal never took it: nothing to resume
                next_path.unlink(missing_ok=True)
            raise
    write_key_files(state, new)
    next_path.unlink()
    return Rotation(old.key_id, new.key_id, new.public_key.b64, seq, False)
