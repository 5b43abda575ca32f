"""The journal's single writer: one thread, one SQLite connection, group commits; and the
journal file's schema.

Jobs arrive on a queue as ``(job, payload, future)``. The thread takes every job waiting (up to
``BATCH_JOBS``), applies them in one transaction, commits (``synchronous=FULL``: on disk when
COMMIT returns) and only then resolves the futures. seq and prev are assigned here and nowhere
else, so records are contiguous and chained whatever thread or task submitted them. A failed
transaction is rolled back, the head restored, and every job of the batch fails with
``JournalStorageError``; the thread itself survives any failure, since callers wait on it.

Jobs: ``append`` (kind, body, run), ``signed`` (a subject record and the electronic
signatures bound to it, in one transaction), ``samples`` (list of Sample), ``checkpoint``
(reason), ``seal`` (a checkpoint unless nothing is new), ``rotate`` (a checkpoint handing the
chain to a new key), ``ack`` (seq), ``prune`` (retention seconds), ``barrier`` (nothing: a
flush), ``stop``.

Every transaction that moves the head also renews ``meta.head_sig``, the unit key's signature
over (unit, head seq, head hash): at the next start the agent seals only a tail it can prove it
wrote itself (see ``Journal._recover``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.record.format import (
    ZERO_HASH,
    JournalStorageError,
    Kind,
    PublicSigner,
    Record,
    RecordFormatError,
    Signer,
    anchor_payload,
    b64,
    checkpoint_body,
    encode_samples,
    format_time,
    head_payload,
)

if TYPE_CHECKING:
    from drivers.clock import Clock

BATCH_JOBS = 512
SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_INSERT = "INSERT INTO records (seq, time, kind, run, hash, data) VALUES (?, ?, ?, ?, ?, ?)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL, run TEXT,
    hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_checkpoints ON records(seq) WHERE kind = 'checkpoint';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
Job = tuple[str, Any, Future[Any]]


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the journal file in WAL mode with ``synchronous=FULL``, schema created.

    The file is made private (0600) before SQLite opens it; SQLite creates the ``-wal`` and
    ``-shm`` files with the database file's mode, so they are private too."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
    except OSError as exc:
        raise JournalStorageError(f"cannot open journal {path}: {exc}") from exc
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
    except sqlite3.Error as exc:
        raise JournalStorageError(f"cannot open journal {path}: {exc}") from exc
    return conn


@dataclass
class Head:
    """The chain's end as the writer builds it."""

    seq: int = 0
    hash: str = ZERO_HASH
    kind: Kind | None = None
    since_checkpoint: int = 0


class JournalWriter:
    """Owns the write connection and the head; see the module docstring."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        unit: str,
        signer: Signer,
        clock: Clock,
        head: Head,
        anchor_seq: int,
        acked: int,
        checkpoint_every: int,
        max_samples: int,
        log: Any,
    ) -> None:
        self._conn = conn
        self._unit = unit
        self._signer = signer
        self._clock = clock
        self._head = head
        self._anchor_seq = anchor_seq
        self._checkpoint_every = checkpoint_every
        self._max_samples = max_samples
        self._log = log
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name=f"journal-{unit}", daemon=True)
        self.durable = (head.seq, head.hash)  # replaced whole after each commit
        self.acked = acked  # the highest acknowledgement submitted
        self.last_checkpoint_at = clock.monotonic()

    @property
    def head_is_checkpoint(self) -> bool:
        """Whether the last record written is a checkpoint."""
        return self._head.kind is Kind.CHECKPOINT

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, job: str, payload: Any) -> Future[Any]:
        """Queue a job; its future resolves after the commit that contains it."""
        future: Future[Any] = Future()
        self._jobs.put((job, payload, future))
        return future

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread and wait for it."""
        self.submit("stop", None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            batch = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < BATCH_JOBS:
                    batch.append(self._jobs.get_nowait())
            # a job whose caller was cancelled before we took it is not written
            live = [job for job in batch if job[2].set_running_or_notify_cancel()]
            self._run_batch([job for job in live if job[0] != "stop"])
            stops = [job for job in live if job[0] == "stop"]
            if stops:
                for _job, _payload, future in stops:
                    future.set_result(None)
                return

    def _run_batch(self, batch: list[Job]) -> None:
        if not batch:
            return
        saved, signer = Head(**vars(self._head)), self._signer
        results: list[Any] = []
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for job, payload, _future in batch:
                try:
                    results.append(self._apply(job, payload))
                except RecordFormatError as exc:
                    results.append(exc)
                if self._head.since_checkpoint >= self._checkpoint_every:
                    self._write_checkpoint(f"every {self._checkpoint_every} records")
            if self._head.seq != saved.seq:
                self._sign_head()
            self._conn.execute("COMMIT")
        except Exception as exc:  # the thread must outlive any failure: callers wait on it
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._head, self._signer = saved, signer
            self._fail(batch, exc)
            return
        if self._failing:
            self._failing = False
            self._log.info("journal_write_recovered", head_seq=self._head.seq)
        self.durable = (self._head.seq, self._head.hash)
        for (_job, _payload, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        error = JournalStorageError(f"cannot write the journal of {self._unit}: {exc}")
        error.__cause__ = exc
        lost = sum(len(payload) for job, payload, _ in batch if job == "samples")
        report = self._log.debug if self._failing else self._log.error
        report("journal_write_failed", error=str(exc), samples_lost=lost)
        self._failing = True
        for _job, _payload, future in batch:
            future.set_exception(error)

    def _apply(self, job: str, payload: Any) -> Any:
        if job == "append":
            kind, body, run = payload
            return self._write(kind, body, run)
        if job == "signed":
            (kind, body, run), signatures = payload
            subject = self._write(kind, body, run)
            bound = {"seq": subject.seq, "hash": subject.hash_hex}
            sigs = [
                self._write(Kind.SIGNATURE, {**sig, "subject": bound}, run) for sig in signatures
            ]
            return subject, sigs
        if job == "rotate":
            reason, next_signer = payload
            record = self._write_checkpoint(reason, next_signer=next_signer)
            self._signer = next_signer
            return record
        if job == "samples":
            last = None
            for start in range(0, len(payload), self._max_samples):
                chunk = payload[start : start + self._max_samples]
                last = self._write(Kind.SAMPLES, encode_samples(chunk), None)
            return last
        if job == "checkpoint":
            return self._write_checkpoint(payload)
        if job == "seal":  # a checkpoint unless there is nothing new to sign
            if self._head.seq == 0 or self.head_is_checkpoint:
                self.last_checkpoint_at = self._clock.monotonic()
                return None
            return self._write_checkpoint(payload)
        if job == "ack":
            found = self._conn.execute(
                "SELECT hash FROM records WHERE seq = ?", (payload,)
            ).fetchone()
            if found is not None:
                acked = [("acked_seq", str(payload)), ("acked_hash", bytes(found[0]).hex())]
                self._conn.executemany(SET_META, acked)
            return payload
        if job == "prune":
            return self._prune(payload)
        return None  # barrier

    def _write(self, kind: Kind, body: dict[str, Any], run: str | None, time: str = "") -> Record:
        head = self._head
        record = Record.build(
            unit=self._unit,
            seq=head.seq + 1,
            time=time or format_time(self._clock.now()),
            kind=kind,
            run=run,
            body=body,
            prev=head.hash,
        )
        self._conn.execute(
            _INSERT, (record.seq, record.time, kind.value, run, record.hash, record.data)
        )
        head.seq, head.hash, head.kind = record.seq, record.hash_hex, kind
        head.since_checkpoint = 0 if kind is Kind.CHECKPOINT else head.since_checkpoint + 1
        return record

    def _write_checkpoint(self, reason: str, next_signer: PublicSigner | None = None) -> Record:
        time = format_time(self._clock.now())
        head = self._head
        body = checkpoint_body(
            self._signer,
            unit=self._unit,
            seq=head.seq,
            head=head.hash,
            time=time,
            reason=reason,
            next_signer=next_signer,
        )
        record = self._write(Kind.CHECKPOINT, body, None, time)
        self.last_checkpoint_at = self._clock.monotonic()
        self._log.debug("journal_checkpoint", seq=record.seq, reason=reason)
        return record

    def _sign_head(self) -> None:
        head = self._head
        sig = self._signer.sign(head_payload(self._unit, head.seq, head.hash))
        self._conn.execute(SET_META, ("head_sig", f"{self._signer.key_id}:{b64(sig)}"))

    def _prune(self, retention_seconds: float) -> int:
        """Delete the oldest acknowledged records older than the retention, keeping the head;
        the last deleted record's (seq, hash) becomes the anchor the first kept one links to."""
        cutoff = format_time(self._clock.now() - timedelta(seconds=retention_seconds))
        limit = min(self.acked, self._head.seq - 1)
        newer = self._conn.execute(
            "SELECT seq FROM records WHERE seq > ? AND seq <= ? AND time >= ? ORDER BY seq LIMIT 1",
            (self._anchor_seq, limit, cutoff),
        ).fetchone()
        upto = limit if newer is None else newer[0] - 1
        if upto <= self._anchor_seq:
            return 0
        (anchor_hash,) = self._conn.execute(
            "SELECT hash FROM records WHERE seq = ?", (upto,)
        ).fetchone()
        deleted = self._conn.execute("DELETE FROM records WHERE seq <= ?", (upto,)).rowcount
        anchor_hex = bytes(anchor_hash).hex()
        sig = self._signer.sign(anchor_payload(self._unit, upto, anchor_hex))
        anchor = [
            ("anchor_seq", str(upto)),
            ("anchor_hash", anchor_hex),
            ("anchor_sig", f"{self._signer.key_id}:{b64(sig)}"),
        ]
        self._conn.executemany(SET_META, anchor)
        self._anchor_seq = upto
        self._log.info("journal_pruned", records=deleted, anchor_seq=upto)
        return int(deleted)
