"""Ingest: verify a unit's batch of journal records and store it, exactly once per (unit, seq).

A request (docs/record-format.md, "Uplink") carries the unit id, a time, a nonce and an
Ed25519 signature by the enrolled unit key over ``agent.record.format.uplink_payload`` of them and
the SHA-256 of the compressed body. The body is the zlib (``deflate``) or gzip stream of
canonical records separated by newlines, contiguous in seq.

Verification, in order, each failure a ``Refused`` naming the record where one can be named:

1. the unit is enrolled (401 ``unknown_unit``) and the request signature verifies with its key
   (401 ``bad_signature``); the body decompresses within the size limit (413/400);
2. the batch does not start past the stored head + 1 (422 ``gap``);
3. the batch is one chain (``agent.record.verify.ChainVerifier``): every record of this unit
   (``foreign_record``), contiguous, each ``prev`` the previous hash, checkpoints signed by the
   enrolled key (422 ``chain_broken``);
4. records at seqs already stored are byte-identical to them (422 ``differs``): a resend after a
   lost acknowledgement is fine, a journal truncated and re-extended is not;
5. the first new record links to the stored head (422 ``chain_broken``).

Then the new records, the unit's head and the latest tag values are stored in one
transaction; a concurrent ingest that moved the head first makes us re-read and retry, and after
``attempts`` lost races the request is answered 409 ``conflict`` (``retry``: the uplink tries
again). The answer is the new acknowledged seq: the highest contiguous stored seq.

A refusal in step 1 writes nothing at all: a stranger (an id that is not enrolled, a signature
that does not verify, a malformed request) cannot create a row in any table. A refusal after
the request proved the unit's key raises a tamper alarm for that unit (``controlsite.alarms``:
de-duplicated and bounded in the database), except a conflict, an oversize body or an unknown
encoding, which are not evidence of tampering. Every text that leaves here (the answer's
``reason``, the log, the alarm) is cleaned of control characters and markup and bounded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from agent.record.format import (
    ChainBroken,
    Kind,
    Record,
    RecordFormatError,
    decode_samples,
    parse_time,
    uplink_payload,
)
from agent.record.keys import PublicKey
from agent.record.verify import ChainVerifier
from controlsite.alarms import AlarmPolicy, clean_text
from controlsite.store.base import (
    UNIT_ID_RE,
    ControlSiteError,
    HeadConflict,
    Latest,
    Store,
    Unit,
)

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 16 * 2**20  # compressed
MAX_RECORDS_BYTES = 128 * 2**20  # decompressed
ENCODINGS = {"deflate": zlib.MAX_WBITS, "gzip": zlib.MAX_WBITS | 16}
_NO_ALARM = frozenset({"conflict", "stale_request", "too_large", "bad_request"})
_STRANGERS_REMEMBERED = 256  # refusals of unauthenticated requests de-duplicated in the log


class Refused(ControlSiteError):
    """A request or batch the control site will not store; ``status`` is the HTTP status."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        *,
        seq: int | None = None,
        head: int | None = None,
    ) -> None:
        where = f"record {seq}: " if seq is not None else ""
        super().__init__(f"{where}{reason}")
        self.status = status
        self.error = error
        self.reason = reason
        self.seq = seq
        self.head = head

    @property
    def text(self) -> str:
        """The message, cleaned (bounded, no control characters or markup): what is shown."""
        return clean_text(str(self))

    @property
    def alarm(self) -> bool:
        """Whether this refusal raises a tamper alarm."""
        return self.error not in _NO_ALARM

    @property
    def retry(self) -> bool:
        """Whether the same request may succeed if sent again (a lost race)."""
        return self.error == "conflict"

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer."""
        return {
            "error": self.error,
            "reason": self.text,
            "seq": self.seq,
            "head": self.head,
            "retry": self.retry,
        }


@dataclass(frozen=True, slots=True)
class IngestRequest:
    """What ingest needs of an HTTP request: the four Bedside-* headers and the raw body."""

    unit: str
    time: str
    nonce: str
    signature: str
    encoding: str
    body: bytes


@dataclass(frozen=True, slots=True)
class IngestResult:
    """The acknowledged seq, how many records were new and how many already stored."""

    ack: int
    stored: int
    duplicates: int


class Ingestor:
    """Verifies and stores batches into ``store``; stateless apart from log de-duplication, so
    any number may run side by side on one database."""

    def __init__(
        self,
        store: Store,
        *,
        now: Callable[[], datetime],
        max_skew: float | None = None,
        attempts: int = 5,
        max_records_bytes: int = MAX_RECORDS_BYTES,
        alarms: AlarmPolicy | None = None,
    ) -> None:
        self.store = store
        self._now = now
        self._max_skew = max_skew
        self._attempts = attempts
        self._max_records_bytes = max_records_bytes
        self._alarms = alarms or AlarmPolicy()
        # last refusal per enrolled unit (bounded by the enrolled units) ...
        self._last_refusal: dict[str, tuple[str, int | None]] = {}
        # ... and the recent refusals of strangers, bounded: they choose their unit ids
        self._strangers: OrderedDict[tuple[str, str], None] = OrderedDict()

    def ingest(self, request: IngestRequest) -> IngestResult:
        """Verify and store one batch; raises ``Refused`` (after recording a tamper alarm when
        the request proved the unit's key)."""
        try:
            unit = self._authenticate(request)
        except Refused as exc:
            self._stranger_refused(request.unit, exc)
            raise
        try:
            result = self._ingest(unit, request)
        except Refused as exc:
            self._refused(unit.id, exc)
            raise
        if self._last_refusal.pop(unit.id, None) is not None:
            log.info("ingest_recovered", unit=unit.id, ack=result.ack)
        return result

    def admit(self, unit: str) -> None:
        """Refuse (and log) a request naming a unit that is not enrolled, before its body is
        read: a stranger costs a lookup, not a buffered body."""
        try:
            self._enrolled(unit)
        except Refused as exc:
            self._stranger_refused(unit, exc)
            raise

    def _enrolled(self, unit_id: str) -> Unit:
        if not UNIT_ID_RE.match(unit_id):
            raise Refused(400, "bad_request", f"unit id {unit_id!r} is not valid")
        unit = self.store.unit(unit_id)
        if unit is None:
            raise Refused(401, "unknown_unit", f"unit {unit_id!r} is not enrolled")
        return unit

    def _stranger_refused(self, unit: str, exc: Refused) -> None:
        """Log a refusal of an unauthenticated request, once per (unit, error) while recent."""
        key = (unit[:64], exc.error)
        repeat = key in self._strangers
        self._strangers[key] = None
        self._strangers.move_to_end(key)
        while len(self._strangers) > _STRANGERS_REMEMBERED:
            self._strangers.popitem(last=False)
        report = log.debug if repeat else log.warning
        unit_text = clean_text(unit, 64)
        report("ingest_refused_unauthenticated", unit=unit_text, error=exc.error, reason=exc.text)

    def _refused(self, unit: str, exc: Refused) -> None:
        if exc.alarm:
            self._alarms.record(self.store, unit, self._now(), exc.error, str(exc), exc.seq)
        repeat = self._last_refusal.get(unit) == (exc.error, exc.seq)
        self._last_refusal[unit] = (exc.error, exc.seq)
        report = log.debug if repeat or exc.retry else log.error
        report("ingest_refused", unit=unit, error=exc.error, seq=exc.seq, reason=exc.text)

    def _ingest(self, unit: Unit, request: IngestRequest) -> IngestResult:
        lines = self._decompress(request)
        if not lines:
            return IngestResult(unit.head_seq, 0, 0)
        try:
            first = Record.parse(lines[0])
        except RecordFormatError as exc:
            raise Refused(422, "chain_broken", f"first record of the batch: {exc}") from exc
        for _ in range(self._attempts):
            try:
                return self._store_batch(unit.id, unit.public_key, first, lines)
            except HeadConflict as exc:
                log.debug("ingest_head_conflict", unit=unit.id, detail=str(exc))
        raise Refused(
            409,
            "conflict",
            f"unit {unit.id!r}: {self._attempts} concurrent ingests moved the head first; "
            "send again",
            seq=first.seq,
        )

    def _authenticate(self, request: IngestRequest) -> Unit:
        unit = self._enrolled(request.unit)
        try:
            signature = base64.b64decode(request.signature, validate=True)
            when = parse_time(request.time)
        except (ValueError, binascii.Error, RecordFormatError) as exc:
            raise Refused(401, "bad_signature", f"malformed signature or time: {exc}") from exc
        digest = hashlib.sha256(request.body).hexdigest()
        payload = uplink_payload(request.unit, request.time, request.nonce, digest)
        if not unit.public_key.verify(signature, payload):
            raise Refused(
                401,
                "bad_signature",
                f"request signature does not verify with the key of unit {unit.id!r} "
                f"({unit.public_key.key_id})",
            )
        if self._max_skew is not None:
            skew = abs((self._now() - when).total_seconds())
            if skew > self._max_skew:
                raise Refused(
                    401, "stale_request", f"request time {request.time} is {skew:.0f} s off"
                )
        return unit

    def _decompress(self, request: IngestRequest) -> list[bytes]:
        wbits = ENCODINGS.get(request.encoding)
        if wbits is None:
            raise Refused(
                400, "bad_request", f"Content-Encoding {request.encoding!r} is not deflate or gzip"
            )
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(request.body, self._max_records_bytes + 1)
        except zlib.error as exc:
            raise Refused(400, "bad_body", f"body does not inflate: {exc}") from exc
        if len(data) > self._max_records_bytes:
            raise Refused(
                413, "too_large", f"batch inflates beyond {self._max_records_bytes} bytes"
            )
        if not inflater.eof or inflater.unused_data:
            raise Refused(400, "bad_body", "compressed body is truncated or has trailing bytes")
        return [line for line in data.split(b"\n") if line]

    def _store_batch(
        self, unit_id: str, key: PublicKey, first: Record, lines: Sequence[bytes]
    ) -> IngestResult:
        unit = self.store.unit(unit_id)
        assert unit is not None  # enrolled units are never removed
        head = unit.head_seq
        if first.seq > head + 1:
            raise Refused(
                422,
                "gap",
                f"missing: the batch starts at record {first.seq} but the control site holds "
                f"records up to {head}",
                seq=head + 1,
                head=head,
            )
        verifier = ChainVerifier(
            unit=unit_id,
            keys={key.key_id: key},
            anchor_seq=first.seq - 1,
            anchor_hash=first.prev,
        )
        try:
            records = [verifier.feed(line) for line in lines]
        except ChainBroken as exc:
            error = "foreign_record" if "another unit" in exc.reason else "chain_broken"
            raise Refused(422, error, exc.reason, seq=exc.seq, head=head) from exc
        stored = self.store.stored_hashes(unit_id, first.seq, min(records[-1].seq, head))
        for record in records:
            if record.seq > head:
                break
            if stored.get(record.seq) != record.hash:
                raise Refused(
                    422,
                    "differs",
                    f"differs from the stored record {record.seq} (hash "
                    f"{record.hash_hex[:16]}...): the journal was changed, or truncated and "
                    "re-extended",
                    seq=record.seq,
                    head=head,
                )
        new = [r for r in records if r.seq > head]
        if new and new[0].prev != unit.head_hash:
            raise Refused(
                422,
                "chain_broken",
                f"holds prev {new[0].prev[:16]}... but the stored record {head} hashes to "
                f"{unit.head_hash[:16]}...",
                seq=new[0].seq,
                head=head,
            )
        self.store.append(unit_id, head, new, latest_values(new))
        return IngestResult(max(head, records[-1].seq), len(new), len(records) - len(new))


def latest_values(records: Sequence[Record]) -> list[Latest]:
    """The last sample of each tag in the ``samples`` records.

    Records are read newest first and only the last sample of each tag not yet found is
    decoded: a drained backlog of 100,000 samples decodes a few dozen, not all of them."""
    latest: dict[str, Latest] = {}
    for record in reversed(records):
        if record.kind is not Kind.SAMPLES:
            continue
        try:
            samples = decode_samples(_last_of_each_tag(record.body, latest))
        except (RecordFormatError, KeyError, IndexError, TypeError, ValueError) as exc:
            # authentic (chained, stored) but not a samples body we can read: keep the record
            log.warning("samples_body_unreadable", unit=record.unit, seq=record.seq, error=str(exc))
            continue
        for s in samples:
            latest.setdefault(
                s["tag"], Latest(s["tag"], s["v"], s["q"], s["t"] or s["at"], record.seq)
            )
    return list(latest.values())


def _last_of_each_tag(body: Mapping[str, Any], found: Mapping[str, Latest]) -> dict[str, Any]:
    """A samples body holding only the last sample of each tag of ``body`` not in ``found``."""
    tags, idx = body["tags"], body["i"]
    n = len(idx)
    if any(len(body[c]) != n for c in ("at", "st", "v", "q")):
        raise RecordFormatError("samples body columns i, at, st, v, q differ in length")
    wanted = {k for k, tag in enumerate(tags) if tag not in found}
    picks: list[int] = []
    for k in range(n - 1, -1, -1):
        if not wanted:
            break
        if idx[k] in wanted:
            wanted.discard(idx[k])
            picks.append(k)
    picks.reverse()
    notes = {int(k): text for k, text in body.get("why", [])}
    sub: dict[str, Any] = {
        "fmt": body.get("fmt"),
        "t0": body["t0"],
        "tags": tags,
        **{c: [body[c][k] for k in picks] for c in ("i", "at", "st", "v")},
        "q": "".join(body["q"][k] for k in picks),
    }
    sub["why"] = [[j, notes[k]] for j, k in enumerate(picks) if k in notes]
    return sub
