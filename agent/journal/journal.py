"""The unit's journal: an append-only, hash-chained, checkpoint-signed SQLite store.

::

    async with Journal.open(path, unit="unit-7", signer=key, clock=clock) as journal:
        record = await journal.append("event", {"what": "run_started"}, run="R-1")  # durable
        journal.record_samples(samples)        # buffered; one samples record per flush (~1 s)
        await journal.checkpoint("run_held")   # signed (unit, seq, head hash)
        batch = journal.read(after_seq=0, limit=100)

Storage: one ``records`` table (seq, time, kind, run, hash, canonical bytes) and a ``meta``
table (unit, pruned anchor, last acknowledgement, public keys), WAL mode with
``synchronous=FULL``: a commit has reached the disk when it returns.

Concurrency: every write goes through one writer thread with its own connection, fed by a
queue. It takes whatever jobs are waiting, writes them in one transaction (group commit) and
resolves their futures after the commit, so the event loop never waits on an fsync and seq/prev
are assigned in exactly one place. Reads use a second connection (WAL readers never block the
writer) and see only committed records.

Opening verifies the whole journal under the unit's own key before writing anything and refuses
a journal that does not verify, names keys, or whose unsealed tail is not the head the agent
signed at its last commit (``ChainBroken`` names the record; the file is left untouched); a
transaction torn by a crash is simply absent. The
sync form ``with Journal.open(...) as journal`` serves tools: no background timer; use the
``*_sync`` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog

from agent.journal.files import checkpoint_rows, iter_rows, meta_ack, meta_anchor, read_meta
from agent.journal.writer import SET_META, Head, JournalWriter, connect
from agent.record.format import (
    ZERO_HASH,
    ChainBroken,
    JournalError,
    JournalStorageError,
    Kind,
    Record,
    RecordFormatError,
    Signer,
    canonical,
)
from agent.record.verify import ChainVerifier, head_signed, root_keys

if TYPE_CHECKING:
    from drivers.base import Sample
    from drivers.clock import Clock

log = structlog.get_logger(__name__)

FORMAT = "2"
# signature records are written only by append_signed, bound to the record they sign
APPENDABLE = frozenset({Kind.EVENT, Kind.ALARM, Kind.AUDIT, Kind.UPLINK})


class Journal:
    """The signed, hash-chained journal of one unit (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        unit: str,
        signer: Signer,
        clock: Clock,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        sample_batch_seconds: float = 1.0,
        max_samples_per_record: int = 5000,
        low_disk_bytes: int = 256 * 2**20,
    ) -> None:
        self.path = Path(path)
        self.unit = unit
        self.low_disk_bytes = low_disk_bytes
        self._signer = signer
        self._clock = clock
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._batch_seconds = sample_batch_seconds
        self._max_samples = max_samples_per_record
        self._log = log.bind(unit=unit, journal=str(self.path))
        self._buffer: list[Sample] = []
        self._buffer_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: JournalWriter | None = None
        self._timer: asyncio.Task[None] | None = None
        self._open = False
        self._lock_fd = -1

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        unit: str,
        signer: Signer,
        clock: Clock,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        sample_batch_seconds: float = 1.0,
        max_samples_per_record: int = 5000,
        low_disk_bytes: int = 256 * 2**20,
    ) -> Journal:
        """A journal to enter with ``async with`` (service: timer flushes and checkpoints) or
        ``with`` (tools: the ``*_sync`` methods, no timer). The file is opened, locked against
        a second writer and its tail verified on entry."""
        return cls(
            path,
            unit=unit,
            signer=signer,
            clock=clock,
            checkpoint_every=checkpoint_every,
            checkpoint_seconds=checkpoint_seconds,
            sample_batch_seconds=sample_batch_seconds,
            max_samples_per_record=max_samples_per_record,
            low_disk_bytes=low_disk_bytes,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._start)
        self._timer = asyncio.create_task(self._tick(), name=f"journal-timer-{self.unit}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await asyncio.to_thread(self._stop)

    def __enter__(self) -> Self:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalStorageError(f"journal {self.path} is open in another process") from exc
        try:
            self._conn = connect(self.path)
            self._reader = connect(self.path)
            self._writer = self._recover()
        except BaseException:
            self._close_files()
            raise
        self._writer.start()
        self._open = True
        try:
            self._submit("seal", "open").result()  # sign whatever survived the last stop
        except BaseException:
            self._open = False
            self._writer.stop()
            self._close_files()
            raise

    def _recover(self) -> JournalWriter:
        """Verify the whole journal under the unit's own key and return a writer at its head.

        Nothing is written before the journal has verified: a journal that names other keys,
        whose history does not verify under the unit key (or the keys it rotated from, each
        vouched for by its successor), or whose unsealed tail is not covered by the head
        signature the agent renews with every commit, is refused with ``ChainBroken`` and left
        untouched, so the agent never signs what it did not write."""
        conn = self._conn
        meta = read_meta(conn)
        own = getattr(self._signer, "public_key", None)
        if own is None:
            raise JournalError("the journal's signer has no public key to verify with")
        if "unit" not in meta:
            return self._create(conn, own)
        if meta["unit"] != self.unit:
            raise JournalError(
                f"journal {self.path} belongs to unit {meta['unit']!r}, not {self.unit!r}"
            )
        if meta.get("format") != FORMAT:
            raise JournalError(
                f"journal {self.path} is in format {meta.get('format')!r}; this agent reads "
                f"format {FORMAT} only: verify and archive it with the release that wrote it"
            )
        foreign = sorted(k for k in meta if k.startswith("key:"))
        if foreign:
            raise ChainBroken(
                None,
                f"journal {self.path} names keys for itself ({', '.join(foreign)}): journals "
                "carry no keys; refused and left untouched",
            )
        anchor_seq, anchor_hash = meta_anchor(meta)
        ack = meta_ack(meta)
        verifier = ChainVerifier(
            unit=self.unit,
            keys=root_keys(checkpoint_rows(conn), {own.key_id: own}),
            anchor_seq=anchor_seq,
            anchor_hash=anchor_hash,
            anchor_sig=meta.get("anchor_sig"),
            expect=ack,
            key_source="the unit key file",
            canonical_check=False,  # only bytes chained to our own signature pass: ours
        )
        head = Head()
        try:
            for data, row in iter_rows(conn, anchor_seq):
                head.kind = verifier.feed(data, row=row).kind
            verifier.finish(allow_unsealed=True)
            self._check_tail(verifier, meta, own)
        except ChainBroken as exc:
            self._log.error("journal_refused", seq=exc.seq, reason=exc.reason)
            raise ChainBroken(
                exc.seq,
                f"{exc.reason}. Journal {self.path} does not verify under the unit key "
                f"{own.key_id}; it was left untouched",
            ) from exc
        head.seq, head.hash = verifier.seq, verifier.hash
        head.since_checkpoint = head.seq - verifier.sealed_to
        self._log.info("journal_opened", head_seq=head.seq, sealed_to=verifier.sealed_to)
        return self._writer_at(head, anchor_seq, ack[0] if ack else 0)

    def _check_tail(self, verifier: ChainVerifier, meta: dict[str, str], own: Any) -> None:
        """The chain must be held by the unit key now, and the records after the last
        checkpoint must end at the head the agent signed."""
        if verifier.count and list(verifier.keys) != [own.key_id]:
            raise ChainBroken(
                verifier.last_checkpoint_seq or None,
                f"the chain was handed to key {', '.join(verifier.keys)}, not the unit key",
            )
        if verifier.seq == verifier.sealed_to:
            return
        if not head_signed(self.unit, (verifier.seq, verifier.hash), meta.get("head_sig"), own):
            raise ChainBroken(
                verifier.sealed_to + 1,
                f"records {verifier.sealed_to + 1}-{verifier.seq} after the last checkpoint "
                "are not the head the unit signed when it last wrote (added, changed or cut "
                "while the agent was stopped)",
            )

    def _create(self, conn: sqlite3.Connection, own: Any) -> JournalWriter:
        if conn.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None:
            raise ChainBroken(None, f"journal {self.path} holds records but no unit: refused")
        initial = [("format", FORMAT), ("unit", self.unit), ("anchor_seq", "0")]
        conn.executemany(SET_META, [*initial, ("anchor_hash", ZERO_HASH)])
        self._log.info("journal_opened", head_seq=0, created=True, key_id=own.key_id)
        return self._writer_at(Head(), 0, 0)

    def _writer_at(self, head: Head, anchor_seq: int, acked: int) -> JournalWriter:
        return JournalWriter(
            self._conn,
            unit=self.unit,
            signer=self._signer,
            clock=self._clock,
            head=head,
            anchor_seq=anchor_seq,
            acked=acked,
            checkpoint_every=self._checkpoint_every,
            max_samples=self._max_samples,
            log=self._log,
        )

    def _stop(self) -> None:
        writer = self._writer
        if not self._open or writer is None:
            return
        with self._buffer_lock:  # from here on record_samples refuses: nothing lost unseen
            self._open = False
            batch, self._buffer = self._buffer, []
        try:
            if batch:
                writer.submit("samples", batch)
            writer.submit("seal", "close").result()
        finally:
            writer.stop()
            self._close_files()
            self._log.info("journal_closed", head_seq=self.durable_seq)

    def _close_files(self) -> None:
        for conn in (getattr(self, "_conn", None), getattr(self, "_reader", None)):
            if conn is not None:
                conn.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    async def _tick(self) -> None:
        """Flush samples every ``sample_batch_seconds``; checkpoint every ``checkpoint_seconds``."""
        writer = self._writer
        sealing: Future[Any] | None = None
        while writer is not None:
            await self._clock.sleep(self._batch_seconds)
            self._submit_buffer()
            due = self._clock.monotonic() - writer.last_checkpoint_at >= self._checkpoint_seconds
            # one periodic seal at a time: while the writer is behind (a slow disk, a fast
            # clock) its checkpoint time is old, and every tick would queue one more
            if due and (sealing is None or sealing.done()):
                sealing = self._submit("seal", "periodic")

    # --- the API -----------------------------------------------------------------------------

    def _submit(self, job: str, payload: Any) -> Future[Any]:
        if not self._open or self._writer is None:
            raise JournalError(f"journal {self.path} is not open")
        return self._writer.submit(job, payload)

    def _prepare(
        self, kind: Kind | str, body: dict[str, Any], run: str | None, *, signature: bool = False
    ) -> Any:
        try:
            kind = Kind(kind)
        except ValueError:
            raise RecordFormatError(f"kind {kind!r} is not a record kind") from None
        if kind not in APPENDABLE and not (signature and kind is Kind.SIGNATURE):
            raise RecordFormatError(
                f"kind {kind.value!r} cannot be appended: use record_samples(), checkpoint() "
                "or append_signed()"
            )
        if not isinstance(body, dict):
            raise RecordFormatError(f"body must be a dict, not {type(body).__name__}")
        if run is not None and not isinstance(run, str):
            raise RecordFormatError(f"run {run!r} must be a string or None")
        canonical(body, what="body")  # refuse NaN & co. here, naming the field, in the caller
        return (kind, body, run)

    async def append(
        self, kind: Kind | str, body: dict[str, Any], run: str | None = None
    ) -> Record:
        """Journal an event/alarm/audit/signature/uplink record; returns once it is on disk."""
        return await asyncio.wrap_future(self._submit("append", self._prepare(kind, body, run)))

    def append_sync(self, kind: Kind | str, body: dict[str, Any], run: str | None = None) -> Record:
        """``append`` for tools without an event loop."""
        return self._submit("append", self._prepare(kind, body, run)).result()

    async def append_signed(
        self,
        kind: Kind | str,
        body: dict[str, Any],
        run: str | None,
        signatures: Sequence[dict[str, Any]],
    ) -> tuple[Record, list[Record]]:
        """Journal a record and the electronic signatures about it in one transaction: each
        signature record gets ``subject`` = the record's (seq, hash), which ``verify`` checks."""
        subject = self._prepare(kind, body, run)
        if not signatures:
            raise RecordFormatError("append_signed needs at least one signature")
        sigs = [
            self._prepare(Kind.SIGNATURE, dict(sig), run, signature=True)[1] for sig in signatures
        ]
        return await asyncio.wrap_future(self._submit("signed", (subject, sigs)))

    def rotate_key_sync(self, next_signer: Any, reason: str = "key rotation") -> Record:
        """Hand the chain to ``next_signer``: a checkpoint signed by the current key and by the
        next one (see docs/record-format.md §3.1); later checkpoints are signed by the next."""
        self._submit_buffer()
        record: Record = self._submit("rotate", (reason, next_signer)).result()
        self._signer = next_signer
        return record

    def record_samples(self, samples: Sequence[Sample]) -> None:
        """Buffer samples (never blocks); they become a samples record at the next flush."""
        with self._buffer_lock:
            if not self._open:
                raise JournalError(f"journal {self.path} is not open")
            self._buffer.extend(samples)
            full = len(self._buffer) >= self._max_samples
        if full:
            self._submit_buffer()

    def _submit_buffer(self) -> Future[Any] | None:
        with self._buffer_lock:
            batch, self._buffer = self._buffer, []
        return self._submit("samples", batch) if batch else None

    async def flush(self) -> int:
        """Write the buffered samples and wait until everything submitted is on disk;
        returns ``durable_seq``."""
        await asyncio.wrap_future(self._submit_buffer() or self._submit("barrier", None))
        return self.durable_seq

    def flush_sync(self) -> int:
        """``flush`` for tools without an event loop."""
        (self._submit_buffer() or self._submit("barrier", None)).result()
        return self.durable_seq

    async def checkpoint(self, reason: str) -> Record:
        """Write a signed checkpoint now (after any buffered samples); returns it once durable."""
        self._submit_buffer()
        return await asyncio.wrap_future(self._submit("checkpoint", reason))

    def checkpoint_sync(self, reason: str) -> Record:
        """``checkpoint`` for tools without an event loop."""
        self._submit_buffer()
        return self._submit("checkpoint", reason).result()

    @property
    def durable_seq(self) -> int:
        """The highest seq known committed to disk."""
        return self._writer.durable[0] if self._writer else 0

    def head(self) -> tuple[int, str]:
        """(seq, hash hex) of the last committed record; (anchor, ...) or (0, zeros) if none."""
        return self._writer.durable if self._writer else (0, ZERO_HASH)

    def read(self, after_seq: int, limit: int = 100) -> list[Record]:
        """Up to ``limit`` committed records after ``after_seq``, in order (bytes in ``.data``)."""
        try:
            with self._read_lock:
                rows = self._reader.execute(
                    "SELECT data FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
        except sqlite3.Error as exc:
            raise JournalStorageError(f"cannot read journal {self.path}: {exc}") from exc
        return [Record.parse(data, strict=False) for (data,) in rows]

    @property
    def acknowledged_seq(self) -> int:
        """The highest seq the control site has acknowledged."""
        return self._writer.acked if self._writer else 0

    def mark_acknowledged(self, seq: int) -> None:
        """Record the control site's acknowledgement (kept in meta; lower values are ignored)."""
        if seq > self.durable_seq:
            raise JournalError(
                f"cannot acknowledge record {seq}: the journal's durable head is {self.durable_seq}"
            )
        writer = self._writer
        if writer is not None and seq > writer.acked:
            writer.acked = seq
            self._submit("ack", seq)

    async def prune(self, retention_seconds: float) -> int:
        """Delete acknowledged records older than the retention; returns how many."""
        return await asyncio.wrap_future(self._submit("prune", retention_seconds))

    def prune_sync(self, retention_seconds: float) -> int:
        """``prune`` for tools without an event loop."""
        return self._submit("prune", retention_seconds).result()

    def disk_free(self) -> int:
        """Free bytes on the journal's file system."""
        return shutil.disk_usage(self.path.parent).free

    @property
    def low_disk(self) -> bool:
        """Whether free space is below ``low_disk_bytes`` (the agent alarms and starts no run)."""
        return self.disk_free() < self.low_disk_bytes
