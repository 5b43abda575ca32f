"""Backlog drain for ``make bench``: how fast a unit's journal reaches the control site.

``bench_drain(store_url, n_samples)`` journals ``n_samples`` samples (20 tags at 10 Hz, 200
samples per record as one-second flushes make them, with hash chain and signed checkpoints)
while the control site is unreachable, then serves the control site on loopback over
``store_url`` and times the uplink until everything is acknowledged: verified (chain,
checkpoint signatures) and stored. It returns::

    store               "sqlite" or "postgresql"
    samples, records    what was drained
    seconds             wall time from the first request to the last acknowledgement
    samples_per_s       samples / seconds
    records_per_s       records / seconds
    bytes_per_sample    request bodies (compressed) / samples: the uplink's cost on the wire

A PostgreSQL URL gets a throwaway schema (dropped afterwards); a SQLite path is used as given
(default: a temporary file). Agent and control site share this process and its cores, as they
would not in the field: the figures are a lower bound.

This module drives an agent journal and uplink, so it is the one part of the control site the
import contract lets reach into the agent beyond the record format.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.journal.journal import Journal
from agent.record.keys import UnitKey
from agent.uplink import Uplink
from controlsite.enroll import enroll_unit
from controlsite.service import ControlSiteServer
from controlsite.store.base import is_postgres_url, open_store
from drivers.base import Quality, Sample
from drivers.clock import SystemClock

TAGS = 20
T0 = datetime(2026, 11, 25, 10, tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _bench_store_url(store_url: str | None, tmp: Path) -> Iterator[str]:
    """The URL to drain into: a temporary schema on PostgreSQL, else the SQLite path."""
    if store_url is None:
        yield str(tmp / "control-site.db")
        return
    if not is_postgres_url(store_url):
        yield store_url
        return
    import psycopg

    schema = f"bedside_bench_{secrets.token_hex(4)}"
    with psycopg.connect(store_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in store_url else "?"
        yield f"{store_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _samples(rng: random.Random, start: int, n: int) -> list[Sample]:
    """Plausible samples: 20 tags at 10 Hz each, three decimals of noise, jittered times."""
    out = []
    for k in range(start, start + n):
        agent = T0 + timedelta(microseconds=k * 5000 + rng.randrange(1000))
        value = round(37.0 + rng.gauss(0, 0.5), 3)
        source = agent - timedelta(microseconds=rng.randrange(3000))
        out.append(Sample(f"reactor.tag{k % TAGS:02d}", value, Quality.GOOD, agent, source))
    return out


async def drain(
    store_url: str | None, n_samples: int, samples_per_record: int = 200
) -> dict[str, Any]:
    """See the module docstring; ``samples_per_record`` is what one journal flush holds
    (200: 20 tags at 10 Hz flushed every second)."""
    clock = SystemClock()
    rng = random.Random(7)
    key = UnitKey.generate()
    unit = f"bench-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="bedside-drain-") as tmpdir:
        tmp = Path(tmpdir)
        journal = Journal.open(
            tmp / "journal.db", unit=unit, signer=key, clock=clock, checkpoint_every=100
        )
        async with journal:
            for start in range(0, n_samples, samples_per_record):
                size = min(samples_per_record, n_samples - start)
                journal.record_samples(_samples(rng, start, size))
                await journal.flush()
            head = await journal.flush()
            with _bench_store_url(store_url, tmp) as url:
                store = open_store(url)
                try:
                    enroll_unit(store, unit, key.public_key.b64)
                    port = _free_port()
                    async with ControlSiteServer(store, port=port) as site:
                        uplink = Uplink(
                            journal, site.url, unit_key=key, clock=clock, poll_interval=0.01
                        )
                        started = time.perf_counter()
                        task = asyncio.create_task(uplink.run())
                        try:
                            while journal.acknowledged_seq < head:
                                await asyncio.sleep(0.005)
                                if task.done():
                                    task.result()
                        finally:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                        seconds = time.perf_counter() - started
                        sent = uplink.status()["bytes_sent"]
                finally:
                    store.close()
    return {
        "store": "postgresql" if store_url and is_postgres_url(store_url) else "sqlite",
        "samples": n_samples,
        "records": head,
        "seconds": seconds,
        "samples_per_s": n_samples / seconds,
        "records_per_s": head / seconds,
        "bytes_per_sample": sent / n_samples,
    }


def bench_drain(store_url: str | None = None, n_samples: int = 100_000) -> dict[str, Any]:
    """Drain ``n_samples`` journaled samples into the control site at ``store_url`` (a
    PostgreSQL URL or SQLite path; None: a temporary SQLite file) and return the figures."""
    return asyncio.run(drain(store_url, n_samples))


if __name__ == "__main__":  # python -m tests.bench.drain [store_url] [n_samples]
    import sys

    args = sys.argv[1:]
    print(
        bench_drain(
            args[0] if args and args[0] else None, int(args[1]) if len(args) > 1 else 100_000
        )
    )
