"""Verification of a unit's records: a chain that verifies is one no one could have forged.

``ChainVerifier`` checks a stream of canonical records incrementally (the control site's ingest
feeds it batch after batch, starting from the head it stores; ``agent.journal.files`` feeds it a
journal file or an export). Trust comes **only from the keys the caller gives** (the key
enrolled at the control site, or the unit's own key file), never from the records or the file.

Per record: canonical bytes; the unit; seq contiguous after the anchor; ``prev`` equal to the
previous record's hash; for a checkpoint, that it signs exactly (purpose, unit, previous seq,
previous hash, its own time, its reason[, a key rotation]) with a trusted key and has no other
member; for a signature record, that it binds the content it signs (``record_hash``) and the
journal record it is about (``subject``: seq and hash of an earlier record of the same run).

At the end (``finish``): an external head (``expect``) must be reached; a pruned journal's
anchor must carry a signature of a trusted key (or, for an extract, be vouched for by the
checkpoint the extract starts with); and every record must be **covered** by a later checkpoint
(records after the last one are *unsealed* and fail unless ``allow_unsealed``, for a live
journal). ``first_bad`` is always the earliest record that can no longer be trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.record.format import (
    CHECKPOINT_BODY,
    CHECKPOINT_PURPOSE,
    CHECKPOINT_SIGNED,
    MAX_REASON,
    ZERO_HASH,
    ChainBroken,
    Kind,
    Record,
    RecordFormatError,
    anchor_payload,
    canonical,
    head_payload,
)
from agent.record.keys import PublicKey

Row = tuple[int, str, str, str | None, bytes]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification.

    ``sealed_to`` is the last record a trusted signature covers; ``unsealed`` counts the
    records after it. ``anchor_proof`` says why the records before the first one may be absent
    (``"none"`` for a journal that starts at record 1). ``key_source`` says where the trusted
    keys came from, ``trusted`` lists them and ``signed_by`` the keys that actually signed."""

    ok: bool
    count: int
    first_bad: int | None = None
    reason: str = ""
    unit: str | None = None
    anchor_seq: int = 0
    anchor_proof: str = "none"
    first_seq: int = 0
    head_seq: int = 0
    head_hash: str = ZERO_HASH
    checkpoints: int = 0
    sealed_to: int = 0
    unsealed: int = 0
    signatures: int = 0
    key_source: str = ""
    trusted: tuple[str, ...] = ()
    signed_by: tuple[str, ...] = ()
    rotations: tuple[tuple[int, str, str], ...] = field(default_factory=tuple)
    scope: str = "journal"
    run_ended: str | None = None


def parse_signature(text: str | None) -> tuple[str, bytes] | None:
    """``"<key id>:<base64>"`` (as meta stores anchor and head signatures) or None."""
    if not text or ":" not in text:
        return None
    key_id, _, sig = text.partition(":")
    try:
        return key_id, base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        return None


def _b64(value: Any, what: str, seq: int) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (ValueError, binascii.Error):
        raise ChainBroken(seq, f"{what} is not base64") from None


class ChainVerifier:
    """Verify records one at a time after an anchor (seq 0 and 64 zeros for a whole journal).

    ``keys`` maps key ids to the trusted public keys; a checkpoint that rotates the key to a new
    one (signed by both) makes the new key the only trusted one from there on. ``expect`` is an
    external (seq, hash hex) the chain must contain. ``canonical_check=False`` (the agent's
    start-up, see ``Record.parse``) skips re-encoding each record. ``anchor_sig`` is the meta/header
    signature of a pruned journal's anchor; ``extract`` accepts instead an anchor vouched for by
    the first record being a checkpoint over it (a run export). ``feed`` raises ``ChainBroken``
    at the first bad record, ``finish`` at the first record the end checks condemn.
    """

    def __init__(
        self,
        *,
        keys: Mapping[str, PublicKey],
        unit: str | None = None,
        anchor_seq: int = 0,
        anchor_hash: str = ZERO_HASH,
        anchor_sig: str | None = None,
        extract: bool = False,
        expect: tuple[int, str] | None = None,
        key_source: str = "given",
        canonical_check: bool = True,
    ) -> None:
        if isinstance(anchor_seq, bool) or not isinstance(anchor_seq, int) or anchor_seq < 0:
            raise ChainBroken(None, f"anchor seq {anchor_seq!r} is not an integer from 0")
        self.unit = unit
        self.keys = dict(keys)
        self.trusted_ever = dict(keys)
        self.key_source = key_source
        self.canonical_check = canonical_check
        self.anchor_seq = anchor_seq
        self.anchor_hash = anchor_hash
        self.anchor_sig = anchor_sig
        self.anchor_proof = "none"
        self.extract = extract
        self.seq = anchor_seq
        self.hash = anchor_hash
        self.expect = expect
        self.count = 0
        self.checkpoints = 0
        self.last_checkpoint_seq = 0
        self.signatures = 0
        self.signed_by: set[str] = set()
        self.rotations: list[tuple[int, str, str]] = []
        # (hash, run) of the records a signature may be about: small, never samples
        self._subjects: dict[int, tuple[str, str | None]] = {}

    # --- per record --------------------------------------------------------------------------

    def feed(self, data: bytes, *, row: Row | None = None) -> Record:
        """Check the next record; ``row`` is a SQLite row's (seq, time, kind, run, hash)."""
        expected = self.seq + 1
        try:
            record = Record.parse(data, canonical_check=self.canonical_check)
        except RecordFormatError as exc:
            raise ChainBroken(row[0] if row else expected, f"unreadable: {exc}") from exc
        if row is not None:
            self._check_row(record, row)
        if self.unit is None:
            self.unit = record.unit
        elif record.unit != self.unit:
            raise ChainBroken(
                record.seq,
                f"belongs to unit {record.unit!r}, not {self.unit!r} (replayed from another unit)",
            )
        if record.seq > expected:
            raise ChainBroken(
                expected,
                f"missing or out of order: record {record.seq} follows record {expected - 1}",
            )
        if record.seq < expected:
            raise ChainBroken(
                record.seq,
                f"out of place: record {record.seq} follows record {expected - 1} "
                "(reordered, duplicated or inserted)",
            )
        if record.prev != self.hash:
            culprit = self.seq if self.seq > self.anchor_seq else record.seq
            raise ChainBroken(
                culprit,
                f"record {record.seq} holds prev {record.prev[:16]}... but record {self.seq} "
                f"hashes to {self.hash[:16]}...: record {self.seq} was changed, or record "
                f"{record.seq} inserted or re-linked",
            )
        if record.kind is Kind.CHECKPOINT:
            self._check_checkpoint(record)
        elif record.kind is Kind.SIGNATURE:
            self._check_signature(record)
        if record.kind not in (Kind.SAMPLES, Kind.CHECKPOINT):
            self._subjects[record.seq] = (record.hash_hex, record.run)
        if self.expect and record.seq == self.expect[0] and record.hash_hex != self.expect[1]:
            raise ChainBroken(
                record.seq,
                f"differs from the acknowledged record (hash {record.hash_hex[:16]}..., "
                f"acknowledged {self.expect[1][:16]}...)",
            )
        self.seq, self.hash = record.seq, record.hash_hex
        self.count += 1
        return record

    def _check_row(self, record: Record, row: Row) -> None:
        seq, time, kind, run, stored_hash = row
        if record.seq != seq:
            raise ChainBroken(seq, f"row {seq} holds the bytes of record {record.seq}")
        if bytes(stored_hash) != record.hash:
            raise ChainBroken(seq, "stored hash does not match the record's bytes (changed)")
        if (time, kind, run) != (record.time, record.kind.value, record.run):
            raise ChainBroken(seq, "the row's time/kind/run columns differ from its bytes")

    def _check_checkpoint(self, record: Record) -> None:
        body, seq = record.body, record.seq
        rotate = isinstance(body.get("signed"), dict) and "rotate" in body["signed"]
        members = CHECKPOINT_BODY | {"next_sig"} if rotate else CHECKPOINT_BODY
        if set(body) != members:
            raise ChainBroken(
                seq, f"checkpoint has members {sorted(body)}, not exactly {sorted(members)}"
            )
        signed = body["signed"]
        allowed = CHECKPOINT_SIGNED | {"rotate"} if rotate else CHECKPOINT_SIGNED
        expected = {
            "purpose": CHECKPOINT_PURPOSE,
            "unit": record.unit,
            "seq": seq - 1,
            "head": record.prev,
            "time": record.time,
        }
        if (
            not isinstance(signed, dict)
            or set(signed) != allowed
            or any(signed[k] != v for k, v in expected.items())
            or not isinstance(signed["reason"], str)
            or len(signed["reason"]) > MAX_REASON
        ):
            raise ChainBroken(
                seq,
                f"checkpoint signs {signed!r} but follows record {seq - 1} with hash "
                f"{record.prev[:16]}...",
            )
        key_id = str(body["key"])
        key = self.keys.get(key_id)
        if key is None:
            trusted = ", ".join(sorted(self.keys)) or "none"
            raise ChainBroken(
                seq,
                f"checkpoint signed by key {key_id}, not a trusted key of the unit ({trusted}):"
                " re-signed with another key",
            )
        payload = canonical(signed, what="signed")
        if not key.verify(_b64(body["sig"], "checkpoint signature", seq), payload):
            raise ChainBroken(
                seq,
                f"checkpoint signature does not verify with key {key_id}: records after "
                f"checkpoint {self.last_checkpoint_seq} were rewritten",
            )
        if rotate:
            self._rotate(seq, key, signed["rotate"], body["next_sig"], payload)
        if self.checkpoints == 0 and self.count == 0 and self.anchor_seq > 0 and self.extract:
            self.anchor_proof = f"checkpoint {seq} signs the anchor (an extract)"
        self.signed_by.add(key_id)
        self.checkpoints += 1
        self.last_checkpoint_seq = seq

    def _rotate(self, seq: int, old: PublicKey, rotate: Any, next_sig: Any, payload: bytes) -> None:
        try:
            if not isinstance(rotate, dict) or set(rotate) != {"from", "to"}:
                raise ValueError("rotate must be {from, to}")
            if PublicKey.parse(str(rotate["from"])) != old:
                raise ValueError("rotate.from is not the key that signed it")
            new = PublicKey.parse(str(rotate["to"]))
        except ValueError as exc:
            raise ChainBroken(seq, f"key rotation is malformed: {exc}") from None
        if not new.verify(_b64(next_sig, "next key signature", seq), payload):
            raise ChainBroken(seq, f"key rotation to {new.key_id} is not signed by that key")
        self.keys = {new.key_id: new}
        self.trusted_ever[new.key_id] = new
        self.rotations.append((seq, old.key_id, new.key_id))

    def _check_signature(self, record: Record) -> None:
        body, seq = record.body, record.seq
        content, subject = body.get("record"), body.get("subject")
        if not isinstance(content, dict) or not isinstance(subject, dict):
            raise ChainBroken(seq, "signature record lacks the signed record or its subject")
        digest = hashlib.sha256(canonical(content, what="signed record")).hexdigest()
        if body.get("record_hash") != digest:
            raise ChainBroken(
                seq, "signature's record_hash is not the hash of the record it holds (changed)"
            )
        target, target_hash = subject.get("seq"), subject.get("hash")
        if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < seq:
            raise ChainBroken(seq, f"signature's subject {target!r} is not an earlier record")
        if target > self.anchor_seq:
            found = self._subjects.get(target)
            if found is None or found[0] != target_hash or found[1] != record.run:
                raise ChainBroken(
                    seq,
                    f"signature is bound to record {target} with hash {str(target_hash)[:16]}..."
                    f", which is not a record of run {record.run} with that hash",
                )
        self.signatures += 1

    # --- at the end --------------------------------------------------------------------------

    def finish(self, *, allow_unsealed: bool = False) -> None:
        """The end checks: the external head, the anchor's proof, and coverage."""
        if self.expect is not None and self.expect[0] > self.seq:
            raise ChainBroken(
                self.seq + 1,
                f"missing: the journal ends at record {self.seq} but record {self.expect[0]} "
                "was acknowledged (tail truncated)",
            )
        if self.anchor_seq > 0 and self.anchor_proof == "none":
            self._check_anchor()
        if not allow_unsealed and self.seq > self.sealed_to:
            first = self.sealed_to + 1
            raise ChainBroken(
                first,
                f"unsealed: {self.seq - self.sealed_to} records ({first}-{self.seq}) are not "
                "covered by a checkpoint signed with a trusted key",
            )

    def _check_anchor(self) -> None:
        parsed = parse_signature(self.anchor_sig)
        key = self.trusted_ever.get(parsed[0]) if parsed else None
        payload = anchor_payload(str(self.unit), self.anchor_seq, self.anchor_hash)
        if key is None or parsed is None or not key.verify(parsed[1], payload):
            raise ChainBroken(
                self.anchor_seq + 1,
                f"records up to {self.anchor_seq} are absent and the anchor carries no valid "
                "signature of a trusted key: records may have been removed (a faked prune)",
            )
        self.anchor_proof = f"pruned, anchor signed by key {key.key_id}"

    @property
    def sealed_to(self) -> int:
        """The last record covered by a verified checkpoint (the anchor if none)."""
        return max(self.last_checkpoint_seq, self.anchor_seq)

    def report(self, error: ChainBroken | None = None) -> VerifyReport:
        """The report so far, failed at ``error`` if given."""
        return VerifyReport(
            ok=error is None,
            count=self.count,
            first_bad=error.seq if error else None,
            reason=str(error) if error else "",
            unit=self.unit,
            anchor_seq=self.anchor_seq,
            anchor_proof=self.anchor_proof,
            first_seq=self.anchor_seq + 1 if self.count else 0,
            head_seq=self.seq,
            head_hash=self.hash,
            checkpoints=self.checkpoints,
            sealed_to=self.sealed_to,
            unsealed=self.seq - self.sealed_to,
            signatures=self.signatures,
            key_source=self.key_source,
            trusted=tuple(sorted(self.trusted_ever)),
            signed_by=tuple(sorted(self.signed_by)),
            rotations=tuple(self.rotations),
        )


def verify_records(
    records: Iterable[bytes], verifier: ChainVerifier, *, allow_unsealed: bool = False
) -> VerifyReport:
    """Feed every record to ``verifier``, run the end checks and report."""
    try:
        for data in records:
            verifier.feed(data)
        verifier.finish(allow_unsealed=allow_unsealed)
    except ChainBroken as exc:
        return verifier.report(exc)
    return verifier.report()


def root_keys(checkpoints: Iterable[bytes], keys: Mapping[str, PublicKey]) -> dict[str, PublicKey]:
    """The keys to start verifying with, given the keys the caller trusts now.

    A key rotation is signed by both keys, so a key the caller trusts vouches for the key it
    replaced: walking the journal's rotations backwards from each trusted key yields the key
    the journal started with. Rotations whose new key's signature does not verify are ignored
    (the forward verification then fails on them)."""
    rotations: list[tuple[dict[str, Any], bytes, bytes]] = []
    for data in checkpoints:
        try:
            record = Record.parse(data, strict=False)
            if record.kind is not Kind.CHECKPOINT:
                continue
            body = record.body
            signed = body["signed"]
            if "rotate" in signed:
                sig = base64.b64decode(str(body["next_sig"]), validate=True)
                rotations.append((signed["rotate"], sig, canonical(signed, what="signed")))
        except (RecordFormatError, KeyError, TypeError, ValueError, binascii.Error):
            continue  # not a rotation the forward pass could accept either
    roots = {}
    for key in keys.values():
        current = key
        for rotate, sig, payload in reversed(rotations):
            try:
                if PublicKey.parse(str(rotate["to"])) == current and current.verify(sig, payload):
                    current = PublicKey.parse(str(rotate["from"]))
            except (ValueError, KeyError, TypeError):
                continue
        roots[current.key_id] = current
    return roots


def head_signed(unit: str, head: tuple[int, str], sig: str | None, key: PublicKey) -> bool:
    """Whether ``sig`` (``meta.head_sig``) is ``key``'s signature over the journal's head."""
    parsed = parse_signature(sig)
    if parsed is None or parsed[0] != key.key_id:
        return False
    return key.verify(parsed[1], head_payload(unit, head[0], head[1]))
