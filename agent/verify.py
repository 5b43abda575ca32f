"""Offline verification of a journal: a SQLite file or an export, record by record.

``ChainVerifier`` checks a stream of canonical records incrementally (the control site's ingest
feeds it batch after batch, starting from the head it stores); ``verify_path`` runs it over a
journal file or export and says whether it holds, naming the first bad record and why.

What is checked, per record: canonical bytes; the unit; seq contiguous after the anchor; ``prev``
equal to the previous record's hash; for a SQLite file, the row's columns against the bytes; for
a checkpoint, that it signs exactly (unit, previous seq, previous hash, its own time) with a
known key. A tail cut off after the last checkpoint leaves a valid shorter chain: it is found only
against an external head (``expect``: the control site's acknowledged seq and hash, or the
journal's own record of the last acknowledgement). ``first_bad`` is the earliest record that can
no longer be trusted.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.keys import PublicKey
from agent.records import (
    ZERO_HASH,
    ChainBroken,
    JournalStorageError,
    Kind,
    Record,
    RecordFormatError,
    canonical,
    checkpoint_payload,
)

EXPORT_FORMAT = "bedside-journal-export/1"
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification. ``unsealed`` counts records after the last checkpoint
    (chained but not yet covered by a signature)."""

    ok: bool
    count: int
    first_bad: int | None = None
    reason: str = ""
    unit: str | None = None
    anchor_seq: int = 0
    head_seq: int = 0
    head_hash: str = ZERO_HASH
    checkpoints: int = 0
    unsealed: int = 0
    signatures_checked: bool = False
    key_source: str = "none"
    key_ids: tuple[str, ...] = field(default_factory=tuple)


class ChainVerifier:
    """Verify records one at a time after an anchor (seq 0 and 64 zeros for a whole journal).

    ``keys`` maps key ids to public keys; without keys, checkpoint signatures are not checked
    (``signatures_checked`` stays false). ``expect`` is an external (seq, hash hex) the chain
    must contain. ``feed`` raises ``ChainBroken`` at the first bad record.
    """

    def __init__(
        self,
        *,
        unit: str | None = None,
        keys: Mapping[str, PublicKey] | None = None,
        anchor_seq: int = 0,
        anchor_hash: str = ZERO_HASH,
        expect: tuple[int, str] | None = None,
    ) -> None:
        self.unit = unit
        self.keys = dict(keys) if keys is not None else None
        self.anchor_seq = anchor_seq
        self.seq = anchor_seq
        self.hash = anchor_hash
        self.expect = expect
        self.count = 0
        self.checkpoints = 0
        self.last_checkpoint_seq = 0
        self.key_ids: set[str] = set()

    def feed(
        self, data: bytes, *, row: tuple[int, str, str, str | None, bytes] | None = None
    ) -> Record:
        """Check the next record; ``row`` is a SQLite row's (seq, time, kind, run, hash)."""
        expected = self.seq + 1
        try:
            record = Record.parse(data)
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
        if self.expect and record.seq == self.expect[0] and record.hash_hex != self.expect[1]:
            raise ChainBroken(
                record.seq,
                f"differs from the acknowledged record (hash {record.hash_hex[:16]}..., "
                f"acknowledged {self.expect[1][:16]}...)",
            )
        self.seq, self.hash = record.seq, record.hash_hex
        self.count += 1
        return record

    def _check_row(self, record: Record, row: tuple[int, str, str, str | None, bytes]) -> None:
        seq, time, kind, run, stored_hash = row
        if record.seq != seq:
            raise ChainBroken(seq, f"row {seq} holds the bytes of record {record.seq}")
        if bytes(stored_hash) != record.hash:
            raise ChainBroken(seq, "stored hash does not match the record's bytes (changed)")
        if (time, kind, run) != (record.time, record.kind.value, record.run):
            raise ChainBroken(seq, "the row's time/kind/run columns differ from its bytes")

    def _check_checkpoint(self, record: Record) -> None:
        body = record.body
        expected: dict[str, Any] = {
            "unit": record.unit,
            "seq": record.seq - 1,
            "head": record.prev,
            "time": record.time,
        }
        if body.get("signed") != expected:
            raise ChainBroken(
                record.seq,
                f"checkpoint signs {body.get('signed')!r} but follows record {record.seq - 1} "
                f"with hash {record.prev[:16]}...",
            )
        key_id = body.get("key")
        try:
            sig = base64.b64decode(str(body.get("sig")), validate=True)
        except (ValueError, binascii.Error):
            raise ChainBroken(record.seq, "checkpoint signature is not base64") from None
        if self.keys is not None:
            key = self.keys.get(str(key_id))
            if key is None:
                known = ", ".join(sorted(self.keys)) or "none"
                raise ChainBroken(
                    record.seq,
                    f"checkpoint signed by key {key_id}, not the unit's key ({known}): "
                    "re-signed with another key",
                )
            payload = checkpoint_payload(record.unit, record.seq - 1, record.prev, record.time)
            if not key.verify(sig, payload):
                raise ChainBroken(
                    record.seq,
                    f"checkpoint signature does not verify with key {key_id}: records after "
                    f"checkpoint {self.last_checkpoint_seq} were rewritten",
                )
        self.key_ids.add(str(key_id))
        self.checkpoints += 1
        self.last_checkpoint_seq = record.seq

    def finish(self) -> None:
        """Check the end of the stream against ``expect`` (truncation)."""
        if self.expect is not None and self.expect[0] > self.seq:
            raise ChainBroken(
                self.seq + 1,
                f"missing: the journal ends at record {self.seq} but record {self.expect[0]} "
                "was acknowledged (tail truncated)",
            )

    def report(self, error: ChainBroken | None = None, *, key_source: str = "none") -> VerifyReport:
        """The report so far, failed at ``error`` if given."""
        sealed_to = self.last_checkpoint_seq or self.anchor_seq
        return VerifyReport(
            ok=error is None,
            count=self.count,
            first_bad=error.seq if error else None,
            reason=str(error) if error else "",
            unit=self.unit,
            anchor_seq=self.anchor_seq,
            head_seq=self.seq,
            head_hash=self.hash,
            checkpoints=self.checkpoints,
            unsealed=self.seq - sealed_to,
            signatures_checked=self.keys is not None and self.checkpoints > 0,
            key_source=key_source,
            key_ids=tuple(sorted(self.key_ids)),
        )


def verify_records(
    records: Iterable[bytes], verifier: ChainVerifier, *, key_source: str = "none"
) -> VerifyReport:
    """Feed every record to ``verifier`` and report."""
    try:
        for data in records:
            verifier.feed(data)
        verifier.finish()
    except ChainBroken as exc:
        return verifier.report(exc, key_source=key_source)
    return verifier.report(key_source=key_source)


# --- journal files and exports ---------------------------------------------------------------


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a journal file (safe while the agent writes it: WAL)."""
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("SELECT 1 FROM records LIMIT 1")
    except sqlite3.Error as exc:
        raise JournalStorageError(f"{path} is not a readable journal: {exc}") from exc
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    """The journal's ``meta`` table (unit, anchor, acknowledgement, public keys)."""
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def meta_keys(meta: Mapping[str, str]) -> dict[str, PublicKey]:
    """Public keys the journal itself records (``key:<id>``): self-asserted, not enrolled."""
    keys = {}
    for name, value in meta.items():
        if name.startswith("key:"):
            key = PublicKey.parse(value)
            keys[key.key_id] = key
    return keys


def meta_ack(meta: Mapping[str, str]) -> tuple[int, str] | None:
    """The last acknowledgement the journal recorded, as (seq, hash hex)."""
    if int(meta.get("acked_seq", "0")) <= 0:
        return None
    return int(meta["acked_seq"]), meta["acked_hash"]


def iter_rows(
    conn: sqlite3.Connection, after_seq: int = 0
) -> Iterator[tuple[bytes, tuple[int, str, str, str | None, bytes]]]:
    """(data, (seq, time, kind, run, hash)) of every record after ``after_seq``, in seq order."""
    cursor = conn.execute(
        "SELECT seq, time, kind, run, hash, data FROM records WHERE seq > ? ORDER BY seq",
        (after_seq,),
    )
    for seq, time, kind, run, stored_hash, data in cursor:
        # a tampered row may hold text or NULL: compare it as bytes rather than crash
        yield _as_bytes(data), (seq, time, kind, run, _as_bytes(stored_hash))


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8") if value is not None else b""


def _verify_db(
    path: Path, given: dict[str, PublicKey] | None, expect: tuple[int, str] | None
) -> VerifyReport:
    conn = connect_readonly(path)
    try:
        meta = read_meta(conn)
        keys, source = (given, "given") if given is not None else (meta_keys(meta), "journal")
        verifier = ChainVerifier(
            unit=meta.get("unit"),
            keys=keys,
            anchor_seq=int(meta.get("anchor_seq", "0")),
            anchor_hash=meta.get("anchor_hash", ZERO_HASH),
            expect=expect or meta_ack(meta),
        )
        try:
            for data, row in iter_rows(conn):
                verifier.feed(data, row=row)
            verifier.finish()
        except ChainBroken as exc:
            return verifier.report(exc, key_source=source)
        except sqlite3.Error as exc:
            error = ChainBroken(verifier.seq + 1, f"unreadable row: {exc}")
            return verifier.report(error, key_source=source)
        return verifier.report(key_source=source)
    finally:
        conn.close()


def _verify_export(
    path: Path, given: dict[str, PublicKey] | None, expect: tuple[int, str] | None
) -> VerifyReport:
    with path.open("rb") as lines:
        first = lines.readline()
        try:
            parsed = json.loads(first) if first.strip() else None
        except ValueError:
            parsed = None
        header: dict[str, Any] = {}
        if isinstance(parsed, dict) and parsed.get("export") == EXPORT_FORMAT:
            header = parsed
        header_keys = {k: PublicKey.parse(v) for k, v in header.get("keys", {}).items()}
        keys, source = (given, "given") if given is not None else (header_keys, "export")
        acked = header.get("acked")
        verifier = ChainVerifier(
            unit=header.get("unit"),
            keys=keys,
            anchor_seq=int(header.get("anchor_seq", 0)),
            anchor_hash=str(header.get("anchor_hash", ZERO_HASH)),
            expect=expect or ((int(acked[0]), str(acked[1])) if acked else None),
        )
        records = itertools.chain([] if header else [first], lines)
        stripped = (line.rstrip(b"\n") for line in records)
        return verify_records((line for line in stripped if line), verifier, key_source=source)


def verify_path(
    path: str | Path,
    public_key: PublicKey | str | None = None,
    *,
    expect: tuple[int, str] | None = None,
) -> VerifyReport:
    """Verify a journal SQLite file or an export file.

    ``public_key`` is the enrolled key (a ``PublicKey``, or its base64/hex); without it the
    keys the journal names for itself are used, which proves integrity of the chain but not who
    signed it. ``expect`` is an external (seq, hash) the journal must still contain.
    """
    file = Path(path)
    given = None
    if public_key is not None:
        key = public_key if isinstance(public_key, PublicKey) else PublicKey.parse(public_key)
        given = {key.key_id: key}
    try:
        with file.open("rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise JournalStorageError(f"cannot read {file}: {exc}") from exc
    if magic == SQLITE_MAGIC:
        return _verify_db(file, given, expect)
    return _verify_export(file, given, expect)


def export(source: Any, dest: str | Path) -> int:
    """Write a journal (a ``Journal`` or the path of its file) as an export: a header line, then
    one canonical record per line. Returns the number of records written."""
    db_path = Path(getattr(source, "path", source))
    conn = connect_readonly(db_path)
    count = 0
    try:
        meta = read_meta(conn)
        ack = meta_ack(meta)
        header = {
            "export": EXPORT_FORMAT,
            "unit": meta.get("unit"),
            "anchor_seq": int(meta.get("anchor_seq", "0")),
            "anchor_hash": meta.get("anchor_hash", ZERO_HASH),
            "acked": list(ack) if ack else None,
            "keys": {kid: key.b64 for kid, key in meta_keys(meta).items()},
        }
        tmp = Path(dest).with_name(Path(dest).name + ".tmp")
        with tmp.open("wb") as out:
            out.write(canonical(header, what="header") + b"\n")
            for data, _row in iter_rows(conn):
                out.write(data + b"\n")
                count += 1
        tmp.replace(dest)
    except (sqlite3.Error, OSError) as exc:
        raise JournalStorageError(f"cannot export {db_path} to {dest}: {exc}") from exc
    finally:
        conn.close()
    return count
