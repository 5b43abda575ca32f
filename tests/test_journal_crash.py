"""kill -9 tests: a child journals events and samples and reports what is durable; the parent
kills it at random moments (seeded), then checks the chain and every reported record."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.journal.files import verify_path
from agent.journal.journal import Journal
from agent.record.keys import UnitKey, init_unit_key
from drivers.clock import SystemClock

CHILD = Path(__file__).resolve().parent / "journal_child.py"
ROUNDS = 12  # per test; two tests: 24 kills


class Child:
    """The child process and the lines it printed, collected by a reader thread."""

    def __init__(self, db: Path, state: Path, stderr: Path) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._err = stderr.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(db), str(state)],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # cut by the kill: the child never finished saying it
            if line == "ready\n":
                self.ready.set()
            self.lines.append(line.strip())

    def kill(self) -> list[str]:
        """SIGKILL, wait, and return every complete line it printed."""
        self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=10)
        self._err.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.lines


def check_journal(db: Path, key: UnitKey, lines: list[str], log: Path) -> tuple[int, int]:
    """The chain verifies (its tail unsealed: the child was killed) and holds every record the
    child reported durable."""
    report = verify_path(db, key.public_key, allow_unsealed=True)
    assert report.ok, f"{report.reason}\n{log.read_text()[-2000:]}"
    events = [line.split() for line in lines if line.startswith("E ")]
    flushed = [int(line.split()[1]) for line in lines if line.startswith("D ")]
    highest = max([int(e[1]) for e in events] + flushed + [0])
    assert report.head_seq >= highest, f"head {report.head_seq} < reported durable {highest}"
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT seq, hash FROM records").fetchall())
    conn.close()
    for _tag, seq, hash_hex in events:
        assert bytes(stored[int(seq)]).hex() == hash_hex, f"record {seq} differs from reported"
    return len(events), len(flushed)


def run_campaign(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    key, _ = init_unit_key(tmp_path / "state")
    db = tmp_path / "journal.db"
    log = tmp_path / "child.log"
    reported = 0
    for _round in range(ROUNDS):
        child = Child(db, tmp_path / "state", log)
        if rng.random() < 0.25:
            # anywhere: during start-up, recovery, the 'open' checkpoint or the first writes
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            assert child.ready.wait(20), f"child never became ready\n{log.read_text()[-2000:]}"
            time.sleep(rng.uniform(0.0, 0.15))
        lines = child.kill()
        events, _flushes = check_journal(db, key, lines, log)
        reported += events
    assert reported > 0, "the child never reported a durable record"
    # the agent's next start seals the tail it can prove it wrote: then all of it verifies
    with Journal.open(db, unit="crash-unit", signer=key, clock=SystemClock()):
        pass
    report = verify_path(db, key.public_key)
    assert report.ok and report.unsealed == 0 and report.checkpoints > 0, report.reason


@pytest.mark.parametrize("seed", [20261125, 7])
def test_kill_9_loses_nothing_reported_durable(tmp_path: Path, seed: int) -> None:
    """After each of many kill -9s the chain verifies and holds every record reported durable."""
    run_campaign(tmp_path, seed)
