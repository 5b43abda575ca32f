"""Offline verification: every kind of tampering is found and the first bad record named.

The journal-level forgeries of issue 8 (checkpoints stripped, chain recomputed, forged tails,
faked prunes, attacker keys, rotations, unsigned checkpoint fields) are in test_forgery.py."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.journal.files import export, verify_path
from agent.journal.journal import Journal
from agent.record.format import JournalError, Kind, Record, UnitKeyError, checkpoint_body
from agent.record.keys import PublicKey, UnitKey, init_unit_key, load_public_key, load_unit_key
from agent.record.verify import ChainVerifier
from drivers.clock import ManualClock

# The fixture journal (checkpoint every 5 records):
#   1-5 events n=0..4 | 6 checkpoint | 7-11 events n=5..9 | 12 checkpoint | 13-14 events | 15 close


def make_journal(path: Path, key: UnitKey, unit: str = "unit-1") -> Path:
    clock = ManualClock(datetime(2026, 11, 25, 10, tzinfo=UTC))
    with Journal.open(path, unit=unit, signer=key, clock=clock, checkpoint_every=5) as journal:
        for n in range(12):
            journal.append_sync("event", {"n": n, "value": 37.0 + n / 10})
    return path


@pytest.fixture
def key() -> UnitKey:
    return UnitKey.generate()


@pytest.fixture
def db(tmp_path: Path, key: UnitKey) -> Path:
    return make_journal(tmp_path / "j.db", key)


def records_of(db: Path) -> list[bytes]:
    conn = sqlite3.connect(db)
    rows = [bytes(d) for (d,) in conn.execute("SELECT data FROM records ORDER BY seq")]
    conn.close()
    return rows


def sql(db: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(db)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def export_lines(db: Path, tmp_path: Path) -> tuple[Path, list[bytes]]:
    out = tmp_path / "export.jsonl"
    export(db, out)
    return out, out.read_bytes().splitlines()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def changed(data: bytes) -> bytes:
    """Record 3's value changed, everything else (seq, prev) as it was: canonical bytes."""
    fields = Record.parse(data).fields()
    fields["body"] = {**fields["body"], "value": 99.9}
    return Record.build(**fields).data


def rechain(datas: list[bytes], start: int, signer: UnitKey | None) -> list[bytes]:
    """Re-link every record from index ``start`` on (after a change), as a forger would;
    checkpoints are re-signed with ``signer`` or keep their old body."""
    out = datas[:start]
    prev = Record.parse(out[-1]).hash_hex if out else "0" * 64
    for data in datas[start:]:
        fields = Record.parse(data).fields()
        fields["prev"] = prev
        if fields["kind"] == "checkpoint" and signer is not None:
            fields["body"] = checkpoint_body(
                signer,
                unit=fields["unit"],
                seq=fields["seq"] - 1,
                head=prev,
                time=fields["time"],
                reason="forged",
            )
        record = Record.build(**fields)
        out.append(record.data)
        prev = record.hash_hex
    return out


def replace_db(db: Path, datas: list[bytes]) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM records")
    for data in datas:
        r = Record.parse(data)
        conn.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
            (r.seq, r.time, r.kind.value, r.run, r.hash, r.data),
        )
    conn.commit()
    conn.close()


# --- intact journals -------------------------------------------------------------------------


def test_intact_journal_verifies_with_the_enrolled_key(db: Path, key: UnitKey) -> None:
    """An untouched journal verifies: all records, all three checkpoints, nothing unsealed."""
    report = verify_path(db, key.public_key)
    assert report.ok, report.reason
    assert (report.count, report.checkpoints, report.unsealed, report.sealed_to) == (15, 3, 0, 15)
    assert report.signed_by == (key.key_id,) and report.key_source == "given"
    assert report.unit == "unit-1" and report.head_seq == 15


def test_export_verifies_like_the_database(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """An export holds the canonical records one per line and verifies with the hex key."""
    out, lines = export_lines(db, tmp_path)
    assert lines[1:] == records_of(db)
    report = verify_path(out, key.public_key.hex)
    assert report.ok and report.count == 15
    assert report.head_hash == verify_path(db, key.public_key).head_hash


def test_export_of_a_pruned_journal_verifies_from_its_anchor(tmp_path: Path, key: UnitKey) -> None:
    """After pruning, the export starts at the anchor recorded in its header and verifies."""
    path = tmp_path / "p.db"
    clock = ManualClock(datetime(2026, 11, 25, 10, tzinfo=UTC))
    with Journal.open(path, unit="unit-1", signer=key, clock=clock, checkpoint_every=5) as j:
        for n in range(12):
            j.append_sync("event", {"n": n})
        j.mark_acknowledged(8)
        asyncio.run(clock.advance(10))
        assert j.prune_sync(5) == 8
    out, _ = export_lines(path, tmp_path)
    report = verify_path(out, key.public_key)
    assert report.ok and report.anchor_seq == 8 and report.count == 7
    assert report.anchor_proof == f"pruned, anchor signed by key {key.key_id}"


# --- tampering -------------------------------------------------------------------------------


def test_changed_value_in_database(db: Path, key: UnitKey) -> None:
    """A value changed in place is caught by the row's stored hash, naming the record."""
    sql(db, "UPDATE records SET data = ? WHERE seq = 3", changed(records_of(db)[2]))
    report = verify_path(db, key.public_key)
    assert not report.ok and report.first_bad == 3
    assert "record 3: stored hash does not match" in report.reason


def test_changed_value_with_its_hash_column(db: Path, key: UnitKey) -> None:
    """Updating the hash column too does not help: record 4 still links to the old hash."""
    forged = Record.parse(changed(records_of(db)[2]))
    sql(db, "UPDATE records SET data = ?, hash = ? WHERE seq = 3", forged.data, forged.hash)
    report = verify_path(db, key.public_key)
    assert report.first_bad == 3 and "record 3 was changed" in report.reason


def test_changed_value_in_export(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """In an export, a changed record breaks the next record's link; the changed one is named."""
    out, lines = export_lines(db, tmp_path)
    lines[3] = changed(lines[3])
    report = verify_path(write_lines(out, lines), key.public_key)
    assert report.first_bad == 3 and "record 3 was changed" in report.reason


def test_rechained_after_a_change_fails_the_next_signature(db: Path, key: UnitKey) -> None:
    """Re-linking every later record after a change leaves the next checkpoint's signature
    (or its signed head) wrong, without the unit key."""
    datas = records_of(db)
    datas[2] = changed(datas[2])
    replace_db(db, rechain(datas, 3, signer=None))
    report = verify_path(db, key.public_key)
    assert report.first_bad == 6 and "checkpoint signs" in report.reason


def test_deleted_record(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """A deleted record is named as missing, in the database and in an export."""
    out, lines = export_lines(db, tmp_path)
    sql(db, "DELETE FROM records WHERE seq = 9")
    report = verify_path(db, key.public_key)
    assert report.first_bad == 9 and "record 10 follows record 8" in report.reason
    del lines[9]
    report = verify_path(write_lines(out, lines), key.public_key)
    assert report.first_bad == 9 and "missing" in report.reason


def test_reordered_records(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """Two records swapped are found: out of order in an export, misplaced rows in the DB."""
    out, lines = export_lines(db, tmp_path)
    lines[3], lines[4] = lines[4], lines[3]
    report = verify_path(write_lines(out, lines), key.public_key)
    assert report.first_bad == 3 and "out of order" in report.reason
    datas = records_of(db)
    sql(db, "UPDATE records SET data = ? WHERE seq = 3", datas[3])
    sql(db, "UPDATE records SET data = ? WHERE seq = 4", datas[2])
    report = verify_path(db, key.public_key)
    assert report.first_bad == 3 and "row 3 holds the bytes of record 4" in report.reason


def test_inserted_record(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """A forged record slipped in (correctly linked) pushes the genuine one out of place;
    renumbering everything after it instead breaks the next checkpoint."""
    out, lines = export_lines(db, tmp_path)
    original = Record.parse(lines[3])
    forged = Record.build(**(original.fields() | {"body": {"n": -1, "note": "inserted"}}))
    report = verify_path(write_lines(out, [*lines[:4], forged.data, *lines[4:]]), key.public_key)
    assert report.first_bad == 3 and "out of place" in report.reason
    datas = records_of(db)
    shifted = [Record.parse(d).fields() for d in datas[2:]]
    renumbered = [Record.build(**(f | {"seq": f["seq"] + 1})).data for f in shifted]
    replace_db(db, rechain([*datas[:2], forged.data, *renumbered], 3, signer=None))
    report = verify_path(db, key.public_key)
    assert report.first_bad == 7 and "checkpoint" in report.reason


def test_truncated_tail_needs_an_external_head(db: Path, key: UnitKey) -> None:
    """Cutting records after the last checkpoint leaves a valid shorter chain; it is caught
    against the acknowledged head (here given as expect)."""
    head = Record.parse(records_of(db)[-1])
    sql(db, "DELETE FROM records WHERE seq >= 13")
    assert verify_path(db, key.public_key).ok  # alone, indistinguishable from an older copy
    report = verify_path(db, key.public_key, expect=(head.seq, head.hash_hex))
    assert report.first_bad == 13 and "tail truncated" in report.reason


def test_truncated_tail_against_the_journals_own_acknowledgement(
    tmp_path: Path, key: UnitKey
) -> None:
    """A journal that recorded an acknowledgement refuses a tail cut below it."""
    path = tmp_path / "a.db"
    clock = ManualClock(datetime(2026, 11, 25, 10, tzinfo=UTC))
    with Journal.open(path, unit="unit-1", signer=key, clock=clock, checkpoint_every=5) as j:
        for n in range(12):
            j.append_sync("event", {"n": n})
        j.mark_acknowledged(14)
    sql(path, "DELETE FROM records WHERE seq >= 12")  # including a checkpoint
    report = verify_path(path, key.public_key)
    assert report.first_bad == 12 and "record 14 was acknowledged" in report.reason


def test_replayed_from_another_unit(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """A record of another unit (same key, same seq, same prev) is refused as foreign."""
    other = make_journal(tmp_path / "other.db", key, unit="unit-2")
    out, lines = export_lines(db, tmp_path)
    foreign = Record.parse(records_of(other)[0])
    assert foreign.seq == 1 and foreign.prev == Record.parse(lines[1]).prev
    lines[1] = foreign.data
    report = verify_path(write_lines(out, lines), key.public_key)
    assert report.first_bad == 1 and "replayed from another unit" in report.reason


def test_whole_journal_of_another_unit_in_the_database(
    db: Path, key: UnitKey, tmp_path: Path
) -> None:
    """Records of another unit copied into a unit's database are refused at the first one."""
    replace_db(db, records_of(make_journal(tmp_path / "other.db", key, unit="unit-2")))
    report = verify_path(db, key.public_key)
    assert report.first_bad == 1 and "belongs to unit 'unit-2'" in report.reason


def test_resigned_with_another_key(db: Path, key: UnitKey) -> None:
    """A forger who changes a record, re-links and re-signs with their own key passes only if
    the verifier trusts the key the journal names; the enrolled key exposes them."""
    forger = UnitKey.generate()
    datas = records_of(db)
    datas[2] = changed(datas[2])
    replace_db(db, rechain(datas, 3, signer=forger))
    sql(db, "INSERT INTO meta VALUES (?, ?)", f"key:{forger.key_id}", forger.public_key.b64)
    report = verify_path(db, key.public_key)
    assert report.first_bad == 6 and "re-signed with another key" in report.reason
    assert forger.key_id in report.reason


def test_verification_needs_a_key_from_the_caller(db: Path) -> None:
    """Without a key from outside nothing is verified: the journal's own claims prove nothing."""
    with pytest.raises(JournalError, match="a public key is needed"):
        verify_path(db, [])


def test_forged_signature_bytes(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """A checkpoint whose signature bytes were altered fails verification, named."""
    out, lines = export_lines(db, tmp_path)
    fields = Record.parse(lines[6]).fields()
    sig = fields["body"]["sig"]
    fields["body"] = {**fields["body"], "sig": ("B" if sig[0] == "A" else "A") + sig[1:]}
    lines[6] = Record.build(**fields).data
    report = verify_path(write_lines(out, rechain_lines(lines, 7)), key.public_key)
    assert report.first_bad == 6 and "signature does not verify" in report.reason


def rechain_lines(lines: list[bytes], start: int) -> list[bytes]:
    """rechain for export lines (the header line stays first)."""
    return [lines[0], *rechain(lines[1:], start - 1, signer=None)]


def test_unreadable_line_is_named(db: Path, key: UnitKey, tmp_path: Path) -> None:
    """A line that is not a canonical record is named by the seq expected there."""
    out, lines = export_lines(db, tmp_path)
    lines[5] = lines[5].replace(b'"kind":"event"', b'"kind": "event"')
    report = verify_path(write_lines(out, lines), key.public_key)
    assert report.first_bad == 5 and "canonical" in report.reason


# --- the incremental verifier the control site uses -----------------------------------------


def test_incremental_verification_from_a_stored_head(db: Path, key: UnitKey) -> None:
    """Batches verify on top of a stored head; a different record at an acknowledged seq is
    refused."""
    datas = records_of(db)
    keys = {key.key_id: key.public_key}
    first = ChainVerifier(unit="unit-1", keys=keys)
    for data in datas[:6]:
        first.feed(data)
    later = ChainVerifier(unit="unit-1", keys=keys, anchor_seq=first.seq, anchor_hash=first.hash)
    for data in datas[6:]:
        assert later.feed(data).kind in (Kind.EVENT, Kind.CHECKPOINT)
    assert later.report().ok and later.report().checkpoints == 2
    acknowledged = Record.parse(datas[2])
    again = ChainVerifier(keys=keys, expect=(3, acknowledged.hash_hex))  # from record 1
    again.feed(datas[0])
    again.feed(datas[1])
    with pytest.raises(Exception, match="record 3: differs from the acknowledged record"):
        again.feed(Record.build(**(acknowledged.fields() | {"body": {"n": 0}})).data)


# --- unit keys -------------------------------------------------------------------------------


def test_init_unit_key_writes_private_key_0600(tmp_path: Path) -> None:
    """keys init writes unit.key readable only by its owner and unit.pub as base64."""
    key, public_b64 = init_unit_key(tmp_path / "state")
    assert (tmp_path / "state" / "unit.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state" / "unit.pub").read_text().strip() == public_b64
    assert load_public_key(tmp_path / "state" / "unit.pub") == key.public_key
    assert load_unit_key(tmp_path / "state").key_id == key.key_id


def test_init_unit_key_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    """An existing key is kept unless force is given (a new key needs a new enrolment)."""
    first, _ = init_unit_key(tmp_path)
    with pytest.raises(UnitKeyError, match="already exists"):
        init_unit_key(tmp_path)
    second, _ = init_unit_key(tmp_path, force=True)
    assert second.key_id != first.key_id == first.public_key.key_id
    assert load_unit_key(tmp_path).key_id == second.key_id


def test_load_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    """A unit.key readable by group or others is refused, naming the mode."""
    init_unit_key(tmp_path)
    (tmp_path / "unit.key").chmod(0o644)
    with pytest.raises(UnitKeyError, match="mode 0644"):
        load_unit_key(tmp_path)


def test_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    """Loading a key that does not exist points at `bedside keys init`."""
    with pytest.raises(UnitKeyError, match="keys init"):
        load_unit_key(tmp_path)


def test_public_key_export_and_parse() -> None:
    """The public key reads back from base64 or hex; its id is 16 hex digits of its SHA-256."""
    key = UnitKey.generate()
    assert PublicKey.parse(key.public_key.b64) == PublicKey.parse(key.public_key.hex)
    assert key.key_id == hashlib.sha256(key.public_key.raw).hexdigest()[:16]
    with pytest.raises(UnitKeyError, match="neither hex nor base64"):
        PublicKey.parse("not a key!")
    signature = key.sign(b"data")
    assert key.public_key.verify(signature, b"data")
    assert not key.public_key.verify(signature, b"date")
