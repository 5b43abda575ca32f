"""Throughput of the journal against raw SQLite, for ``make bench``.

``bench(seconds)`` prints nothing and returns figures:

* ``raw_samples_per_s``: one row per sample in a table of the journal's row shape (seq, time,
  kind, run, hash, data = compact JSON of the sample), 1000 rows per transaction, WAL,
  ``synchronous=FULL``; no chain, no signature.
* ``journal_samples_per_s``: the same samples through ``Journal.record_samples`` with hashing,
  chaining, signed checkpoints (every 100 records) and durable commits, counted once flushed.
* ``columnar_samples_per_s``: the journal's own batch encoding (canonical columnar samples
  bodies, one row per batch) inserted raw: what the chain, signatures and the writer thread cost
  on top is the gap to ``journal_samples_per_s``.
* ``ratio``: raw / journal (the goal is <= 1.5).
* ``bytes_per_sample`` and ``deflate_bytes_per_sample``: the journal's samples records on the
  wire, plain and deflate-compressed (the uplink's goal is <= 40).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import tempfile
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from agent.journal.journal import Journal
from agent.record.format import canonical, encode_samples
from agent.record.keys import UnitKey
from drivers.base import Quality, Sample
from drivers.clock import SystemClock

CHUNK = 1000
BACKLOG = 100_000  # samples submitted but not yet known durable, at most


def _samples(n: int, seed: int = 7) -> list[Sample]:
    """Plausible bioreactor samples: 20 tags, 10 Hz each, a few decimals, occasional bad."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 25, 10, tzinfo=UTC)
    out = []
    for k in range(n):
        agent = start + timedelta(microseconds=k * 5000 + rng.randrange(1000))
        bad = rng.random() < 0.001
        out.append(
            Sample(
                tag=f"reactor.tag{k % 20:02d}",
                value=round(37.0 + rng.gauss(0, 0.5), 3),
                quality=Quality.BAD if bad else Quality.GOOD,
                agent_time=agent,
                source_time=agent - timedelta(microseconds=rng.randrange(3000)),
                status="timeout" if bad else "",
            )
        )
    return out


def _raw_rows(samples: list[Sample], first_seq: int) -> list[tuple[Any, ...]]:
    rows = []
    for n, s in enumerate(samples):
        data = json.dumps(s.as_dict(), separators=(",", ":")).encode()
        at = s.agent_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows.append((first_seq + n, at, "samples", None, None, data))
    return rows


def _bench_raw(path: Path, samples: list[Sample], seconds: float) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, time TEXT, kind TEXT, run TEXT, "
        "hash BLOB, data BLOB)"
    )
    done, seq = 0, 1
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for k in range(0, len(samples), CHUNK):
            rows = _raw_rows(samples[k : k + CHUNK], seq)
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
            seq += len(rows)
            done += len(rows)
    elapsed = time.perf_counter() - start
    conn.close()
    return done / elapsed


def _bench_columnar(path: Path, samples: list[Sample], seconds: float) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, time TEXT, kind TEXT, run TEXT, "
        "hash BLOB, data BLOB)"
    )
    done, seq = 0, 1
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for k in range(0, len(samples), 5 * CHUNK):
            chunk = samples[k : k + 5 * CHUNK]
            data = canonical(encode_samples(chunk))
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
                (seq, "", "samples", None, None, data),
            )
            conn.execute("COMMIT")
            seq += 1
            done += len(chunk)
    elapsed = time.perf_counter() - start
    conn.close()
    return done / elapsed


async def _bench_journal(path: Path, samples: list[Sample], seconds: float) -> float:
    key = UnitKey.generate()
    async with Journal.open(
        path, unit="bench", signer=key, clock=SystemClock(), checkpoint_every=100
    ) as journal:
        done = flushed = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for k in range(0, len(samples), CHUNK):
                journal.record_samples(samples[k : k + CHUNK])
                done += min(CHUNK, len(samples) - k)
            if done - flushed >= BACKLOG:
                # buffering is nearly free: without a bound the writer would still be busy
                # long after the measurement's time is up
                await journal.flush()
                flushed = done
            await asyncio.sleep(0)  # let the loop breathe, as a service would
        await journal.flush()
        elapsed = time.perf_counter() - start
    return done / elapsed


def _wire_size(path: Path) -> tuple[float, float]:
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT data FROM records WHERE kind = 'samples' LIMIT 20").fetchall()
    conn.close()
    count = sum(len(json.loads(data)["body"]["i"]) for (data,) in rows)
    plain = sum(len(data) for (data,) in rows)
    packed = sum(len(zlib.compress(data, 6)) for (data,) in rows)
    return plain / count, packed / count


def bench(seconds: float = 4.0) -> dict[str, float]:
    """Run the measurements for about ``seconds`` in total; returns the figures above (logs
    of the journal are swallowed so that nothing is printed)."""
    samples = _samples(20_000)
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as tmp, capture_logs():
        raw = _bench_raw(Path(tmp) / "raw.db", samples, seconds / 3)
        columnar = _bench_columnar(Path(tmp) / "columnar.db", samples, seconds / 3)
        journal_path = Path(tmp) / "journal.db"
        journaled = asyncio.run(_bench_journal(journal_path, samples, seconds / 3))
        plain, packed = _wire_size(journal_path)
    return {
        "raw_samples_per_s": round(raw),
        "columnar_samples_per_s": round(columnar),
        "journal_samples_per_s": round(journaled),
        "ratio": round(raw / journaled, 2),
        "bytes_per_sample": round(plain, 1),
        "deflate_bytes_per_sample": round(packed, 1),
    }
