"""Journal files and exports: read a journal's SQLite file, verify a file offline, export.

``verify_path(path, keys)`` verifies a journal file (SQLite) or an export (JSON lines) with the
keys the caller trusts, never keys the file names for itself. ``export`` writes a whole journal,
``export_run`` the self-contained extract of one run: from the checkpoint before the run's
first record (which vouches for where the extract starts) to the first checkpoint after its
last (which covers it). The formats are specified in docs/record-format.md §6.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.record.format import (
    ZERO_HASH,
    ChainBroken,
    JournalError,
    JournalStorageError,
    Kind,
    Record,
    canonical,
)
from agent.record.keys import PublicKey
from agent.record.verify import ChainVerifier, Row, VerifyReport, root_keys

EXPORT_FORMAT = "bedside-journal-export/2"
SQLITE_MAGIC = b"SQLite format 3\x00"
TERMINAL = frozenset({"Complete", "Stopped", "Aborted"})


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a journal file (safe while the agent writes it: WAL)."""
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("SELECT 1 FROM records LIMIT 1")
    except sqlite3.Error as exc:
        raise JournalStorageError(f"{path} is not a readable journal: {exc}") from exc
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    """The journal's ``meta`` table (unit, anchor, acknowledgement, head signature)."""
    return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta").fetchall()}


def meta_ack(meta: Mapping[str, str]) -> tuple[int, str] | None:
    """The last acknowledgement the journal recorded, as (seq, hash hex)."""
    seq = _int(meta.get("acked_seq", "0"), "meta acked_seq")
    return (seq, meta.get("acked_hash", "")) if seq > 0 else None


def meta_anchor(meta: Mapping[str, str]) -> tuple[int, str]:
    """The pruned anchor (seq, hash hex); (0, zeros) for a journal that starts at record 1."""
    return _int(meta.get("anchor_seq", "0"), "meta anchor_seq"), meta.get("anchor_hash", ZERO_HASH)


def _int(text: Any, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ChainBroken(None, f"{what} {text!r} is not an integer") from None
    if isinstance(text, bool) or value < 0:
        raise ChainBroken(None, f"{what} {text!r} is not an integer from 0")
    return value


def iter_rows(conn: sqlite3.Connection, after_seq: int = 0) -> Iterator[tuple[bytes, Row]]:
    """(data, (seq, time, kind, run, hash)) of every record after ``after_seq``, in seq order."""
    cursor = conn.execute(
        "SELECT seq, time, kind, run, hash, data FROM records WHERE seq > ? ORDER BY seq",
        (after_seq,),
    )
    for seq, time, kind, run, stored_hash, data in cursor:
        # a tampered row may hold text or NULL: compare it as bytes rather than crash
        yield _as_bytes(data), (seq, time, kind, run, _as_bytes(stored_hash))


def checkpoint_rows(conn: sqlite3.Connection) -> list[bytes]:
    """The bytes of every checkpoint record, in seq order (for ``root_keys``)."""
    rows = conn.execute("SELECT data FROM records WHERE kind = 'checkpoint' ORDER BY seq")
    return [_as_bytes(data) for (data,) in rows]


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8") if value is not None else b""


def trusted_keys(keys: PublicKey | str | Sequence[PublicKey | str]) -> dict[str, PublicKey]:
    """The caller's keys as {key id: key}; refuses none (a verdict needs a key from outside)."""
    items = [keys] if isinstance(keys, PublicKey | str) else list(keys)
    parsed = [k if isinstance(k, PublicKey) else PublicKey.parse(k) for k in items]
    if not parsed:
        raise JournalError(
            "a public key is needed: give the key enrolled at the control site (--public-key); "
            "the keys a journal names for itself prove nothing"
        )
    return {k.key_id: k for k in parsed}


# --- verification ----------------------------------------------------------------------------


def verify_path(
    path: str | Path,
    keys: PublicKey | str | Sequence[PublicKey | str],
    *,
    key_source: str = "given",
    allow_unsealed: bool = False,
    expect: tuple[int, str] | None = None,
) -> VerifyReport:
    """Verify a journal SQLite file or an export file with the caller's ``keys`` (the enrolled
    key, or a later one it rotated to). ``expect`` is an external (seq, hash) the journal must
    still contain; ``allow_unsealed`` accepts records after the last checkpoint (a live
    journal: they are still counted in ``unsealed``)."""
    given = trusted_keys(keys)
    file = Path(path)
    try:
        with file.open("rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise JournalStorageError(f"cannot read {file}: {exc}") from exc
    if magic == SQLITE_MAGIC:
        return _verify_db(file, given, key_source, allow_unsealed, expect)
    return _verify_export(file, given, key_source, allow_unsealed, expect)


def _verify_db(
    path: Path,
    given: dict[str, PublicKey],
    key_source: str,
    allow_unsealed: bool,
    expect: tuple[int, str] | None,
) -> VerifyReport:
    conn = connect_readonly(path)
    verifier: ChainVerifier | None = None
    try:
        meta = read_meta(conn)
        anchor_seq, anchor_hash = meta_anchor(meta)
        verifier = ChainVerifier(
            unit=meta.get("unit"),
            keys=root_keys(checkpoint_rows(conn), given),
            anchor_seq=anchor_seq,
            anchor_hash=anchor_hash,
            anchor_sig=meta.get("anchor_sig"),
            expect=expect or meta_ack(meta),
            key_source=key_source,
        )
        for data, row in iter_rows(conn):
            verifier.feed(data, row=row)
        verifier.finish(allow_unsealed=allow_unsealed)
    except ChainBroken as exc:
        if verifier is None:
            return VerifyReport(ok=False, count=0, first_bad=exc.seq, reason=str(exc))
        return verifier.report(exc)
    except sqlite3.Error as exc:
        assert verifier is not None
        return verifier.report(ChainBroken(verifier.seq + 1, f"unreadable row: {exc}"))
    finally:
        conn.close()
    return verifier.report()


def read_header(path: Path) -> dict[str, Any]:
    """An export's header line; refuses a file that is not an export of this format."""
    try:
        with path.open("rb") as lines:
            first = lines.readline(1 << 16)
    except OSError as exc:
        raise JournalStorageError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("export") != EXPORT_FORMAT:
        raise JournalError(
            f"{path} is neither a journal file nor a Bedside export ({EXPORT_FORMAT}): "
            "its first line is not an export header"
        )
    return header


def _verify_export(
    path: Path,
    given: dict[str, PublicKey],
    key_source: str,
    allow_unsealed: bool,
    expect: tuple[int, str] | None,
) -> VerifyReport:
    header = read_header(path)
    scope, run = header.get("scope"), header.get("run")
    found = header.get("anchor")
    anchor: dict[str, Any] = found if isinstance(found, dict) else {}
    acked = header.get("acked")
    try:
        verifier = ChainVerifier(
            unit=str(header.get("unit")),
            keys=root_keys(_lines(path, b'"kind":"checkpoint"'), given),
            anchor_seq=_int(anchor.get("seq", 0), "header anchor.seq"),
            anchor_hash=str(anchor.get("hash", ZERO_HASH)),
            anchor_sig=anchor.get("sig"),
            extract=scope == "run",
            expect=expect or (_ack(acked) if scope == "journal" else None),
            key_source=key_source,
        )
    except ChainBroken as exc:
        return VerifyReport(ok=False, count=0, first_bad=exc.seq, reason=str(exc))
    runs = RunTrace(str(run)) if scope == "run" else None
    try:
        for data in _lines(path):
            record = verifier.feed(data)
            if runs is not None:
                runs.see(record)
        verifier.finish(allow_unsealed=allow_unsealed)
        if runs is not None:
            runs.finish(verifier)
    except ChainBroken as exc:
        report = verifier.report(exc)
    else:
        report = verifier.report()
    return replace(report, scope=f"run {run}" if runs else "journal", run_ended=_ended(runs))


def _ended(runs: RunTrace | None) -> str | None:
    return runs.ended if runs is not None else None


def _ack(acked: Any) -> tuple[int, str] | None:
    if isinstance(acked, list) and len(acked) == 2:
        return _int(acked[0], "header acked"), str(acked[1])
    return None


def _lines(path: Path, containing: bytes = b"") -> Iterator[bytes]:
    """The record lines of an export (after its header), optionally only those holding
    ``containing`` (a cheap pre-filter)."""
    with path.open("rb") as lines:
        lines.readline(1 << 16)
        for line in lines:
            line = line.rstrip(b"\n")
            if line and containing in line:
                yield line


class RunTrace:
    """What a run extract must show: the run's ``run_started`` record (else its beginning was
    cut off) and, once it ended, its final state."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.started: int | None = None
        self.first: int | None = None
        self.ended: str | None = None

    def see(self, record: Record) -> None:
        """Note a record of the extract."""
        if record.run != self.run or record.kind is not Kind.EVENT:
            return
        if self.first is None:
            self.first = record.seq
        event = record.body.get("event")
        if event == "run_started" and self.started is None:
            self.started = record.seq
        elif event == "run_state" and record.body.get("new") in TERMINAL:
            self.ended = str(record.body["new"])

    def finish(self, verifier: ChainVerifier) -> None:
        """Raise ``ChainBroken`` unless the run's first event is its ``run_started``."""
        if self.started is None or self.started != self.first:
            raise ChainBroken(
                verifier.anchor_seq + 1,
                f"the extract does not hold the run_started record of run {self.run} before "
                "its other events: the beginning of the run is missing",
            )


# --- export ----------------------------------------------------------------------------------


def export(source: Any, dest: str | Path) -> int:
    """Write a whole journal (a ``Journal`` or the path of its file) as an export: a header
    line, then one canonical record per line. Returns the number of records written."""
    return _export(Path(getattr(source, "path", source)), Path(dest), None)


def export_run(source: Any, run: str, dest: str | Path) -> int:
    """Write the self-contained extract of ``run`` (see the module docstring)."""
    return _export(Path(getattr(source, "path", source)), Path(dest), run)


def _export(db_path: Path, dest: Path, run: str | None) -> int:
    conn = connect_readonly(db_path)
    try:
        meta = read_meta(conn)
        anchor_seq, anchor_hash = meta_anchor(meta)
        anchor: dict[str, Any] = {"seq": anchor_seq, "hash": anchor_hash}
        anchor["sig"] = meta.get("anchor_sig")
        first, last = anchor_seq, None
        if run is not None:
            first, last = _run_range(conn, run, anchor_seq)
            if first > anchor_seq:
                row = conn.execute("SELECT data FROM records WHERE seq = ?", (first + 1,))
                start = Record.parse(_as_bytes(row.fetchone()[0]), strict=False)
                anchor = {"seq": first, "hash": start.prev}
        header = {
            "export": EXPORT_FORMAT,
            "unit": meta.get("unit"),
            "scope": "run" if run is not None else "journal",
            "run": run,
            "anchor": anchor,
            "acked": list(ack) if (ack := meta_ack(meta)) and run is None else None,
        }
        rows = (d for d, (seq, *_rest) in iter_rows(conn, first) if last is None or seq <= last)
        return _write(dest, header, rows)
    except sqlite3.Error as exc:
        raise JournalStorageError(f"cannot export {db_path} to {dest}: {exc}") from exc
    finally:
        conn.close()


def _run_range(conn: sqlite3.Connection, run: str, anchor_seq: int) -> tuple[int, int | None]:
    """(the seq the extract starts after, the last seq it holds or None for the head)."""
    lo, hi = conn.execute("SELECT MIN(seq), MAX(seq) FROM records WHERE run = ?", (run,)).fetchone()
    if lo is None:
        raise JournalError(f"the journal holds no record of run {run!r}")
    before = conn.execute(
        "SELECT MAX(seq) FROM records WHERE kind = 'checkpoint' AND seq < ? AND seq > ?",
        (lo, anchor_seq),
    ).fetchone()[0]
    after = conn.execute(
        "SELECT MIN(seq) FROM records WHERE kind = 'checkpoint' AND seq >= ?", (hi,)
    ).fetchone()[0]
    start = before - 1 if before is not None else anchor_seq
    return start, after


def _write(dest: Path, header: dict[str, Any], rows: Iterable[bytes]) -> int:
    tmp = dest.with_name(dest.name + ".tmp")
    count = 0
    try:
        with tmp.open("wb") as out:
            out.write(canonical(header, what="header") + b"\n")
            for data in rows:
                out.write(data + b"\n")
                count += 1
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise JournalStorageError(f"cannot write the export {dest}: {exc}") from exc
    return count
