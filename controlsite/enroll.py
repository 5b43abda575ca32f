"""Enrolment: the control site learns a unit's id and public key before accepting its records.

The unit's ``unit.pub`` (base64 of the raw Ed25519 key, written by ``bedside keys init``) is
carried to the control site by an operator and enrolled with
``bedside control-site enroll --unit <id> --key <base64>``. Enrolling the same unit with the
same key again is harmless; another key for an enrolled unit is refused, since every stored
checkpoint of that unit was verified against the first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog

from agent.record.format import UnitKeyError, format_time
from agent.record.keys import PublicKey
from controlsite.store.base import EnrolmentError, Store, check_unit_id, open_store

log = structlog.get_logger(__name__)


def enroll_unit(
    store: Store, unit: str, pubkey: str, *, when: datetime | None = None
) -> dict[str, Any]:
    """Enrol ``unit`` with the public key ``pubkey`` (base64 or hex) in ``store``."""
    check_unit_id(unit)
    try:
        key = PublicKey.parse(pubkey)
    except UnitKeyError as exc:
        raise EnrolmentError(f"unit {unit!r}: {exc}") from exc
    enrolled = store.enroll(unit, key, format_time(when or datetime.now(UTC)))
    log.info("unit_enrolled", unit=unit, key_id=key.key_id, head_seq=enrolled.head_seq)
    return enrolled.as_dict()


def enroll(db_url: str, unit: str, pubkey_b64: str) -> dict[str, Any]:
    """Enrol ``unit`` in the control-site database at ``db_url``; returns the unit as a dict
    (id, public_key, key_id, enrolled_at, head_seq, head_hash)."""
    store = open_store(db_url)
    try:
        return enroll_unit(store, unit, pubkey_b64)
    finally:
        store.close()
