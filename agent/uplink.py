"""Store and forward: deliver the journal to the control site, in order, exactly once.

::

    uplink = Uplink(journal, "https://control.example:8443", unit_key=key, clock=clock,
                    verify="control-site-ca.pem")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run())          # until cancelled
    uplink.status()   # {"link": "up", "backlog": 0, "acked_seq": ..., ...}

The loop reads up to ``batch_max_records`` records after the journal's acknowledged seq,
compresses them (zlib, ``Content-Encoding: deflate``), signs the request with the unit key
(docs/record-format.md, "Uplink") and POSTs it to ``<url>/api/v1/ingest``. The answer
``{"ack": seq}`` is written to the journal (``mark_acknowledged``), so a restarted agent resumes
after it; records are never deleted here. With nothing to send it polls the journal's durable
seq every ``poll_interval`` clock seconds, so a new record is on its way within that delay.

Failures: a network error, a timeout or a 5xx is a link failure, retried with exponential
backoff (``backoff_initial`` doubling to ``backoff_max``, +-``jitter`` fraction, on the injected
clock). A 409 conflict (another ingest won a race) is retried at once; a 413 halves the batch. A
refusal (4xx: unknown unit, bad signature, broken chain, gap, a different stored record) or an
impossible acknowledgement is logged as an error, the records are kept, and the same batch is
offered again every ``backoff_max`` seconds in case an operator fixes the control site.

Link-state changes become journal records of kind ``uplink`` with body ``{"link": "up" |
"down" | "refused", ...}``. Only changes are recorded, and "down" only once the link has failed
for ``down_after`` seconds, so a flapping link does not flood the journal (each such record is
itself uplinked). ``status()`` reports the link immediately.

The URL must be ``https://``; plain ``http://`` is accepted only to loopback (127.0.0.0/8,
``::1``, ``localhost``: a control site on the same machine, the demo, tests), since the batches
carry patients' records. ``check_control_site_url`` says so before anything connects;
``bedside agent run`` calls it first of all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import random
import secrets
import ssl
import urllib.parse
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import structlog

from agent.record.format import JournalError, Kind, Record, Signer, format_time, uplink_payload
from drivers.clock import Clock

log = structlog.get_logger(__name__)

INGEST_PATH = "/api/v1/ingest"


class UplinkURLError(ValueError):
    """A control-site URL the uplink will not use; the message names it and says why."""


def _loopback(host: str) -> bool:
    if host.rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_control_site_url(url: str) -> str:
    """``url`` without a trailing slash, if the uplink may send to it: ``https://`` anywhere,
    ``http://`` only to loopback. Raises ``UplinkURLError`` naming the URL; connects nowhere."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a malformed port
    except ValueError as exc:
        raise UplinkURLError(f"control-site URL {url!r} is not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise UplinkURLError(
            f"control-site URL {url!r} must be https://host[:port] (or http:// to loopback)"
        )
    if parts.username is not None or parts.password is not None:
        raise UplinkURLError(f"control-site URL {url!r} must not carry a user or password")
    if parts.query or parts.fragment:
        raise UplinkURLError(f"control-site URL {url!r} must not have a query or fragment")
    if scheme == "http" and not _loopback(host):
        raise UplinkURLError(
            f"control-site URL {url!r} is plain http:// to {host}, which is not loopback: "
            "records would cross the network unencrypted; use https:// (with --ca for a "
            "self-signed certificate)"
        )
    return url.rstrip("/")


class UplinkJournal(Protocol):
    """What the uplink needs of ``agent.journal.journal.Journal``."""

    unit: str

    @property
    def durable_seq(self) -> int: ...

    @property
    def acknowledged_seq(self) -> int: ...

    def read(self, after_seq: int, limit: int = 100) -> list[Record]: ...

    def mark_acknowledged(self, seq: int) -> None: ...

    async def append(
        self, kind: Kind | str, body: dict[str, Any], run: str | None = None
    ) -> Record: ...


def build_request(
    records: Sequence[bytes], *, unit: str, key: Signer, time: str, nonce: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The compressed body and the signed headers of an ingest request for ``records``
    (canonical record bytes, contiguous in seq)."""
    body = zlib.compress(b"\n".join(records), 6)
    nonce = nonce or secrets.token_hex(16)
    signature = key.sign(uplink_payload(unit, time, nonce, hashlib.sha256(body).hexdigest()))
    headers = {
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "deflate",
        "Bedside-Unit": unit,
        "Bedside-Time": time,
        "Bedside-Nonce": nonce,
        "Bedside-Signature": _b64(signature),
    }
    return body, headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _LinkDown(Exception):
    """The control site could not be reached or failed (retry with backoff)."""


class _Again(Exception):
    """Send again soon: a lost race at the control site, or a batch halved after a 413."""


class _Refusal(Exception):
    """The control site refused the batch, or answered something impossible."""

    def __init__(self, status: int, error: str, reason: str, seq: int | None = None) -> None:
        super().__init__(f"HTTP {status} {error}: {reason}")
        self.status, self.error, self.reason, self.seq = status, error, reason, seq


def _ssl_verify(verify: str | bool | ssl.SSLContext) -> ssl.SSLContext | bool:
    """A CA file becomes an SSL context (httpx deprecates a path for ``verify``)."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


class Uplink:
    """The store-and-forward sender of one journal (see the module docstring)."""

    def __init__(
        self,
        journal: UplinkJournal,
        url: str,
        *,
        unit_key: Signer,
        clock: Clock,
        batch_max_records: int = 500,
        batch_max_bytes: int = 4 * 2**20,
        verify: str | bool | ssl.SSLContext = True,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        jitter: float = 0.2,
        poll_interval: float = 0.2,
        down_after: float = 30.0,
        timeout: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._journal = journal
        self.url = check_control_site_url(url)
        self._endpoint = self.url + INGEST_PATH
        self._key = unit_key
        self._clock = clock
        self._max_records = batch_max_records
        self._max_bytes = batch_max_bytes
        self._verify = _ssl_verify(verify)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._jitter = jitter
        self._poll = poll_interval
        self._down_after = down_after
        self._timeout = timeout
        self._rng = rng or random.Random()
        self._log = log.bind(unit=journal.unit, control_site=self.url)
        self._link = "unknown"
        self._recorded: str | None = None  # the link state last written to the journal
        self._failing_since: float | None = None
        self._last_refusal: tuple[int, str, int | None] | None = None
        self._last_error: str | None = None
        self._last_success: str | None = None
        self._bytes_sent = 0
        self._records_acked = 0

    def status(self) -> dict[str, Any]:
        """Link state, backlog (head seq - acknowledged seq) and the last success and error."""
        head, acked = self._journal.durable_seq, self._journal.acknowledged_seq
        return {
            "link": self._link,
            "backlog": max(0, head - acked),
            "head_seq": head,
            "acked_seq": acked,
            "last_error": self._last_error,
            "last_success": self._last_success,
            "bytes_sent": self._bytes_sent,
            "records_acked": self._records_acked,
        }

    async def run(self) -> None:
        """Deliver records until cancelled."""
        async with httpx.AsyncClient(verify=self._verify, timeout=self._timeout) as client:
            delay = self._backoff_initial
            while True:
                after = self._journal.acknowledged_seq
                if self._journal.durable_seq <= after:
                    await self._clock.sleep(self._poll)
                    continue
                try:
                    ack = await self._send(client, after)
                except _Again:
                    await self._clock.sleep(self._jittered(self._poll))
                    continue
                except _LinkDown as exc:
                    await self._link_failed(str(exc))
                    await self._clock.sleep(self._jittered(delay))
                    delay = min(delay * 2, self._backoff_max)
                    continue
                except _Refusal as exc:
                    await self._refused(exc)
                    await self._clock.sleep(self._jittered(self._backoff_max))
                    continue
                await self._delivered(after, ack)
                delay = self._backoff_initial

    def _jittered(self, delay: float) -> float:
        return delay * (1 + self._jitter * (2 * self._rng.random() - 1))

    def _batch(self, after: int) -> tuple[list[bytes], int]:
        """Canonical bytes of the records after ``after``, within the record and byte limits."""
        data: list[bytes] = []
        size = 0
        for record in self._journal.read(after, self._max_records):
            if data and size + len(record.data) > self._max_bytes:
                break
            data.append(record.data)
            size += len(record.data) + 1
        return data, after + len(data)

    async def _send(self, client: httpx.AsyncClient, after: int) -> int:
        """POST the next batch; returns the acknowledged seq."""
        try:
            records, last = await asyncio.to_thread(self._batch, after)
        except JournalError as exc:
            raise _LinkDown(f"cannot read the journal: {exc}") from exc
        if not records:  # the journal moved under us (a prune?): look again
            raise _Again
        body, headers = build_request(
            records, unit=self._journal.unit, key=self._key, time=format_time(self._clock.now())
        )
        try:
            response = await client.post(self._endpoint, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _LinkDown(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from exc
        self._bytes_sent += len(body)
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if status == 200:
            return self._check_ack(answer.get("ack"), after, last)
        if status == 409 and answer.get("retry"):
            raise _Again
        if status == 413 and len(records) > 1:
            self._max_records = max(1, len(records) // 2)
            self._log.warning("uplink_batch_halved", records=self._max_records)
            raise _Again
        if status >= 500 or status in (408, 429):
            raise _LinkDown(f"HTTP {status}: {answer.get('reason', response.reason_phrase)}")
        seq = answer.get("seq")
        raise _Refusal(
            status,
            str(answer.get("error", "refused")),
            str(answer.get("reason", response.reason_phrase)),
            seq if isinstance(seq, int) else None,
        )

    def _check_ack(self, ack: Any, after: int, last: int) -> int:
        if isinstance(ack, bool) or not isinstance(ack, int):
            raise _Refusal(200, "bad_answer", f"acknowledgement {ack!r} is not a seq")
        if ack > self._journal.durable_seq:
            raise _Refusal(
                200,
                "impossible_ack",
                f"acknowledged record {ack} but the journal ends at {self._journal.durable_seq}",
            )
        if ack < last:
            raise _Refusal(
                200, "short_ack", f"sent records {after + 1}-{last} but only {ack} acknowledged"
            )
        return ack

    async def _delivered(self, after: int, ack: int) -> None:
        if self._link != "up":
            (self._log.info if self._link != "unknown" else self._log.debug)(
                "uplink_up", acked_seq=ack, after=self._link
            )
        self._link, self._failing_since, self._last_refusal = "up", None, None
        if self._recorded != "up":  # journaled before the ack: the backlog never reads 0 early
            await self._record({"link": "up", "acked": ack})
        self._journal.mark_acknowledged(ack)
        self._records_acked += ack - after
        self._last_success = format_time(self._clock.now())

    async def _link_failed(self, error: str) -> None:
        self._last_error = error
        now = self._clock.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if self._link != "down":
            self._log.error("uplink_down", error=error, backlog=self.status()["backlog"])
            self._link = "down"
        else:
            self._log.debug("uplink_still_down", error=error)
        if self._recorded != "down" and now - self._failing_since >= self._down_after:
            await self._record({"link": "down", "error": error})

    async def _refused(self, exc: _Refusal) -> None:
        self._last_error = str(exc)
        key = (exc.status, exc.error, exc.seq)
        if key != self._last_refusal:
            self._log.error(
                "uplink_refused", status=exc.status, error=exc.error, seq=exc.seq, reason=exc.reason
            )
        else:
            self._log.debug("uplink_still_refused", error=exc.error, seq=exc.seq)
        self._last_refusal = key
        self._link, self._failing_since = "refused", None
        if self._recorded != "refused":
            body = {"link": "refused", "status": exc.status, "error": exc.error, "seq": exc.seq}
            await self._record({**body, "reason": exc.reason})

    async def _record(self, body: dict[str, Any]) -> None:
        """Journal a link-state change (the state counts as recorded only once it is)."""
        try:
            await self._journal.append(Kind.UPLINK, body)
        except JournalError as exc:
            self._log.error("uplink_state_not_journaled", link=body["link"], error=str(exc))
            return
        self._recorded = body["link"]
