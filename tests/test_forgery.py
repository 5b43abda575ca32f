"""A journal that verifies is one no one could have forged (issue 8, first group).

Each case is what an attacker with a copy of a unit's journal (and maybe write access to it
while the agent is stopped) would try, run through the real ``bedside verify`` command or the
real journal start-up. The verifier trusts only the key it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.journal.files import export, export_run, verify_path
from agent.journal.journal import Journal
from agent.record.format import (
    ChainBroken,
    Kind,
    Record,
    anchor_payload,
    b64,
    canonical,
    checkpoint_body,
)
from agent.record.keys import UnitKey, init_unit_key, load_unit_key, write_key_files
from drivers.clock import ManualClock

START = datetime(2026, 11, 25, 10, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def key() -> UnitKey:
    return UnitKey.generate()


def bedside(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def verify_cli(path: Path, key: UnitKey, *extra: str) -> tuple[int, dict[str, Any]]:
    done = bedside("verify", str(path), "--public-key", key.public_key.b64, "--json", *extra)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


def journal(path: Path, key: UnitKey, n: int = 12, *, close: bool = True) -> Path:
    """A closed journal (checkpoint every 5): 1-5 events | 6 cp | 7-11 | 12 cp | 13-14 | 15 cp."""
    clock = ManualClock(START)
    j = Journal.open(path, unit="unit-1", signer=key, clock=clock, checkpoint_every=5)
    j.__enter__()
    for k in range(n):
        j.append_sync("event", {"n": k, "value": 37.0 + k / 10})
    if close:
        j.__exit__(None, None, None)
        return path
    image = crash_image(path, path.with_name("live.db"))
    j.__exit__(None, None, None)
    return image


def crash_image(path: Path, dest: Path) -> Path:
    """The files of an open journal as a power cut leaves them (database and WAL)."""
    for suffix in ("", "-wal"):
        if Path(f"{path}{suffix}").exists():
            shutil.copyfile(f"{path}{suffix}", f"{dest}{suffix}")
    return dest


def rows(db: Path) -> list[bytes]:
    conn = sqlite3.connect(db)
    out = [bytes(d) for (d,) in conn.execute("SELECT data FROM records ORDER BY seq")]
    conn.close()
    return out


def store(db: Path, datas: list[bytes], meta: dict[str, str] | None = None) -> None:
    """Replace every record (with consistent row columns, as a careful forger would)."""
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM records")
    for data in datas:
        r = Record.parse(data)
        conn.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
            (r.seq, r.time, r.kind.value, r.run, r.hash, r.data),
        )
    for name, value in (meta or {}).items():
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
    conn.commit()
    conn.close()


def relink(fields_list: list[dict[str, Any]], signer: UnitKey | None = None) -> list[bytes]:
    """Renumber from 1 and recompute every prev; checkpoints re-signed by ``signer``."""
    out, prev = [], "0" * 64
    for seq, fields in enumerate(fields_list, start=1):
        fields = {**fields, "seq": seq, "prev": prev}
        if fields["kind"] == "checkpoint" and signer is not None:
            fields["body"] = checkpoint_body(
                signer, unit="unit-1", seq=seq - 1, head=prev, time=fields["time"], reason="x"
            )
        record = Record.build(**fields)
        out.append(record.data)
        prev = record.hash_hex
    return out


def fields_of(datas: list[bytes]) -> list[dict[str, Any]]:
    return [Record.parse(d).fields() for d in datas]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- bedside verify ---------------------------------------------------------------------------


def test_a_cleanly_closed_journal_verifies_and_says_with_what(tmp_path: Path, key: UnitKey) -> None:
    """`bedside verify` exits 0 on a real closed journal and prints the key source, the anchor
    and the covered range."""
    db = journal(tmp_path / "j.db", key)
    rc, report = verify_cli(db, key)
    assert rc == 0 and report["ok"]
    assert report["key_source"] == "--public-key" and report["signed_by"] == [key.key_id]
    assert (report["anchor_seq"], report["anchor"]) == (0, "none")
    assert (report["first_seq"], report["sealed_to"], report["unsealed"]) == (1, 15, 0)
    text = bedside("verify", str(db), "--public-key", key.public_key.hex)
    assert text.returncode == 0 and text.stdout.startswith("VERIFIED")
    assert f"{key.key_id} from --public-key" in text.stdout and "unsealed: 0" in text.stdout


def test_checkpoints_stripped_and_chain_recomputed_is_not_ok(tmp_path: Path, key: UnitKey) -> None:
    """Removing every checkpoint and re-linking the rest gives a chain valid in itself, but no
    record is covered by a signature: exit 1 naming record 1."""
    db = journal(tmp_path / "j.db", key)
    kept = [f for f in fields_of(rows(db)) if f["kind"] != "checkpoint"]
    kept[2]["body"] = {**kept[2]["body"], "value": 99.9}
    store(db, relink(kept))
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 1
    assert "unsealed: 12 records (1-12)" in report["reason"]


def test_rewritten_with_checkpoints_signed_by_an_attacker_key(tmp_path: Path, key: UnitKey) -> None:
    """A rewritten journal re-signed with the attacker's key (named in meta as a hint) fails
    under the enrolled key; the report shows which key signed."""
    db = journal(tmp_path / "j.db", key)
    attacker = UnitKey.generate()
    forged = relink(fields_of(rows(db)), signer=attacker)
    store(db, forged, {f"key:{attacker.key_id}": attacker.public_key.b64})
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 6
    assert f"signed by key {attacker.key_id}, not a trusted key" in report["reason"]
    rc, report = verify_cli(db, attacker)  # passes only for whoever trusts the attacker's key
    assert rc == 0 and report["signed_by"] == [attacker.key_id] != [key.key_id]


def test_forged_tail_after_the_last_checkpoint(tmp_path: Path, key: UnitKey) -> None:
    """Records appended after the last checkpoint are unsealed: exit 1 unless
    --allow-unsealed, which still reports them."""
    db = journal(tmp_path / "j.db", key)
    datas = rows(db)
    last = Record.parse(datas[-1])
    tail = Record.build(
        unit="unit-1",
        seq=last.seq + 1,
        time=last.time,
        kind="audit",
        run=None,
        body={"action": "batch_released", "who": "mallory"},
        prev=last.hash_hex,
    )
    store(db, [*datas, tail.data])
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 16 and "unsealed: 1 records" in report["reason"]
    rc, report = verify_cli(db, key, "--allow-unsealed")
    assert rc == 0 and report["unsealed"] == 1 and report["sealed_to"] == 15


def test_value_changed_in_an_unsealed_record(tmp_path: Path, key: UnitKey) -> None:
    """In a live journal (killed before its close), a value changed after the last checkpoint
    with its hash columns recomputed leaves nothing to link against: it fails as unsealed."""
    live = journal(tmp_path / "j.db", key, close=False)
    datas = rows(live)
    assert Record.parse(datas[-1]).kind is Kind.EVENT  # 13, 14 after checkpoint 12
    fields = Record.parse(datas[-1]).fields()
    fields["body"] = {**fields["body"], "value": 12.5}
    store(live, [*datas[:-1], Record.build(**fields).data])
    rc, report = verify_cli(live, key)
    assert rc == 1 and report["first_bad"] == 13 and report["unsealed"] == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda b: {**b, "signed": {**b["signed"], "reason": "periodic"}}, "does not verify"),
        (lambda b: {**b, "note": "QA approved"}, "not exactly"),
        (lambda b: {**b, "signed": {**b["signed"], "extra": 1}}, "checkpoint signs"),
        (lambda b: {**b, "signed": {**b["signed"], "purpose": "other"}}, "checkpoint signs"),
    ],
    ids=["reason", "body-member", "signed-member", "purpose"],
)
def test_every_checkpoint_field_is_inside_the_signature(
    tmp_path: Path, key: UnitKey, change: Any, why: str
) -> None:
    """Changing a checkpoint's reason or adding any member (then re-linking) fails at that
    checkpoint."""
    db = journal(tmp_path / "j.db", key)
    fields = fields_of(rows(db))
    fields[5]["body"] = change(fields[5]["body"])
    store(db, relink(fields))
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 6 and why in report["reason"]


def test_seq_zero_or_negative_is_refused(tmp_path: Path, key: UnitKey) -> None:
    """A record numbered 0 (or below) in an export is unreadable, named by its position."""
    db = journal(tmp_path / "j.db", key)
    out = tmp_path / "e.jsonl"
    export(db, out)
    lines = out.read_bytes().splitlines()
    lines[1] = lines[1].replace(b'"seq":1,', b'"seq":0,')
    out.write_bytes(b"\n".join(lines) + b"\n")
    rc, report = verify_cli(out, key)
    assert (
        rc == 1
        and report["first_bad"] == 1
        and "seq 0 must be an integer from 1" in report["reason"]
    )


# --- prunes -----------------------------------------------------------------------------------


def pruned(tmp_path: Path, key: UnitKey) -> Path:
    """A journal pruned (as the agent does) up to record 8."""
    path, clock = tmp_path / "p.db", ManualClock(START)
    with Journal.open(path, unit="unit-1", signer=key, clock=clock, checkpoint_every=5) as j:
        for n in range(12):
            j.append_sync("event", {"n": n})
        j.mark_acknowledged(10)
        asyncio.run(clock.advance(10))
        assert j.prune_sync(5) == 10
    return path


def test_genuine_prune_verifies_with_its_signed_anchor(tmp_path: Path, key: UnitKey) -> None:
    """A journal pruned by the agent verifies; the report shows the signed anchor."""
    rc, report = verify_cli(pruned(tmp_path, key), key)
    assert rc == 0 and report["anchor_seq"] == 10
    assert report["anchor"] == f"pruned, anchor signed by key {key.key_id}"


def test_faked_prune_is_refused(tmp_path: Path, key: UnitKey) -> None:
    """Deleting the oldest records and writing a matching anchor into meta (no signature, or
    the signature of another prune) is refused naming the first kept record."""
    db = journal(tmp_path / "j.db", key)
    datas = rows(db)
    cut = Record.parse(datas[6])  # drop 1-6: the first kept (7) links to record 6's hash
    store(db, datas[6:], {"anchor_seq": "6", "anchor_hash": cut.prev})
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 7 and "a faked prune" in report["reason"]
    genuine = pruned(tmp_path, key)  # a real anchor signature of another prune
    conn = sqlite3.connect(genuine)
    (sig,) = conn.execute("SELECT value FROM meta WHERE key = 'anchor_sig'").fetchone()
    conn.close()
    store(db, datas[6:], {"anchor_sig": sig})
    rc, report = verify_cli(db, key)
    assert rc == 1 and "a faked prune" in report["reason"]


def test_anchor_signed_by_an_attacker_is_refused(tmp_path: Path, key: UnitKey) -> None:
    """An anchor signature made with another key does not vouch for a prune."""
    db = journal(tmp_path / "j.db", key)
    datas = rows(db)
    attacker = UnitKey.generate()
    prev = Record.parse(datas[6]).prev
    sig = attacker.sign(anchor_payload("unit-1", 6, prev))
    store(
        db,
        datas[6:],
        {"anchor_seq": "6", "anchor_hash": prev, "anchor_sig": f"{attacker.key_id}:{b64(sig)}"},
    )
    assert verify_path(db, key.public_key).first_bad == 7


# --- key rotation -----------------------------------------------------------------------------


def rotated(tmp_path: Path, old: UnitKey, new: UnitKey) -> Path:
    path = tmp_path / "r.db"
    with Journal.open(path, unit="unit-1", signer=old, clock=ManualClock(START)) as j:
        j.append_sync("event", {"n": 1})
        j.rotate_key_sync(new)
        j.append_sync("event", {"n": 2})
    return path


def test_rotation_is_followed_from_the_enrolled_key(tmp_path: Path) -> None:
    """A rotation signed by both keys hands the chain over: the journal verifies with the old
    (enrolled) key and with the new one, and the report lists the rotation."""
    old, new = UnitKey.generate(), UnitKey.generate()
    path = rotated(tmp_path, old, new)
    for trusted in (old, new):
        rc, report = verify_cli(path, trusted)
        assert rc == 0 and report["rotations"] == [[2, old.key_id, new.key_id]]
        assert report["signed_by"] == sorted([old.key_id, new.key_id])
    with Journal.open(path, unit="unit-1", signer=new, clock=ManualClock(START)):
        pass  # the agent, now holding the new key, accepts its journal
    with pytest.raises(ChainBroken, match="handed to key"):
        Journal.open(path, unit="unit-1", signer=old, clock=ManualClock(START)).__enter__()


def test_rotation_to_an_attacker_key_is_refused(tmp_path: Path) -> None:
    """A rotation without the current key's signature (the attacker signs both halves with
    keys of their own) fails at the rotation."""
    old, attacker, other = UnitKey.generate(), UnitKey.generate(), UnitKey.generate()
    path = rotated(tmp_path, attacker, other)
    rc, report = verify_cli(path, old)
    assert rc == 1 and report["first_bad"] == 2 and "not a trusted key" in report["reason"]
    (tmp_path / "second").mkdir()
    old_path = rotated(tmp_path / "second", old, other)
    fields = fields_of(rows(old_path))
    fields[1]["body"] = {**fields[1]["body"], "next_sig": fields[1]["body"]["sig"]}
    store(old_path, relink(fields))
    rc, report = verify_cli(old_path, old)
    assert rc == 1 and "is not signed by that key" in report["reason"]


# --- e-signatures -----------------------------------------------------------------------------


def signed_journal(path: Path, key: UnitKey, subject_fix: Any = None) -> Path:
    """A journal with a prompt answer and two e-signatures bound to it."""

    async def go() -> None:
        async with Journal.open(path, unit="unit-1", signer=key, clock=ManualClock(START)) as j:
            await j.append("event", {"event": "run_started"}, run="R-1")
            content = {"run": "R-1", "phase": "scan", "inputs": {"bag": "COI-1"}}
            digest = hashlib.sha256(canonical(content)).hexdigest()
            sigs = [
                {
                    "user": u,
                    "full_name": u.title(),
                    "meaning": m,
                    "time": "t",
                    "record_hash": digest,
                    "record": content,
                }
                for u, m in (("alice", "performed"), ("bob", "verified"))
            ]
            await j.append_signed("audit", {"action": "prompt_answered"}, "R-1", sigs)

    asyncio.run(go())
    return path


def test_signatures_are_bound_to_the_record_they_sign(tmp_path: Path, key: UnitKey) -> None:
    """Each signature record names the seq and hash of the answer it signs; verify checks it."""
    db = signed_journal(tmp_path / "s.db", key)
    rc, report = verify_cli(db, key)
    assert rc == 0 and report["signatures"] == 2
    subject = Record.parse(rows(db)[1])
    sig = Record.parse(rows(db)[2])
    assert sig.kind is Kind.SIGNATURE and sig.body["subject"] == {
        "seq": subject.seq,
        "hash": subject.hash_hex,
    }


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda b: {**b, "subject": {"seq": 1, "hash": b["subject"]["hash"]}}, "bound to record 1"),
        (lambda b: {**b, "record": {**b["record"], "inputs": {"bag": "COI-2"}}}, "record_hash"),
        (lambda b: {k: v for k, v in b.items() if k != "subject"}, "lacks"),
    ],
    ids=["moved-to-another-record", "content-changed", "unbound"],
)
def test_a_signature_moved_or_changed_fails_even_when_signed_by_the_unit(
    tmp_path: Path, key: UnitKey, change: Any, why: str
) -> None:
    """A signature record re-pointed at another record, or whose signed content changed, fails
    even in a journal re-signed with the unit's own key (a faulty or subverted writer)."""
    db = signed_journal(tmp_path / "s.db", key)
    fields = fields_of(rows(db))
    fields[2]["body"] = change(fields[2]["body"])
    store(db, relink(fields, signer=key))
    rc, report = verify_cli(db, key)
    assert rc == 1 and report["first_bad"] == 3 and why in report["reason"]


def test_plain_append_cannot_write_an_unbound_signature(tmp_path: Path, key: UnitKey) -> None:
    """The journal refuses a signature record that is not bound by append_signed."""
    j = Journal.open(tmp_path / "j.db", unit="u", signer=key, clock=ManualClock(START))
    with j, pytest.raises(ValueError, match="append_signed"):
        j.append_sync("signature", {"user": "alice"})


# --- the agent's start-up ---------------------------------------------------------------------


def test_start_refuses_a_journal_naming_other_keys(tmp_path: Path, key: UnitKey) -> None:
    """A journal whose meta names a key is refused at start and left byte for byte untouched."""
    db = journal(tmp_path / "j.db", key)
    store(db, rows(db), {"key:deadbeefdeadbeef": UnitKey.generate().public_key.b64})
    before = digest(db)
    with pytest.raises(ChainBroken, match="names keys for itself"):
        Journal.open(db, unit="unit-1", signer=key, clock=ManualClock(START)).__enter__()
    assert digest(db) == before


def test_start_refuses_a_history_signed_by_another_key(tmp_path: Path, key: UnitKey) -> None:
    """A journal rewritten and re-signed with another key is refused, never re-signed."""
    db = journal(tmp_path / "j.db", key)
    store(db, relink(fields_of(rows(db)), signer=UnitKey.generate()))
    before = digest(db)
    with pytest.raises(ChainBroken, match="does not verify under the unit key"):
        Journal.open(db, unit="unit-1", signer=key, clock=ManualClock(START)).__enter__()
    assert digest(db) == before


def test_start_never_seals_a_tail_it_did_not_write(tmp_path: Path, key: UnitKey) -> None:
    """Records added while the agent was stopped are not covered by its head signature: the
    agent refuses the journal instead of sealing them with an 'open' checkpoint."""
    live = journal(tmp_path / "j.db", key, close=False)
    datas = rows(live)
    last = Record.parse(datas[-1])
    forged = Record.build(**(last.fields() | {"seq": last.seq + 1, "prev": last.hash_hex}))
    store(live, [*datas, forged.data])
    before = digest(live)
    with pytest.raises(ChainBroken, match="not the head the unit signed"):
        Journal.open(live, unit="unit-1", signer=key, clock=ManualClock(START)).__enter__()
    assert digest(live) == before
    assert verify_path(live, key.public_key, allow_unsealed=True).checkpoints == 2


def test_journal_files_are_private(tmp_path: Path, key: UnitKey) -> None:
    """journal.db and its WAL and shared-memory files are created 0600, even with umask 000."""
    import os

    old = os.umask(0)
    try:
        with Journal.open(tmp_path / "journal.db", unit="u", signer=key, clock=ManualClock(START)):
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.is_file()}
    finally:
        os.umask(old)
    assert {"journal.db", "journal.db-wal", "journal.db-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


# --- run exports ------------------------------------------------------------------------------


def run_journal(path: Path, key: UnitKey) -> Path:
    """A journal with noise, then run R-7 from run_started to Complete, then more noise."""
    with Journal.open(
        path, unit="unit-1", signer=key, clock=ManualClock(START), checkpoint_every=4
    ) as j:
        for n in range(6):
            j.append_sync("event", {"n": n})
        j.append_sync("event", {"event": "run_started", "recipe": "cart"}, run="R-7")
        for n in range(5):
            j.append_sync("event", {"event": "phase", "n": n}, run="R-7")
        j.append_sync("event", {"event": "run_state", "new": "Complete"}, run="R-7")
        for n in range(6):
            j.append_sync("event", {"n": n})
    return path


def test_run_export_is_self_contained_and_verifies(tmp_path: Path, key: UnitKey) -> None:
    """`bedside export RUN` writes the run from the checkpoint before it to the one after it;
    `bedside verify` checks it end to end, the anchor vouched for by that first checkpoint."""
    db = run_journal(tmp_path / "journal.db", key)
    out = tmp_path / "R-7.jsonl"
    done = bedside("export", "R-7", "--journal", str(db), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported run R-7" in done.stdout
    header = json.loads(out.read_bytes().splitlines()[0])
    assert header["scope"] == "run" and header["run"] == "R-7"
    rc, report = verify_cli(out, key)
    assert rc == 0, report
    assert report["scope"] == "run R-7" and report["run_ended"] == "Complete"
    assert "checkpoint" in report["anchor"] and report["first_seq"] > 1
    assert report["head_seq"] < len(rows(db))  # an extract, not the whole journal


def test_run_export_with_its_beginning_cut_is_refused(tmp_path: Path, key: UnitKey) -> None:
    """An extract that starts after the run's run_started (cut at a later checkpoint) fails."""
    db = run_journal(tmp_path / "journal.db", key)
    out = tmp_path / "R-7.jsonl"
    export_run(db, "R-7", out)
    lines = out.read_bytes().splitlines()
    records = [Record.parse(line) for line in lines[1:]]
    later = next(i for i, r in enumerate(records) if r.kind is Kind.CHECKPOINT and i > 2)
    header = json.loads(lines[0])
    header["anchor"] = {"seq": records[later].seq - 1, "hash": records[later].prev}
    out.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1 + later :]]) + b"\n")
    rc, report = verify_cli(out, key)
    assert rc == 1 and "beginning of the run is missing" in report["reason"]


def test_export_of_an_unknown_run_says_so(tmp_path: Path, key: UnitKey) -> None:
    """Exporting a run the journal does not hold exits 2 with one clear line."""
    db = run_journal(tmp_path / "journal.db", key)
    done = bedside("export", "R-404", "--journal", str(db), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "no record of run 'R-404'" in done.stderr
    assert "Traceback" not in done.stderr


def test_verify_without_a_key_is_refused(tmp_path: Path, key: UnitKey) -> None:
    """`bedside verify` without --public-key/--key-file refuses to give a verdict."""
    done = bedside("verify", str(journal(tmp_path / "j.db", key)))
    assert done.returncode == 2 and "enrolled public key" in done.stderr


# --- bedside keys rotate ----------------------------------------------------------------------


def state_with_journal(state: Path) -> UnitKey:
    key, _ = init_unit_key(state)
    with Journal.open(
        state / "journal.db", unit="unit-1", signer=key, clock=ManualClock(START)
    ) as j:
        j.append_sync("event", {"n": 1})
    return key


def test_keys_rotate_hands_the_chain_to_a_new_key(tmp_path: Path) -> None:
    """`bedside keys rotate` on a stopped agent: the journal verifies with the old (enrolled)
    key and the new unit.pub, and the agent starts with the new key."""
    state = tmp_path / "state"
    old = state_with_journal(state)
    done = bedside("keys", "rotate", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["old_key_id"] == old.key_id != answer["key_id"] and not answer["resumed"]
    new = load_unit_key(state)
    assert new.key_id == answer["key_id"] and (state / "unit.pub").read_text().strip() == (
        new.public_key.b64
    )
    for trusted in (old, new):
        rc, report = verify_cli(state / "journal.db", trusted)
        assert rc == 0 and report["rotations"][0][1:] == [old.key_id, new.key_id]
    with Journal.open(state / "journal.db", unit="unit-1", signer=new, clock=ManualClock(START)):
        pass


def test_keys_rotate_resumes_after_an_interruption(tmp_path: Path) -> None:
    """Interrupted after the journal took the new key (unit.key.next) but before the key files
    were replaced, a second `bedside keys rotate` finishes the job instead of rotating again."""
    state = tmp_path / "state"
    old = state_with_journal(state)
    pending = UnitKey.generate()
    write_key_files(state, pending, key_name="unit.key.next", public=False)
    with Journal.open(
        state / "journal.db", unit="unit-1", signer=old, clock=ManualClock(START)
    ) as j:
        j.rotate_key_sync(pending)
    with pytest.raises(ChainBroken, match="handed to key"):  # the agent cannot start meanwhile
        Journal.open(
            state / "journal.db", unit="unit-1", signer=old, clock=ManualClock(START)
        ).__enter__()
    done = bedside("keys", "rotate", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed"] is True
    assert load_unit_key(state).key_id == pending.key_id and not (state / "unit.key.next").exists()
    assert verify_path(state / "journal.db", old.public_key).rotations[0][2] == pending.key_id


def test_keys_rotate_refuses_while_the_agent_runs(tmp_path: Path) -> None:
    """Rotating while the journal is open in another process is refused in one line."""
    state = tmp_path / "state"
    key = state_with_journal(state)
    with Journal.open(state / "journal.db", unit="unit-1", signer=key, clock=ManualClock(START)):
        done = bedside("keys", "rotate", "--state-dir", str(state))
    assert done.returncode == 2 and "open in another process" in done.stderr
    assert load_unit_key(state).key_id == key.key_id
    assert not (state / "unit.key.next").exists()
