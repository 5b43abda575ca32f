"""The store-and-forward uplink against a real control site on loopback (HTTP and HTTPS).

Time is a ManualClock shared by the journal and the uplink: hours of outage pass in a few
wall seconds. Delivery is checked record by record against the journal (seq and bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.journal.journal import Journal
from agent.record.format import Kind
from agent.record.keys import UnitKey
from agent.uplink import Uplink, UplinkURLError, check_control_site_url
from controlsite.enroll import enroll_unit
from controlsite.service import ControlSiteServer
from controlsite.store.base import Store, open_store
from drivers.base import Quality, Sample
from drivers.clock import ManualClock
from tests.conftest import free_port

UNIT = "unit-7"


@pytest.fixture
def key() -> UnitKey:
    return UnitKey.from_seed(b"\x11" * 32)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 25, 8, tzinfo=UTC))


@pytest.fixture
def store(tmp_path: Path, key: UnitKey) -> Store:
    """A SQLite control-site store with the unit enrolled."""
    s = open_store(str(tmp_path / "control-site.db"))
    enroll_unit(s, UNIT, key.public_key.b64)
    yield s  # type: ignore[misc]
    s.close()


def open_journal(path: Path, key: UnitKey, clock: ManualClock) -> Journal:
    return Journal.open(path, unit=UNIT, signer=key, clock=clock, checkpoint_every=40)


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[Uplink]:
    """Run ``uplink`` in a task for the block; cancel it after."""
    task = asyncio.create_task(uplink.run())
    try:
        yield uplink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], clock: ManualClock, step: float = 1.0) -> None:
    """Advance the clock by ``step`` until ``cond()`` holds (20 wall seconds at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await clock.advance(step)
        await asyncio.sleep(0.005)


def delivered_exactly(store: Store, journal: Journal) -> None:
    """The store holds the journal's records, each once, in order, byte for byte."""
    mine = journal.read(0, 100_000)
    theirs = store.records(UNIT, limit=1000)
    theirs += store.records(UNIT, after=theirs[-1].seq, limit=100_000) if theirs else []
    assert [r.seq for r in theirs] == list(range(1, len(mine) + 1))
    assert [r.data for r in theirs] == [r.data for r in mine]


def link_records(journal: Journal) -> list[str]:
    return [r.body["link"] for r in journal.read(0, 100_000) if r.kind is Kind.UPLINK]


def samples(clock: ManualClock, n: int) -> list[Sample]:
    return [
        Sample(f"reactor.t{k % 4}", 37.0 + k / 100, Quality.GOOD, clock.now()) for k in range(n)
    ]


async def test_outage_of_hours_delivers_everything_once_in_order(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """Records journaled during a 3-hour outage all arrive once, in order, when the site returns."""
    port = free_port()
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        uplink = Uplink(
            journal, f"http://127.0.0.1:{port}", unit_key=key, clock=clock, batch_max_records=50,
            rng=random.Random(3),
        )  # fmt: skip
        async with running(uplink):
            for minute in range(180):
                await journal.append(Kind.EVENT, {"what": "tick", "minute": minute})
                journal.record_samples(samples(clock, 20))
                await clock.advance(60)
                await asyncio.sleep(0.002)
            await journal.flush()
            status = uplink.status()
            assert status["link"] == "down" and status["acked_seq"] == 0
            assert status["backlog"] == journal.durable_seq > 180
            assert "ConnectError" in status["last_error"]
            assert link_records(journal) == ["down"]
            async with ControlSiteServer(store, port=port):
                await until(lambda: uplink.status()["link"] == "up", clock, step=30)
                await until(lambda: uplink.status()["backlog"] == 0, clock, step=0.2)
        delivered_exactly(store, journal)
        assert link_records(journal) == ["down", "up"]
        assert journal.acknowledged_seq == journal.durable_seq


async def test_restart_resumes_from_the_acknowledged_seq(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """A restarted uplink sends only what was not acknowledged before it stopped."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with ControlSiteServer(store, port=port):
        async with open_journal(tmp_path / "j.db", key, clock) as journal:
            for n in range(30):
                await journal.append(Kind.EVENT, {"n": n})
            async with running(Uplink(journal, url, unit_key=key, clock=clock)) as first:
                await until(lambda: first.status()["backlog"] == 0, clock, step=0.2)
            acked = journal.acknowledged_seq
        assert acked >= 30
        async with open_journal(tmp_path / "j.db", key, clock) as journal:
            assert journal.acknowledged_seq == acked
            for n in range(10):
                await journal.append(Kind.AUDIT, {"n": n})
            async with running(Uplink(journal, url, unit_key=key, clock=clock)) as second:
                await until(lambda: second.status()["backlog"] == 0, clock, step=0.2)
            assert second.status()["records_acked"] == journal.durable_seq - acked
            delivered_exactly(store, journal)


async def test_refusal_keeps_the_records_and_is_journaled_once(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """A refused batch (unit not enrolled) stays unacknowledged; the refusal is journaled once."""
    port = free_port()
    stranger = UnitKey.from_seed(b"\x12" * 32)
    async with (
        ControlSiteServer(store, port=port),
        Journal.open(tmp_path / "j.db", unit="unit-x", signer=stranger, clock=clock) as journal,
    ):
        await journal.append(Kind.EVENT, {"what": "hello"})
        uplink = Uplink(journal, f"http://127.0.0.1:{port}", unit_key=stranger, clock=clock)
        async with running(uplink):
            await until(lambda: uplink.status()["link"] == "refused", clock, step=0.2)
            for _ in range(4):  # several retries at backoff_max
                await clock.advance(400)
                await asyncio.sleep(0.02)
        assert journal.acknowledged_seq == 0
        assert "unknown_unit" in uplink.status()["last_error"]
        assert link_records(journal) == ["refused"]
        assert store.alarms("unit-x") == []  # a stranger leaves no rows at the control site


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bedside test control site")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "site.crt", directory / "site.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_with_a_self_signed_certificate(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """Over HTTPS the uplink trusts the site's own certificate file and nothing else."""
    cert, tls_key = self_signed(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    async with (
        ControlSiteServer(store, port=port, tls_cert=cert, tls_key=tls_key),
        open_journal(tmp_path / "j.db", key, clock) as journal,
    ):
        for n in range(5):
            await journal.append(Kind.EVENT, {"n": n})
        untrusting = Uplink(journal, url, unit_key=key, clock=clock)  # system CAs only
        async with running(untrusting):
            await until(lambda: untrusting.status()["link"] == "down", clock, step=0.2)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusting.status()["last_error"]
        trusting = Uplink(journal, url, unit_key=key, clock=clock, verify=str(cert))
        async with running(trusting):
            await until(lambda: trusting.status()["backlog"] == 0, clock, step=0.2)
        delivered_exactly(store, journal)


async def test_flapping_link_journals_only_lasting_changes(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """A short outage journals nothing; one longer than down_after journals one down and one up."""
    port = free_port()
    async with open_journal(tmp_path / "j.db", key, clock) as journal:
        uplink = Uplink(journal, f"http://127.0.0.1:{port}", unit_key=key, clock=clock)
        caught_up = lambda: uplink.status()["backlog"] == 0  # noqa: E731
        async with running(uplink):
            async with ControlSiteServer(store, port=port):
                await journal.append(Kind.EVENT, {"n": 1})
                await until(caught_up, clock, step=0.2)
            for outage in (5, 120):  # seconds of clock time without the control site
                await journal.append(Kind.EVENT, {"outage": outage})
                await until(lambda: uplink.status()["link"] == "down", clock, step=0.2)
                await clock.advance(outage)
                await asyncio.sleep(0.01)
                async with ControlSiteServer(store, port=port):
                    await until(caught_up, clock, step=0.5)
            assert link_records(journal) == ["up", "down", "up"]
            delivered_exactly(store, journal)


async def test_repeated_refusal_logs_one_error(
    tmp_path: Path, key: UnitKey, clock: ManualClock, store: Store
) -> None:
    """A refusal repeated on every retry is logged once as an error, then only at debug."""
    port = free_port()
    stranger = UnitKey.from_seed(b"\x13" * 32)
    async with (
        ControlSiteServer(store, port=port),
        Journal.open(tmp_path / "j.db", unit="unit-y", signer=stranger, clock=clock) as journal,
    ):
        await journal.append(Kind.EVENT, {"what": "hello"})
        with structlog.testing.capture_logs() as logs:
            uplink = Uplink(journal, f"http://127.0.0.1:{port}", unit_key=stranger, clock=clock)
            refusals: list[dict[str, object]] = []

            def seen(n: int) -> bool:
                names = ("uplink_refused", "uplink_still_refused")
                refusals[:] = [e for e in logs if e["event"] in names]
                return len(refusals) >= n

            async with running(uplink):
                await until(lambda: seen(4), clock, step=50)
    assert [e["log_level"] for e in refusals][:2] == ["error", "debug"]
    assert sum(e["log_level"] == "error" for e in refusals) == 1


ALLOWED = [
    "https://10.1.2.3:8443",
    "https://cs.example.org",
    "http://127.0.0.1:8443",
    "http://127.9.9.9:1/",
    "http://[::1]:8443",
    "http://localhost:8443",
    "HTTP://LOCALHOST",
]
REFUSED = [
    ("http://10.1.2.3:8443", "not loopback"),
    ("http://0.0.0.0:8443", "not loopback"),
    ("http://[::]:8443", "not loopback"),
    ("http://cs.example.org", "not loopback"),
    ("http://127.0.0.1.evil.example:80", "not loopback"),
    ("http://localhost@10.1.2.3:8443", "user or password"),
    ("http://127.0.0.1:99999", "not a valid URL"),
    ("https://cs.example.org/?x=1", "query"),
    ("ftp://127.0.0.1", "must be https"),
    ("10.1.2.3:8443", "must be https"),
    ("", "must be https"),
]


@pytest.mark.parametrize("url", ALLOWED)
def test_https_anywhere_and_http_to_loopback_are_accepted(url: str) -> None:
    """https:// to any host and http:// to 127.0.0.0/8, ::1 or localhost are accepted."""
    assert check_control_site_url(url) == url.rstrip("/")


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_plain_http_off_loopback_is_refused(url: str, why: str) -> None:
    """http:// to anything but loopback (and malformed URLs) are refused naming the URL,
    without connecting anywhere; the Uplink itself refuses them too."""
    with pytest.raises(UplinkURLError, match=why) as info:
        check_control_site_url(url)
    assert repr(url) in str(info.value)
    with pytest.raises(UplinkURLError):
        Uplink(None, url, unit_key=UnitKey.from_seed(b"\x14" * 32), clock=ManualClock())  # type: ignore[arg-type]


def test_agent_run_refuses_plain_http_off_loopback_first(tmp_path: Path) -> None:
    """`bedside agent run --control-site http://10.1.2.3:8443` exits non-zero naming the URL,
    before it reads a configuration or a key or connects to anything."""
    done = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "run", "--state-dir", str(tmp_path / "none"),
         "--control-site", "http://10.1.2.3:8443"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "'http://10.1.2.3:8443'" in done.stderr and "not loopback" in done.stderr
    assert "unit key" not in done.stderr and "Traceback" not in done.stderr
