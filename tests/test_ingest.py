"""Ingest verification against real stores: SQLite and PostgreSQL pass the same tests.

Batches are built with the shared record format (``agent.record.format``) and signed with
``agent.uplink.build_request``, exactly as the uplink sends them; each tamper kind must be
refused naming the record and leave a tamper alarm.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.record.format import (
    ZERO_HASH,
    Kind,
    Record,
    checkpoint_body,
    encode_samples,
    format_time,
)
from agent.record.keys import UnitKey
from agent.uplink import build_request
from controlsite.enroll import enroll_unit
from controlsite.ingest import Ingestor, IngestRequest, Refused
from controlsite.store.base import Store, open_store
from drivers.base import Quality, Sample

T0 = datetime(2026, 11, 25, 10, tzinfo=UTC)


@dataclass
class Chain:
    """A unit's journal records built in memory (checkpoint every ``every`` records)."""

    unit: str
    key: UnitKey
    every: int = 5
    records: list[Record] = field(default_factory=list)

    @property
    def head(self) -> tuple[int, str]:
        last = self.records[-1] if self.records else None
        return (last.seq, last.hash_hex) if last else (0, ZERO_HASH)

    def add(self, kind: str, body: dict[str, Any], n: int = 1) -> Chain:
        for _ in range(n):
            seq, prev = self.head
            time = format_time(T0 + timedelta(seconds=seq + 1))
            if kind == "checkpoint":
                body = checkpoint_body(
                    self.key, unit=self.unit, seq=seq, head=prev, time=time, reason="test"
                )
            record = Record.build(
                unit=self.unit, seq=seq + 1, time=time, kind=kind, run="R-1", body=body, prev=prev
            )
            self.records.append(record)
        return self

    def events(self, n: int) -> Chain:
        for _ in range(n):
            self.add("event", {"what": "step", "n": len(self.records) + 1})
            if self.every and len(self.records) % self.every == 0:
                self.add("checkpoint", {})
        return self

    def samples(self, values: dict[str, float]) -> Chain:
        at = T0 + timedelta(seconds=len(self.records))
        batch = [Sample(t, v, Quality.GOOD, at) for t, v in values.items()]
        return self.add("samples", encode_samples(batch))

    def copy(self, upto: int) -> Chain:
        return Chain(self.unit, self.key, self.every, list(self.records[:upto]))


def rebuilt(record: Record, **changes: Any) -> Record:
    """``record`` with fields changed, re-encoded (a forger's canonical bytes)."""
    return Record.build(**{**record.fields(), **changes})


def request(
    records: list[Record] | list[bytes], unit: str, key: UnitKey, **headers: str
) -> IngestRequest:
    data = [r.data if isinstance(r, Record) else r for r in records]
    body, h = build_request(data, unit=unit, key=key, time=format_time(T0))
    h.update(headers)
    return IngestRequest(
        unit=h["Bedside-Unit"],
        time=h["Bedside-Time"],
        nonce=h["Bedside-Nonce"],
        signature=h["Bedside-Signature"],
        encoding=h["Content-Encoding"],
        body=body,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh control-site database URL: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "control-site.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open store on ``store_url``."""
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def key() -> UnitKey:
    return UnitKey.from_seed(b"\x07" * 32)


@pytest.fixture
def site(store: Store, key: UnitKey) -> Ingestor:
    """An ingestor over ``store`` with unit ``u1`` enrolled."""
    enroll_unit(store, "u1", key.public_key.b64, when=T0)
    return Ingestor(store, now=lambda: T0)


def refusal(site: Ingestor, req: IngestRequest) -> Refused:
    with pytest.raises(Refused) as info:
        site.ingest(req)
    return info.value


def stored(store: Store, unit: str = "u1") -> list[Record]:
    return store.records(unit, limit=1000)


def test_batch_is_stored_and_acknowledged(site: Ingestor, store: Store, key: UnitKey) -> None:
    """A valid batch is stored byte for byte and acknowledged up to its last seq."""
    chain = Chain("u1", key).events(12)
    result = site.ingest(request(chain.records, "u1", key))
    assert result.ack == chain.head[0] == 14
    assert [r.data for r in stored(store)] == [r.data for r in chain.records]
    unit = store.unit("u1")
    assert unit is not None and (unit.head_seq, unit.head_hash) == chain.head


def test_same_batch_twice_stores_once_and_acks_twice(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """Sending the same batch twice (a lost ack) stores it once and acknowledges it twice."""
    chain = Chain("u1", key).events(8)
    first = site.ingest(request(chain.records, "u1", key))
    again = site.ingest(request(chain.records, "u1", key))
    assert (first.ack, first.stored) == (again.ack, again.duplicates) == (9, 9)
    assert again.stored == 0
    assert [r.seq for r in stored(store)] == list(range(1, 10))


def test_batch_starting_below_head_stores_only_the_new_records(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A resend overlapping the stored head skips identical records and stores the rest."""
    chain = Chain("u1", key).events(20)
    site.ingest(request(chain.records[:10], "u1", key))
    result = site.ingest(request(chain.records[4:], "u1", key))
    assert (result.ack, result.stored, result.duplicates) == (len(chain.records), 14, 6)
    assert [r.data for r in stored(store)] == [r.data for r in chain.records]


def test_shorter_resend_is_acknowledged_at_the_head(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A resend missing records the control site already has is fine: ack is the stored head."""
    chain = Chain("u1", key).events(10)
    site.ingest(request(chain.records, "u1", key))
    assert site.ingest(request(chain.records[:5], "u1", key)).ack == len(chain.records)


def test_latest_values_follow_samples(site: Ingestor, store: Store, key: UnitKey) -> None:
    """The latest value of each tag is the last sample stored for it."""
    chain = Chain("u1", key).samples({"temp": 36.5, "ph": 7.1}).samples({"temp": 37.0})
    site.ingest(request(chain.records, "u1", key))
    latest = {v.tag: (v.value, v.quality, v.seq) for v in store.latest("u1")}
    assert latest == {"temp": (37.0, "good", 2), "ph": (7.1, "good", 1)}


def test_changed_value_is_refused_naming_the_record(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A record whose value changed (chain not re-linked) is refused at that record."""
    records = Chain("u1", key, every=0).events(6).records
    records[3] = rebuilt(records[3], body={"what": "step", "n": 999})
    exc = refusal(site, request(records, "u1", key))
    assert (exc.status, exc.error, exc.seq) == (422, "chain_broken", 4)
    assert "record 4 was changed" in str(exc)
    assert stored(store) == []
    [alarm] = store.alarms("u1")
    assert alarm.seq == 4 and "changed" in alarm.reason


def test_changed_stored_record_is_refused(site: Ingestor, store: Store, key: UnitKey) -> None:
    """A resend whose already-stored record differs (chain re-linked) is refused at it."""
    chain = Chain("u1", key, every=0).events(6)
    site.ingest(request(chain.records, "u1", key))
    forged = chain.copy(2).add("event", {"what": "forged"}).events(3)
    exc = refusal(site, request(forged.records, "u1", key))
    assert (exc.error, exc.seq) == ("differs", 3)
    assert [r.data for r in stored(store)] == [r.data for r in chain.records]


def test_deleted_record_is_refused(site: Ingestor, key: UnitKey) -> None:
    """A batch with a record deleted from its middle is refused naming the missing record."""
    records = Chain("u1", key, every=0).events(8).records
    del records[4]
    exc = refusal(site, request(records, "u1", key))
    assert (exc.error, exc.seq) == ("chain_broken", 5)
    assert "missing" in str(exc)


def test_gap_after_the_stored_head_is_refused(site: Ingestor, store: Store, key: UnitKey) -> None:
    """A batch starting beyond head + 1 is refused naming the first missing record."""
    chain = Chain("u1", key, every=0).events(10)
    site.ingest(request(chain.records[:5], "u1", key))
    exc = refusal(site, request(chain.records[6:], "u1", key))
    assert (exc.error, exc.seq, exc.head) == ("gap", 6, 5)
    assert store.alarms("u1")[0].seq == 6


def test_reordered_records_are_refused(site: Ingestor, key: UnitKey) -> None:
    """Two swapped records are refused at the first out-of-place position."""
    records = Chain("u1", key, every=0).events(8).records
    records[4], records[5] = records[5], records[4]
    exc = refusal(site, request(records, "u1", key))
    assert (exc.error, exc.seq) == ("chain_broken", 5)


def test_inserted_record_is_refused(site: Ingestor, key: UnitKey) -> None:
    """A record inserted into the chain is refused naming the displaced record."""
    chain = Chain("u1", key, every=0).events(8)
    intruder = chain.copy(5).add("event", {"what": "inserted"}).records[-1]
    records = [*chain.records[:5], intruder, *chain.records[5:]]
    exc = refusal(site, request(records, "u1", key))
    assert (exc.error, exc.seq) == ("chain_broken", 6)
    assert "inserted" in str(exc)


def test_truncated_and_re_extended_journal_is_refused(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A journal truncated after an ack and re-extended differs at a stored seq: refused."""
    chain = Chain("u1", key).events(10)
    site.ingest(request(chain.records, "u1", key))
    regrown = chain.copy(7).add("event", {"what": "after the truncation"}).events(4)
    exc = refusal(site, request(regrown.records[5:], "u1", key))
    assert (exc.error, exc.seq) == ("differs", 8)
    assert "truncated and re-extended" in str(exc)


def test_records_of_another_unit_are_refused(site: Ingestor, store: Store, key: UnitKey) -> None:
    """Records replayed from another unit are refused even when the request is signed."""
    other_key = UnitKey.from_seed(b"\x08" * 32)
    enroll_unit(store, "u2", other_key.public_key.b64)
    theirs = Chain("u2", other_key).events(4).records
    exc = refusal(site, request(theirs, "u1", key))
    assert (exc.error, exc.seq) == ("foreign_record", 1)
    assert "another unit" in str(exc)


def test_checkpoint_signed_by_another_key_is_refused(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A journal re-signed with another key is refused at its first checkpoint."""
    forger = UnitKey.from_seed(b"\x09" * 32)
    records = Chain("u1", forger, every=4).events(6).records
    exc = refusal(site, request(records, "u1", key))
    assert (exc.error, exc.seq) == ("chain_broken", 5)
    assert "another key" in str(exc)
    assert store.alarms("u1")[0].seq == 5


def test_unknown_unit_is_refused_without_an_alarm(
    site: Ingestor, store: Store, key: UnitKey
) -> None:
    """A unit that is not enrolled is refused (401) and leaves no alarm: strangers write nothing."""
    records = Chain("stranger", key).events(2).records
    exc = refusal(site, request(records, "stranger", key))
    assert (exc.status, exc.error) == (401, "unknown_unit")
    assert "not enrolled" in str(exc)
    assert store.alarms("stranger") == []


def test_bad_request_signature_is_refused(site: Ingestor, store: Store, key: UnitKey) -> None:
    """A request signed by another key, or whose body changed after signing, is refused."""
    records = Chain("u1", key).events(3).records
    exc = refusal(site, request(records, "u1", UnitKey.from_seed(b"\x0a" * 32)))
    assert (exc.status, exc.error) == (401, "bad_signature")
    good = request(records, "u1", key)
    tampered = IngestRequest(**{**vars_of(good), "nonce": "0" * 32})
    assert refusal(site, tampered).error == "bad_signature"
    assert stored(store) == []
    assert store.alarms("u1") == []  # nobody who lacks the key can raise an alarm for u1


def test_repeated_refusal_counts_one_alarm(site: Ingestor, store: Store, key: UnitKey) -> None:
    """The same refusal repeated (an uplink retrying) bumps one alarm's count."""
    records = Chain("u1", key, every=0).events(5).records
    del records[2]
    for _ in range(3):
        refusal(site, request(records, "u1", key))
    [alarm] = store.alarms("u1")
    assert alarm.count == 3


def vars_of(req: IngestRequest) -> dict[str, Any]:
    return {name: getattr(req, name) for name in req.__dataclass_fields__}


def test_enrolled_unit_keeps_its_key(store: Store, key: UnitKey) -> None:
    """Enrolling again with the same key is harmless; another key is refused."""
    from controlsite.store.base import EnrolmentError

    enroll_unit(store, "u9", key.public_key.b64)
    assert enroll_unit(store, "u9", key.public_key.b64)["key_id"] == key.key_id
    with pytest.raises(EnrolmentError, match="u9"):
        enroll_unit(store, "u9", UnitKey.from_seed(b"\x0b" * 32).public_key.b64)


def test_every_kind_survives_the_store(site: Ingestor, store: Store, key: UnitKey) -> None:
    """Records of every kind come back from the store identical (bytes and hash)."""
    chain = Chain("u1", key).samples({"t": 1.0}).add("alarm", {"a": 1}).add("audit", {"who": "x"})
    chain.add("uplink", {"link": "up"}).add("checkpoint", {})
    site.ingest(request(chain.records, "u1", key))
    back = stored(store)
    assert [(r.data, r.hash) for r in back] == [(r.data, r.hash) for r in chain.records]
    assert [r.seq for r in store.records("u1", kind=Kind.ALARM.value)] == [2]
