"""Tests of the SQLite journal: appends, samples batching, checkpoints, recovery, pruning."""

from __future__ import annotations

import asyncio
import base64
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.journal.files import verify_path
from agent.journal.journal import Journal
from agent.record.format import (
    ChainBroken,
    JournalError,
    JournalStorageError,
    Kind,
    Record,
    RecordFormatError,
    canonical,
    decode_samples,
)
from agent.record.keys import UnitKey
from drivers.base import Quality, Sample
from drivers.clock import ManualClock

START = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


@pytest.fixture
def key() -> UnitKey:
    return UnitKey.generate()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def open_journal(path: Path, key: UnitKey, clock: ManualClock, **options: object) -> Journal:
    return Journal.open(path, unit="unit-1", signer=key, clock=clock, **options)  # type: ignore[arg-type]


def sample(clock: ManualClock, tag: str = "temperature", value: float = 37.0) -> Sample:
    return Sample(tag, value, Quality.GOOD, clock.now(), clock.now())


def kinds(journal: Journal) -> list[str]:
    return [r.kind.value for r in journal.read(0, 10_000)]


async def test_append_is_durable_and_chained(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """append returns a record already committed, seq from 1, each prev the last hash."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        first = await journal.append("event", {"what": "started"}, run="R-1")
        second = await journal.append(Kind.AUDIT, {"who": "ana", "why": "test"})
        assert (first.seq, second.seq) == (1, 2)
        assert second.prev == first.hash_hex
        assert journal.durable_seq == 2
        assert journal.head() == (2, second.hash_hex)
        # a separate connection sees both: they are committed, not just queued
        conn = sqlite3.connect(tmp_path / "j.db")
        assert conn.execute("SELECT count(*) FROM records").fetchone() == (2,)
        conn.close()
        assert [r.data for r in journal.read(0, 10)] == [first.data, second.data]
        assert journal.read(1, 10)[0].run is None and journal.read(0, 1)[0].run == "R-1"


async def test_concurrent_appends_get_contiguous_seqs(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """Many tasks appending at once get distinct, contiguous seqs and one valid chain."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        records = await asyncio.gather(*(journal.append("event", {"n": n}) for n in range(200)))
        assert sorted(r.seq for r in records) == list(range(1, 201))
    report = verify_path(tmp_path / "j.db", key.public_key)
    assert report.ok and report.head_seq >= 200


async def test_append_refuses_nan_naming_the_field(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """A NaN in an appended body is refused with the field named, and nothing is written."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        with pytest.raises(RecordFormatError, match=r"body\.setpoint\.value is nan"):
            await journal.append("audit", {"setpoint": {"value": float("nan")}})
        assert journal.durable_seq == 0


async def test_append_refuses_kinds_with_their_own_api(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """samples and checkpoint records cannot be appended directly; unknown kinds are refused."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        for kind in ("samples", "checkpoint", "gossip"):
            with pytest.raises(RecordFormatError, match=kind):
                await journal.append(kind, {})


async def test_samples_flush_once_per_batch_interval(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """Buffered samples become one samples record when the batch interval passes."""
    async with open_journal(tmp_path / "j.db", key, clock, sample_batch_seconds=1.0) as journal:
        journal.record_samples([sample(clock), sample(clock, "do", 40.0)])
        journal.record_samples([sample(clock, "ph", 7.1)])
        assert journal.durable_seq == 0
        await clock.advance(1.0)
        await journal.flush()
        (record,) = journal.read(0, 10)
        assert record.kind is Kind.SAMPLES
        assert [s["tag"] for s in decode_samples(record.body)] == ["temperature", "do", "ph"]


async def test_large_sample_batches_are_split(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """A batch beyond max_samples_per_record becomes several records, nothing lost."""
    async with open_journal(tmp_path / "j.db", key, clock, max_samples_per_record=100) as journal:
        journal.record_samples([sample(clock, value=float(n)) for n in range(250)])
        await journal.flush()
        records = journal.read(0, 10)
        values = [s["v"] for r in records for s in decode_samples(r.body)]
        assert [len(r.body["i"]) for r in records] == [100, 100, 50]
        assert values == list(range(250))


async def test_checkpoint_every_n_records(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """A checkpoint follows every N records."""
    async with open_journal(tmp_path / "j.db", key, clock, checkpoint_every=3) as journal:
        for n in range(7):
            await journal.append("event", {"n": n})
        assert kinds(journal) == ["event"] * 3 + ["checkpoint"] + ["event"] * 3 + ["checkpoint"] + [
            "event"
        ]


async def test_checkpoint_every_t_seconds_only_when_new(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """A periodic checkpoint is written when T seconds pass with new records, not when idle."""
    async with open_journal(tmp_path / "j.db", key, clock, checkpoint_seconds=10) as journal:
        await journal.append("event", {"n": 1})
        await clock.advance(10)
        await journal.flush()
        assert kinds(journal) == ["event", "checkpoint"]
        assert journal.read(1, 1)[0].body["signed"]["reason"] == "periodic"
        await clock.advance(30)
        await journal.flush()
        assert kinds(journal) == ["event", "checkpoint"]


async def test_checkpoint_on_demand_signs_the_head(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """checkpoint(reason) signs (unit, seq, head hash, time) with the unit key."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        event = await journal.append("event", {"state": "held"})
        checkpoint = await journal.checkpoint("run R-1: running -> held")
        signed = checkpoint.body["signed"]
        assert signed == {
            "purpose": "bedside-checkpoint/2",
            "unit": "unit-1",
            "seq": 1,
            "head": event.hash_hex,
            "time": checkpoint.time,
            "reason": "run R-1: running -> held",
        }
        assert set(checkpoint.body) == {"signed", "key", "sig"}
        assert checkpoint.body["key"] == key.key_id
        sig = base64.b64decode(checkpoint.body["sig"])
        assert key.public_key.verify(sig, canonical(signed))


async def test_reopen_continues_the_chain_and_seals(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """A reopened journal continues after its head and seals it with an 'open' checkpoint
    when the last stop left records unsigned."""
    path = tmp_path / "j.db"
    async with open_journal(path, key, clock) as journal:
        await journal.append("event", {"n": 1})
    async with open_journal(path, key, clock) as journal:
        assert journal.durable_seq == 2  # the event and the 'close' checkpoint
        record = await journal.append("event", {"n": 2})
        assert record.seq == 3
        crashed = crash_image(path, tmp_path / "crashed.db")  # as a power cut leaves them
    async with open_journal(crashed, key, clock) as journal:
        assert journal.durable_seq == 4  # the event survived, sealed by the 'open' checkpoint
        reason = journal.read(3, 1)[0].body["signed"]["reason"]
        assert reason == "open"
    assert verify_path(crashed, key.public_key).ok


def crash_image(path: Path, dest: Path) -> Path:
    """Copy an open journal's database and write-ahead log: what a crash at this moment leaves."""
    for suffix in ("", "-wal"):
        if Path(f"{path}{suffix}").exists():
            shutil.copyfile(f"{path}{suffix}", f"{dest}{suffix}")
    return dest


def test_sync_open_for_tools(tmp_path: Path, key: UnitKey, clock: ManualClock) -> None:
    """The sync form appends, flushes and checkpoints without an event loop."""
    with open_journal(tmp_path / "j.db", key, clock) as journal:
        journal.append_sync("event", {"n": 1})
        journal.record_samples([sample(clock)])
        assert journal.flush_sync() == 2
        assert journal.checkpoint_sync("manual").seq == 3
    assert verify_path(tmp_path / "j.db", key.public_key).ok


async def test_open_refuses_another_units_journal(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """A journal file of another unit is refused."""
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        await journal.append("event", {})
    other = Journal.open(tmp_path / "j.db", unit="unit-2", signer=key, clock=clock)
    with pytest.raises(JournalError, match="belongs to unit 'unit-1'"):
        async with other:
            pass


def test_second_writer_is_refused(tmp_path: Path, key: UnitKey, clock: ManualClock) -> None:
    """A journal open in one place cannot be opened for writing a second time."""
    second = open_journal(tmp_path / "j.db", key, clock)
    with (
        open_journal(tmp_path / "j.db", key, clock),
        pytest.raises(JournalStorageError, match="open in another process"),
        second,
    ):
        pass


async def test_open_refuses_a_broken_tail_naming_the_record(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """Opening verifies the tail: a changed record after the last checkpoint is named."""
    path = tmp_path / "j.db"
    async with open_journal(path, key, clock, checkpoint_every=5) as journal:
        for n in range(8):
            await journal.append("event", {"n": n})
    conn = sqlite3.connect(path)
    (data,) = conn.execute("SELECT data FROM records WHERE seq = 8").fetchone()
    forged = data.replace(b'"n":6', b'"n":60')
    conn.execute("UPDATE records SET data = ? WHERE seq = 8", (forged,))
    conn.commit()
    conn.close()
    with pytest.raises(ChainBroken, match="record 8: stored hash does not match") as caught:
        async with open_journal(path, key, clock):
            pass
    assert caught.value.seq == 8


async def test_acknowledge_and_prune(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """prune deletes only acknowledged records older than the retention; the rest still
    verifies from the pruned anchor, also after reopening."""
    path = tmp_path / "j.db"
    async with open_journal(
        path, key, clock, checkpoint_every=4, checkpoint_seconds=1e9
    ) as journal:
        for n in range(10):
            await journal.append("event", {"n": n})
            await clock.advance(60)
        assert journal.durable_seq == 12
        with pytest.raises(JournalError, match="durable head is 12"):
            journal.mark_acknowledged(13)
        journal.mark_acknowledged(8)
        journal.mark_acknowledged(3)  # lower: ignored
        assert journal.acknowledged_seq == 8
        # records 1..12 are 60 s apart; keep the last 5 minutes: seq 1..6 are older
        assert await journal.prune(retention_seconds=330) == 6
        assert journal.read(0, 1)[0].seq == 7
        assert await journal.prune(retention_seconds=0) == 2  # up to the acknowledgement
        assert journal.read(0, 1)[0].seq == 9
    report = verify_path(path, key.public_key)
    assert report.ok and report.anchor_seq == 8 and report.count == 5  # 9..12 and 'close'
    async with open_journal(path, key, clock) as journal:
        assert (await journal.append("event", {})).seq == 14


async def test_low_disk_threshold(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """low_disk compares the file system's free space with the configured threshold."""
    async with open_journal(tmp_path / "j.db", key, clock, low_disk_bytes=1) as journal:
        assert journal.disk_free() > 1 and not journal.low_disk
        journal.low_disk_bytes = 2**62
        assert journal.low_disk


async def test_closed_journal_refuses_use(tmp_path: Path, key: UnitKey, clock: ManualClock):
    """After close, appends and sample recording raise instead of being lost silently."""
    journal = open_journal(tmp_path / "j.db", key, clock)
    async with journal:
        pass
    with pytest.raises(JournalError, match="not open"):
        await journal.append("event", {})
    with pytest.raises(JournalError, match="not open"):
        journal.record_samples([sample(clock)])


def test_read_returns_records_with_canonical_bytes(
    tmp_path: Path, key: UnitKey, clock: ManualClock
) -> None:
    """read() pages through committed records; each carries the exact stored bytes."""
    with open_journal(tmp_path / "j.db", key, clock) as journal:
        for n in range(5):
            journal.append_sync("event", {"n": n, "at": (START + timedelta(seconds=n)).isoformat()})
        page = journal.read(2, 2)
        assert [r.seq for r in page] == [3, 4]
        assert all(Record.parse(r.data).hash == r.hash for r in page)


async def test_write_failure_fails_callers_then_recovers(
    tmp_path: Path, key: UnitKey, clock: ManualClock
):
    """A failed commit fails its callers with JournalStorageError, is logged once as an error
    (then quietly), and the journal carries on with an intact chain once writes succeed."""
    path = tmp_path / "j.db"
    async with open_journal(path, key, clock) as journal:
        await journal.append("event", {"n": 1})
        conn = sqlite3.connect(path)
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records "
            "BEGIN SELECT RAISE(ABORT, 'disk full (simulated)'); END"
        )
        conn.commit()
        with capture_logs() as logs:
            for _ in range(2):
                with pytest.raises(JournalStorageError, match="disk full"):
                    await journal.append("event", {"n": 2})
            conn.execute("DROP TRIGGER refuse")
            conn.commit()
            conn.close()
            assert (await journal.append("event", {"n": 3})).seq == 2
        levels = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("journal_")]
        assert levels == [
            ("journal_write_failed", "error"),
            ("journal_write_failed", "debug"),
            ("journal_write_recovered", "info"),
        ]
    assert verify_path(path, key.public_key).ok
