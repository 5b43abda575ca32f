"""Child process for the kill -9 tests: journal events and samples until killed.

Usage: ``python tests/journal_child.py JOURNAL_DB STATE_DIR``. Prints ``ready`` once the journal
is open, then for every event whose append returned ``E <seq> <hash>``, and after every flush
``D <durable seq>``: each line is printed only once the journal says the record is on disk.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.journal.journal import Journal
from agent.record.keys import load_unit_key
from drivers.base import Quality, Sample
from drivers.clock import SystemClock


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def appender(journal: Journal, name: str) -> None:
    n = 0
    while True:
        record = await journal.append("event", {"task": name, "n": n})
        say(f"E {record.seq} {record.hash_hex}")
        n += 1


async def sampler(journal: Journal, clock: SystemClock) -> None:
    n = 0
    while True:
        now = clock.now()
        journal.record_samples(
            [Sample(f"tag{k}", float(n * 10 + k), Quality.GOOD, now, now) for k in range(40)]
        )
        n += 1
        if n % 3 == 0:
            say(f"D {await journal.flush()}")
        else:
            await asyncio.sleep(0.002)


async def main(db: str, state: str) -> None:
    clock = SystemClock()
    async with Journal.open(
        db,
        unit="crash-unit",
        signer=load_unit_key(state),
        clock=clock,
        checkpoint_every=25,
        checkpoint_seconds=0.05,
        sample_batch_seconds=0.01,
        max_samples_per_record=200,
    ) as journal:
        say("ready")
        async with asyncio.TaskGroup() as group:
            for name in ("a", "b", "c"):
                group.create_task(appender(journal, name))
            group.create_task(sampler(journal, clock))


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(main(sys.argv[1], sys.argv[2]))
