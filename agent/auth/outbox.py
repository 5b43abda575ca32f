"""An outbox for audit records made where the journal is not at hand.

The ``bedside users`` CLI changes accounts while the agent may be running and holding the
journal's lock, so it cannot journal its audit records itself. It appends them, one JSON line
each, to ``users-audit.jsonl`` in the state folder (0600, fsynced, under an advisory lock); the
agent journals them in order and empties the file with ``drain`` (at start-up, then every
couple of seconds while it runs, so a refused sign-in at the CLI reaches the journal at once).
Every body carries its own ``time``, so the record says when the change happened even though
it is journaled later. ``bedside recipe install`` leaves its ``recipe_installed`` record here
too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.auth.users import UserStoreError

log = structlog.get_logger(__name__)


class AuditOutbox:
    """Audit records waiting for the journal (see the module docstring); an ``AuditSink``."""

    FILE = "users-audit.jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> AuditOutbox:
        """The outbox of the unit whose state folder is ``state_dir``."""
        return cls(Path(state_dir) / cls.FILE)

    async def __call__(self, kind: str, body: dict[str, Any]) -> None:
        line = json.dumps({"kind": str(kind), "body": body}, ensure_ascii=False) + "\n"
        with self._locked() as fd:
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        """The records waiting, oldest first."""
        with self._locked() as fd:
            return self._read(fd)

    async def drain(self, sink: Callable[[str, dict[str, Any]], Awaitable[object]]) -> int:
        """Hand every waiting record to ``sink`` (an async ``(kind, body)`` callable such as
        ``journal.append``) in order, then empty the outbox; returns how many. If the sink
        fails, the records not yet handed over stay for the next drain."""
        try:
            if self.path.stat().st_size == 0:  # the usual case while polling: no lock taken
                return 0
        except FileNotFoundError:
            return 0
        with self._locked() as fd:
            items = self._read(fd, lenient=True)
            done = 0
            try:
                for kind, body in items:
                    await sink(kind, body)
                    done += 1
            finally:
                rest = "".join(
                    json.dumps({"kind": k, "body": b}, ensure_ascii=False) + "\n"
                    for k, b in items[done:]
                )
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, rest.encode("utf-8"))
                os.fsync(fd)
        if done:
            log.info("users_audit_drained", records=done)
        return done

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UserStoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _read(self, fd: int, *, lenient: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The records in the file; a line that is not one raises, or with ``lenient`` (when
        draining: one bad line must not block the rest, nor the agent's start) becomes an
        ``audit_outbox_unreadable`` record naming its line and size, never its content."""
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        items = []
        for number, line in enumerate(b"".join(chunks).splitlines(), 1):
            try:
                item = json.loads(line)
                items.append((str(item["kind"]), dict(item["body"])))
            except (ValueError, KeyError, TypeError) as exc:
                if not lenient:
                    raise UserStoreError(
                        f"{self.path}:{number} is not an audit record: {exc}"
                    ) from exc
                log.error("audit_outbox_line_unreadable", path=str(self.path), line=number)
                bad = {"action": "audit_outbox_unreadable", "line": number, "bytes": len(line)}
                items.append(("audit", bad))
        return items
