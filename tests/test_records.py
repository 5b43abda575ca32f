"""Unit tests of the record format: canonical bytes, records, samples bodies, checkpoints.

Run as a script (``python -m tests.test_records``) it prints the worked example of
docs/record-format.md, which ``test_worked_example_matches_the_doc`` keeps in step.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.journal.journal import Journal
from agent.record.format import (
    ZERO_HASH,
    Kind,
    Record,
    RecordFormatError,
    canonical,
    decode_samples,
    encode_samples,
    format_time,
    parse_time,
)
from agent.record.keys import PublicKey, UnitKey
from agent.record.verify import ChainVerifier
from drivers.base import Quality, Sample
from drivers.clock import ManualClock

T0 = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)
DOC = Path(__file__).resolve().parent.parent / "docs" / "record-format.md"


def _record(seq: int = 1, body: dict | None = None, prev: str = ZERO_HASH) -> Record:
    return Record.build(
        unit="unit-1",
        seq=seq,
        time=format_time(T0),
        kind=Kind.EVENT,
        run=None,
        body=body if body is not None else {"what": "x"},
        prev=prev,
    )


# --- canonical JSON (RFC 8785) ---------------------------------------------------------------


def test_keys_sort_by_utf16_code_units() -> None:
    """Object keys are ordered by UTF-16 code units, as in RFC 8785 section 3.2.3."""
    obj = {"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001f600": 5, "\u0080": 6, "\u00f6": 7}
    expected = '{"\\r":2,"1":4,"\u0080":6,"\u00f6":7,"\u20ac":1,"\U0001f600":5,"\ufb33":3}'
    assert canonical(obj) == expected.encode("utf-8")


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (37.0, "37"),
        (-0.0, "0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (5e-324, "5e-324"),
        (-1.5e-9, "-1.5e-9"),
        (2**53 - 1, "9007199254740991"),
    ],
)
def test_numbers_format_as_ecmascript(number: float, text: str) -> None:
    """Numbers are written the ECMAScript way (1e-7, not 1e-07; 37.0 as 37)."""
    assert canonical(number) == text.encode()


def test_strings_keep_unicode_and_escape_only_controls() -> None:
    """Non-ASCII stays raw UTF-8; only quote, backslash and control characters are escaped."""
    assert canonical("µ°C é \u2028") == '"µ°C é \u2028"'.encode()
    assert canonical('a"b\\c\n\t\x1f\x7f') == b'"a\\"b\\\\c\\n\\t\\u001f\x7f"'


def test_nan_is_refused_naming_the_field() -> None:
    """A NaN deep in a body is refused with the path of the field."""
    with pytest.raises(RecordFormatError, match=r"body\.reading\.values\[1\] is nan"):
        canonical({"reading": {"values": [1.0, float("nan")]}}, what="body")


def test_infinity_and_huge_integers_are_refused_naming_the_field() -> None:
    """Infinity and integers beyond 2**53-1 are refused with the field named."""
    with pytest.raises(RecordFormatError, match=r"body\.limit is -inf"):
        canonical({"limit": float("-inf")}, what="body")
    with pytest.raises(RecordFormatError, match=r"body\.count is 9007199254740992"):
        canonical({"count": 2**53}, what="body")


def test_unencodable_types_are_refused_naming_the_field() -> None:
    """A value JSON cannot hold (a datetime) is refused with its field named."""
    with pytest.raises(RecordFormatError, match=r"body\.when is a datetime"):
        canonical({"when": T0}, what="body")


# --- records ---------------------------------------------------------------------------------


def test_record_bytes_and_hash() -> None:
    """A record is the canonical JSON of its seven fields and its hash is SHA-256 of that."""
    record = _record(body={"b": 1, "a": [1.5, None, True]})
    expected = (
        '{"body":{"a":[1.5,null,true],"b":1},"kind":"event","prev":"' + ZERO_HASH + '",'
        '"run":null,"seq":1,"time":"2026-11-25T10:00:00.123456Z","unit":"unit-1"}'
    )
    assert record.data == expected.encode()
    assert record.hash == hashlib.sha256(record.data).digest()


def test_parse_round_trips() -> None:
    """Parsing a record's bytes gives back the same fields and hash."""
    record = _record(body={"v": 1e-7, "name": "é"})
    parsed = Record.parse(record.data)
    assert parsed.fields() == record.fields() and parsed.hash == record.hash


def test_parse_refuses_non_canonical_bytes() -> None:
    """The same record with one extra space is refused: only canonical bytes are records."""
    spaced = _record().data.replace(b'"seq":1', b'"seq": 1')
    with pytest.raises(RecordFormatError, match="not the RFC 8785 canonical form"):
        Record.parse(spaced)


def test_parse_refuses_nan_tokens_and_wrong_fields() -> None:
    """NaN tokens, missing or extra fields are refused."""
    data = _record().data
    with pytest.raises(RecordFormatError, match="NaN"):
        Record.parse(data.replace(b'"body":{"what":"x"}', b'"body":{"what":NaN}'))
    with pytest.raises(RecordFormatError, match="exactly the fields"):
        Record.parse(data.replace(b'"run":null,', b""))
    with pytest.raises(RecordFormatError, match="exactly the fields"):
        Record.parse(data.replace(b'"run":null,', b'"run":null,"extra":1,'))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "gossip", "kind 'gossip' is not one of"),
        ("seq", 0, "seq 0 must be an integer from 1"),
        ("time", "2026-11-25T10:00:00Z", "not RFC 3339 UTC with microseconds"),
        ("prev", "ABC", "64 lowercase hex"),
        ("unit", "", "non-empty string"),
        ("run", 5, "string or null"),
    ],
)
def test_build_refuses_bad_fields(field: str, value: object, message: str) -> None:
    """Each field is checked and a bad one is named."""
    fields = _record().fields() | {field: value}
    with pytest.raises(RecordFormatError, match=message):
        Record.build(**fields)


def test_times_are_utc_with_microseconds() -> None:
    """Times are converted to UTC, always carry six decimals, and naive times are refused."""
    paris = datetime(2026, 11, 25, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(paris) == "2026-11-25T10:00:00.000000Z"
    assert parse_time(format_time(T0)) == T0
    with pytest.raises(RecordFormatError, match="no timezone"):
        format_time(datetime(2026, 11, 25, 10, 0))


# --- samples bodies --------------------------------------------------------------------------


def _samples() -> list[Sample]:
    return [
        Sample("temperature", 37.02, Quality.GOOD, T0, T0 - timedelta(microseconds=1500)),
        Sample("do", 40, Quality.UNCERTAIN, T0 + timedelta(milliseconds=20)),
        Sample("temperature", 37.0, Quality.GOOD, T0 + timedelta(seconds=1), T0),
        Sample("ph", None, Quality.BAD, T0 + timedelta(seconds=1), status="timeout"),
    ]


def test_samples_body_is_columnar() -> None:
    """A samples body holds tag indices, time offsets in µs, values and quality letters."""
    body = encode_samples(_samples())
    assert body == {
        "fmt": "s1",
        "t0": "2026-11-25T10:00:00.123456Z",
        "tags": ["temperature", "do", "ph"],
        "i": [0, 1, 0, 2],
        "at": [0, 20000, 1000000, 1000000],
        "st": [-1500, None, -1000000, None],
        "v": [37.02, 40, 37.0, None],
        "q": "gugb",
        "why": [[3, "timeout"]],
    }


def test_samples_decode_to_one_entry_per_sample() -> None:
    """Decoding a samples body gives back each sample's tag, value, quality and times."""
    decoded = decode_samples(json.loads(canonical(encode_samples(_samples()))))
    assert decoded[0] == {
        "tag": "temperature",
        "v": 37.02,
        "q": "good",
        "at": "2026-11-25T10:00:00.123456Z",
        "t": "2026-11-25T10:00:00.121956Z",
        "why": "",
    }
    assert decoded[3] == {
        "tag": "ph",
        "v": None,
        "q": "bad",
        "at": "2026-11-25T10:00:01.123456Z",
        "t": None,
        "why": "timeout",
    }


def test_nan_sample_is_kept_as_bad_with_its_text() -> None:
    """A NaN value is journaled as null with quality bad and the value's text, not refused."""
    body = encode_samples([Sample("do", float("nan"), Quality.GOOD, T0)])
    assert body["v"] == [None] and body["q"] == "b"
    assert body["why"] == [[0, "value nan cannot be journaled exactly"]]
    canonical(body)


# --- checkpoints and the worked example ------------------------------------------------------

EXAMPLE_SEED = bytes(range(32))  # a published throwaway key: never a unit's key


def worked_example() -> tuple[UnitKey, list[Record]]:
    """The journal of docs/record-format.md: an event, a samples batch and a checkpoint."""
    key = UnitKey.from_seed(EXAMPLE_SEED)
    clock = ManualClock(datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    with tempfile.TemporaryDirectory() as tmp:
        options = {"unit": "unit-demo", "signer": key, "clock": clock}
        with Journal.open(Path(tmp) / "journal.db", **options) as journal:  # type: ignore[arg-type]
            journal.append_sync(
                "event",
                {"what": "run_started", "recipe": "car-t-expansion", "version": 3},
                run="R-0001",
            )
            asyncio.run(clock.advance(1.25))
            start = clock.now() - timedelta(microseconds=1_020_000)
            journal.record_samples(
                [
                    Sample(
                        "temperature",
                        37.02,
                        Quality.GOOD,
                        start,
                        start - timedelta(microseconds=1500),
                    ),
                    Sample("do", 40.5, Quality.UNCERTAIN, start + timedelta(milliseconds=20)),
                    Sample("ph", None, Quality.BAD, start + timedelta(seconds=1), status="timeout"),
                ]
            )
            journal.flush_sync()
            asyncio.run(clock.advance(0.5))
            journal.checkpoint_sync("run_state: running")
            records = journal.read(0, 10)
    return key, records


def test_checkpoint_signs_every_member_of_its_verdict() -> None:
    """A checkpoint's signature verifies over canonical {purpose, unit, seq, head, time,
    reason} of its head, and its body holds nothing else than signed, key and sig."""
    key, records = worked_example()
    checkpoint = records[-1]
    signed = checkpoint.body["signed"]
    assert signed == {
        "purpose": "bedside-checkpoint/2",
        "unit": "unit-demo",
        "seq": 2,
        "head": records[1].hash_hex,
        "time": checkpoint.time,
        "reason": "run_state: running",
    }
    assert set(checkpoint.body) == {"signed", "key", "sig"}
    payload = canonical(signed)
    assert key.public_key.verify(base64.b64decode(checkpoint.body["sig"]), payload)
    assert checkpoint.body["key"] == hashlib.sha256(key.public_key.raw).hexdigest()[:16]


def test_worked_example_chain_verifies() -> None:
    """The worked example verifies with the example key."""
    key, records = worked_example()
    verifier = ChainVerifier(keys={key.key_id: key.public_key})
    for record in records:
        verifier.feed(record.data)
    assert verifier.checkpoints == 1 and verifier.seq == 3


def test_worked_example_matches_the_doc() -> None:
    """docs/record-format.md shows the bytes and hashes this code produces today."""
    key, records = worked_example()
    doc = DOC.read_text(encoding="utf-8")
    assert key.public_key.b64 in doc
    for record in records:
        assert record.data.decode() in doc
        assert record.hash_hex in doc


def _print_example() -> None:
    key, records = worked_example()
    print(f"public key (base64): {key.public_key.b64}")
    print(f"public key (hex):    {key.public_key.hex}")
    print(f"key id:              {key.key_id}")
    for record in records:
        print(f"\nrecord {record.seq} ({record.kind.value}), {len(record.data)} bytes:")
        print(record.data.decode())
        print(f"sha256: {record.hash_hex}")
    signed = records[-1].body["signed"]
    print("\ncheckpoint signed payload:")
    print(canonical(signed).decode())
    print(f"signature (hex): {base64.b64decode(records[-1].body['sig']).hex()}")
    assert PublicKey.parse(key.public_key.hex) == key.public_key


if __name__ == "__main__":
    _print_example()
