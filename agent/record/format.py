"""The journal's record format, shared by the agent and the control site.

A record is the RFC 8785 canonical JSON of ``{unit, seq, time, kind, run, body, prev}``; its
hash is the SHA-256 of those bytes and the next record's ``prev`` is that hash in hex. The
format is specified for auditors in ``docs/record-format.md``; this module is its reference
implementation and imports nothing of the agent's runtime (the control site imports it).

Errors of the journal, its keys and its verification form one tree::

    JournalError                 any failure of the signed journal or its keys
    ├── RecordFormatError        a record or body that cannot be encoded or parsed (NaN, bad kind,
    │                            non-canonical bytes); the message names the field
    ├── ChainBroken              verification failed; ``seq`` and ``reason`` name the first bad
    │                            record (changed, missing, out of place, foreign, badly signed)
    ├── JournalStorageError      SQLite failed (disk full, not a journal, locked by another writer)
    └── UnitKeyError             the unit key is missing, already exists, unreadable or exposed
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import rfc8785

if TYPE_CHECKING:
    from drivers.base import Sample

FORMAT_VERSION = 1
ZERO_HASH = "0" * 64
RECORD_FIELDS = frozenset({"unit", "seq", "time", "kind", "run", "body", "prev"})
SAMPLES_FORMAT = "s1"
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_US = timedelta(microseconds=1)
_SAFE_INT = 2**53 - 1


class JournalError(Exception):
    """Any failure of the signed journal or its keys."""


class RecordFormatError(JournalError, ValueError):
    """A record or body that cannot be encoded or parsed; the message names the field."""


class ChainBroken(JournalError):
    """Verification failed at record ``seq`` (``None`` when no record can be named)."""

    def __init__(self, seq: int | None, reason: str) -> None:
        where = f"record {seq}" if seq is not None else "journal"
        super().__init__(f"{where}: {reason}")
        self.seq = seq
        self.reason = reason


class JournalStorageError(JournalError):
    """The journal's SQLite file could not be read or written."""


class UnitKeyError(JournalError):
    """The unit key is missing, already exists, cannot be read or is readable by others."""


class Kind(enum.StrEnum):
    """What a record holds."""

    SAMPLES = "samples"  # a batch of tag samples (columnar body, see encode_samples)
    EVENT = "event"  # engine and service events (state changes, setpoint writes)
    ALARM = "alarm"  # alarm state changes
    AUDIT = "audit"  # operator actions: who, what, old value, new value, why
    SIGNATURE = "signature"  # an operator's electronic signature bound to a record
    CHECKPOINT = "checkpoint"  # the unit key's signature over (unit, seq, head hash)
    UPLINK = "uplink"  # link-state events of the uplink (connected, lost, refused)


class Signer(Protocol):
    """What a checkpoint needs of a key (``agent.record.keys.UnitKey``)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class _Public(Protocol):
    @property
    def b64(self) -> str: ...


class PublicSigner(Signer, Protocol):
    """A signer whose public key is known (a key rotation names it)."""

    @property
    def public_key(self) -> _Public: ...


def format_time(when: datetime) -> str:
    """A timezone-aware time as RFC 3339 UTC with microseconds: ``2026-11-25T10:00:00.123456Z``."""
    if when.tzinfo is None:
        raise RecordFormatError(f"time {when.isoformat()} has no timezone; records need UTC")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """The inverse of ``format_time``; refuses any other spelling."""
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise RecordFormatError(f"time {text!r} is not RFC 3339 UTC with microseconds")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _find_unencodable(value: Any, path: str) -> str | None:
    """The path and problem of the first value RFC 8785 cannot encode, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value!r}; NaN and Infinity cannot be journaled"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE_INT:
        return f"{path} is {value}, beyond the exact integer range of JSON (±2**53-1)"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            found = _find_unencodable(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _find_unencodable(item, f"{path}[{index}]")
            if found:
                return found
    elif not isinstance(value, str | int | float | bool) and value is not None:
        return f"{path} is a {type(value).__name__}, which JSON cannot hold"
    return None


def canonical(value: Any, *, what: str = "value") -> bytes:
    """RFC 8785 canonical bytes of a JSON value; errors name the offending field."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        problem = _find_unencodable(value, what) or f"{what}: {exc}"
        raise RecordFormatError(problem) from exc


def record_hash(data: bytes) -> bytes:
    """SHA-256 of a record's canonical bytes (raw 32 bytes)."""
    return hashlib.sha256(data).digest()


def _refuse_constant(name: str) -> Any:
    raise RecordFormatError(f"{name} is not valid in a record")


@dataclass(frozen=True, slots=True, eq=False)
class Record:
    """One journal record: its fields, its canonical bytes ``data`` and its SHA-256 ``hash``."""

    unit: str
    seq: int
    time: str
    kind: Kind
    run: str | None
    body: dict[str, Any]
    prev: str
    data: bytes = field(repr=False)
    hash: bytes = field(repr=False)

    @property
    def hash_hex(self) -> str:
        """The hash in hex, as the next record's ``prev`` holds it."""
        return self.hash.hex()

    def fields(self) -> dict[str, Any]:
        """The seven fields as a JSON-ready dict."""
        return {
            "unit": self.unit,
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind.value,
            "run": self.run,
            "body": self.body,
            "prev": self.prev,
        }

    @classmethod
    def build(
        cls,
        *,
        unit: str,
        seq: int,
        time: str,
        kind: Kind | str,
        run: str | None,
        body: dict[str, Any],
        prev: str,
    ) -> Record:
        """Encode a new record; raises ``RecordFormatError`` naming a field that cannot be."""
        kind = _kind(kind)
        obj = {"unit": unit, "seq": seq, "time": time, "kind": kind.value, "run": run}
        _check_fields({**obj, "body": body, "prev": prev})
        data = canonical({**obj, "body": body, "prev": prev}, what="record")
        return cls(unit, seq, time, kind, run, body, prev, data, record_hash(data))

    @classmethod
    def parse(cls, data: bytes, *, strict: bool = True, canonical_check: bool = True) -> Record:
        """Decode stored bytes. ``strict`` also checks every field and, unless
        ``canonical_check`` is false, that the bytes are exactly canonical (so no byte can
        change without changing the hash's meaning). The agent's start-up skips only the latter:
        it accepts nothing that does not hash-chain to its own signature, i.e. bytes it wrote."""
        try:
            obj = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordFormatError(f"not JSON: {exc}") from exc
        if not isinstance(obj, dict) or set(obj) != RECORD_FIELDS:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise RecordFormatError(
                f"a record has exactly the fields {sorted(RECORD_FIELDS)}, found {keys}"
            )
        if strict:
            _check_fields(obj)
            if canonical_check and canonical(obj, what="record") != bytes(data):
                raise RecordFormatError("bytes are not the RFC 8785 canonical form of the record")
        return cls(
            obj["unit"],
            obj["seq"],
            obj["time"],
            _kind(obj["kind"]),
            obj["run"],
            obj["body"],
            obj["prev"],
            bytes(data),
            record_hash(data),
        )


def _kind(kind: Kind | str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        raise RecordFormatError(
            f"kind {kind!r} is not one of {', '.join(k.value for k in Kind)}"
        ) from None


def _check_fields(obj: Mapping[str, Any]) -> None:
    unit, seq, run, body, prev = obj["unit"], obj["seq"], obj["run"], obj["body"], obj["prev"]
    if not isinstance(unit, str) or not unit:
        raise RecordFormatError(f"unit {unit!r} must be a non-empty string")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise RecordFormatError(f"seq {seq!r} must be an integer from 1")
    parse_time(obj["time"])
    _kind(obj["kind"])
    if run is not None and not isinstance(run, str):
        raise RecordFormatError(f"run {run!r} must be a string or null")
    if not isinstance(body, dict):
        raise RecordFormatError(f"body must be a JSON object, not {type(body).__name__}")
    if not isinstance(prev, str) or not _HEX64_RE.match(prev):
        raise RecordFormatError(f"prev {prev!r} must be 64 lowercase hex digits")


# --- checkpoints, anchors and head signatures -----------------------------------------------

CHECKPOINT_PURPOSE = "bedside-checkpoint/2"
ANCHOR_PURPOSE = "bedside-anchor/1"
HEAD_PURPOSE = "bedside-head/1"
MAX_REASON = 200
CHECKPOINT_BODY = frozenset({"signed", "key", "sig"})
CHECKPOINT_SIGNED = frozenset({"purpose", "unit", "seq", "head", "time", "reason"})


def b64(data: bytes) -> str:
    """Standard base64 with padding, as signatures are written."""
    return base64.b64encode(data).decode("ascii")


def checkpoint_signed(
    unit: str, seq: int, head: str, time: str, reason: str, *, rotate: dict[str, str] | None = None
) -> dict[str, Any]:
    """What a checkpoint signs: every member that can influence a verdict (see
    docs/record-format.md §3). ``rotate`` ({from, to}: base64 public keys) makes it a key
    rotation."""
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise RecordFormatError(f"checkpoint reason must be text of at most {MAX_REASON} chars")
    signed: dict[str, Any] = {
        "purpose": CHECKPOINT_PURPOSE,
        "unit": unit,
        "seq": seq,
        "head": head,
        "time": time,
        "reason": reason,
    }
    if rotate is not None:
        signed["rotate"] = rotate
    return signed


def checkpoint_body(
    signer: Signer,
    *,
    unit: str,
    seq: int,
    head: str,
    time: str,
    reason: str,
    next_signer: PublicSigner | None = None,
) -> dict[str, Any]:
    """The body of a checkpoint record that follows record ``seq`` whose hash is ``head``.

    With ``next_signer`` the checkpoint also rotates the unit key: it names both public keys
    and carries the next key's signature over the same bytes (``next_sig``), so neither key
    alone can introduce the other."""
    rotate = None
    if next_signer is not None:
        current = getattr(signer, "public_key", None)
        if current is None:
            raise RecordFormatError("a key rotation needs the current key's public key")
        rotate = {"from": current.b64, "to": next_signer.public_key.b64}
    signed = checkpoint_signed(unit, seq, head, time, reason, rotate=rotate)
    payload = canonical(signed, what="signed")
    body = {"signed": signed, "key": signer.key_id, "sig": b64(signer.sign(payload))}
    if next_signer is not None:
        body["next_sig"] = b64(next_signer.sign(payload))
    return body


def anchor_payload(unit: str, seq: int, hash_hex: str) -> bytes:
    """The bytes a prune anchor's signature covers: records up to ``seq`` were deleted and the
    last of them hashed to ``hash_hex``."""
    signed = {"purpose": ANCHOR_PURPOSE, "unit": unit, "seq": seq, "hash": hash_hex}
    return canonical(signed, what="anchor")


def head_payload(unit: str, seq: int, hash_hex: str) -> bytes:
    """The bytes of the journal's head signature (``meta.head_sig``), renewed with every commit:
    the agent's proof, at its next start, that it wrote the unsealed tail itself."""
    return canonical({"purpose": HEAD_PURPOSE, "unit": unit, "seq": seq, "head": hash_hex})


# --- samples ---------------------------------------------------------------------------------

_QUALITY_CODE = {"good": "g", "uncertain": "u", "bad": "b"}
_QUALITY_NAME = {code: name for name, code in _QUALITY_CODE.items()}


def encode_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    """The columnar body of a ``samples`` record (format ``s1``, see docs/record-format.md).

    A value JSON cannot hold exactly (NaN, Infinity, an integer beyond ±2**53-1) is journaled
    as null with quality bad and its text in ``why``: the batch is never refused for one value.
    """
    if not samples:
        raise RecordFormatError("a samples record needs at least one sample")
    t0 = samples[0].agent_time
    tags: dict[str, int] = {}
    idx: list[int] = []
    at: list[int] = []
    st: list[int | None] = []
    values: list[Any] = []
    quality: list[str] = []
    why: list[list[Any]] = []
    try:
        for n, s in enumerate(samples):
            idx.append(tags.setdefault(s.tag, len(tags)))
            at.append((s.agent_time - t0) // _US)
            st.append(None if s.source_time is None else (s.source_time - s.agent_time) // _US)
            value, code = s.value, _QUALITY_CODE[s.quality.value]
            if (isinstance(value, float) and not math.isfinite(value)) or (
                isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE_INT
            ):
                note = f"value {value!r} cannot be journaled exactly"
                why.append([n, f"{note}; {s.status}" if s.status else note])
                value, code = None, "b"
            elif s.status:
                why.append([n, s.status])
            values.append(value)
            quality.append(code)
    except TypeError as exc:  # a naive datetime among aware ones
        raise RecordFormatError(f"sample {n} of tag {s.tag!r}: {exc}") from exc
    body: dict[str, Any] = {
        "fmt": SAMPLES_FORMAT,
        "t0": format_time(t0),
        "tags": list(tags),
        "i": idx,
        "at": at,
        "st": st,
        "v": values,
        "q": "".join(quality),
    }
    if why:
        body["why"] = why
    return body


def decode_samples(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Expand a ``samples`` body into one dict per sample: tag, v, q (good/uncertain/bad),
    at and t (RFC 3339; t is null without a source time) and why (status text or "")."""
    if body.get("fmt") != SAMPLES_FORMAT:
        raise RecordFormatError(f"samples body format {body.get('fmt')!r} is not {SAMPLES_FORMAT}")
    t0 = parse_time(body["t0"])
    n = len(body["i"])
    columns = ("at", "st", "v")
    if any(len(body[c]) != n for c in columns) or len(body["q"]) != n:
        raise RecordFormatError("samples body columns i, at, st, v, q differ in length")
    notes = {int(i): str(text) for i, text in body.get("why", [])}
    out = []
    for k in range(n):
        agent = t0 + body["at"][k] * _US
        offset = body["st"][k]
        out.append(
            {
                "tag": body["tags"][body["i"][k]],
                "v": body["v"][k],
                "q": _QUALITY_NAME[body["q"][k]],
                "at": format_time(agent),
                "t": None if offset is None else format_time(agent + offset * _US),
                "why": notes.get(k, ""),
            }
        )
    return out


# --- uplink requests -------------------------------------------------------------------------

UPLINK_PURPOSE = "bedside-uplink/1"


def uplink_payload(unit: str, time: str, nonce: str, body_sha256: str) -> bytes:
    """The bytes an uplink request's ``Bedside-Signature`` signs: canonical JSON of
    ``{purpose, unit, time, nonce, sha256}`` with ``sha256`` the hex digest of the request
    body exactly as sent (compressed). See docs/record-format.md, "Uplink"."""
    signed = {
        "purpose": UPLINK_PURPOSE,
        "unit": unit,
        "time": time,
        "nonce": nonce,
        "sha256": body_sha256,
    }
    return canonical(signed, what="signed")
