"""A PostgreSQL server for tests, and a fresh schema per test.

The server, in order of preference: ``$BEDSIDE_TEST_PG_URL``; the local
``postgresql://postgres@127.0.0.1:5432/test`` if it answers; a throwaway cluster made with
``initdb``/``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` in a temporary directory on a free port.
Without any, tests that need PostgreSQL are skipped, saying why.

Each test gets its own schema with a random name (``fresh_schema``), selected through the URL's
``options=-csearch_path=...``, and dropped afterwards: tests never see each other's tables and
can share a server with other users.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/test"


def answers(url: str) -> bool:
    """Whether a PostgreSQL server accepts a connection at ``url``."""
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


class Throwaway:
    """A temporary PostgreSQL cluster on 127.0.0.1 (trust authentication), removed on stop."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="bedside-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            shutil.chown(self.dir, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """initdb and start; raises ``RuntimeError`` saying what failed."""
        try:
            self._run(
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--no-sync",
            )  # fmt: skip
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                      "-l", str(self.dir / "log"), "start")  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.stop()
            raise RuntimeError(f"cannot start a throwaway PostgreSQL: {exc} {detail!r}") from exc

    def stop(self) -> None:
        """Stop the cluster and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "stop")  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(found[0]).parent if found else None


@contextlib.contextmanager
def server(free_port: int) -> Iterator[str]:
    """The URL of a PostgreSQL server for this test session (see the module docstring);
    raises ``LookupError`` with the reason when there is none."""
    env = os.environ.get("BEDSIDE_TEST_PG_URL")
    if env:
        yield env
        return
    if answers(LOCAL_URL):
        yield LOCAL_URL
        return
    bindir = find_bindir()
    if bindir is None:
        raise LookupError(
            f"no PostgreSQL: BEDSIDE_TEST_PG_URL unset, {LOCAL_URL} does not answer and no "
            "/usr/lib/postgresql/*/bin/initdb exists"
        )
    cluster = Throwaway(bindir, free_port)
    try:
        cluster.start()
    except RuntimeError as exc:
        raise LookupError(str(exc)) from exc
    try:
        yield cluster.url
    finally:
        cluster.stop()


def with_search_path(url: str, schema: str) -> str:
    """``url`` with libpq options selecting ``schema``."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A new, empty schema on the server at ``url``; yields a URL that uses it; drops it after."""
    schema = f"bedside_test_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
