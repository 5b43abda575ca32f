"""The serial line transport against a bare pty peer, and the MT-SICS reply parser (no I/O)."""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from drivers.clock import SystemClock
from drivers.errors import (
    ConfigurationError,
    DeviceErrorReply,
    DeviceTimeout,
    DeviceUnavailable,
    ProtocolError,
)
from drivers.mtsics import MtSicsBalance, parse_reply, parse_weight, reply_token
from drivers.points import RetryPolicy, SerialPoint
from drivers.serial_line import SerialLine

FAST_RETRY = RetryPolicy(initial=0.01, factor=2.0, maximum=0.05)
Responder = Callable[[bytes], bytes | None]


class LinePeer:
    """A minimal line device on a pty: answers each ``\\r\\n`` line with ``respond(line)``."""

    def __init__(self, link: Path, respond: Responder) -> None:
        self.link = link
        self.respond = respond
        self.received: list[bytes] = []
        self._buffer = bytearray()
        self._fds: tuple[int, int] | None = None

    def open(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._fds = (master, slave)
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(slave))
        asyncio.get_running_loop().add_reader(master, self._on_readable)

    def close(self) -> None:
        if self._fds is not None:
            master, slave = self._fds
            self._fds = None
            asyncio.get_running_loop().remove_reader(master)
            os.close(master)
            os.close(slave)
            self.link.unlink()

    def send(self, data: bytes) -> None:
        assert self._fds is not None
        os.write(self._fds[0], data)

    def _on_readable(self) -> None:
        assert self._fds is not None
        self._buffer.extend(os.read(self._fds[0], 4096))
        while (end := self._buffer.find(b"\r\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            self.received.append(line)
            reply = self.respond(line)
            if reply is not None:
                self.send(reply)


def upper(line: bytes) -> bytes:
    return line.upper() + b"\r\n"


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[LinePeer]:
    device = LinePeer(tmp_path / "ttyPEER", upper)
    device.open()
    yield device
    device.close()


def make_line(peer: LinePeer, timeout: float = 0.3) -> SerialLine:
    return SerialLine(
        "peer", str(peer.link), clock=SystemClock(), timeout=timeout, retry=FAST_RETRY
    )


async def test_request_returns_the_reply_line(peer: LinePeer) -> None:
    """A command goes out with its terminator and the one reply line comes back without it."""
    async with make_line(peer) as line:
        assert await line.request("hello") == "HELLO"
    assert peer.received == [b"hello"]


async def test_request_lines_collects_a_multi_line_answer(peer: LinePeer) -> None:
    """request_lines keeps reading while the predicate says more lines follow."""
    peer.respond = lambda _: b"1 B\r\n2 B\r\n3 A\r\n"
    async with make_line(peer) as line:
        lines = await line.request_lines("list", more=lambda text: text.endswith("B"))
    assert lines == ["1 B", "2 B", "3 A"]


async def test_concurrent_requests_do_not_interleave(peer: LinePeer) -> None:
    """Twenty concurrent requests each get the reply to their own command."""
    async with make_line(peer) as line:
        replies = await asyncio.gather(*(line.request(f"cmd{i}") for i in range(20)))
    assert replies == [f"CMD{i}" for i in range(20)]


async def test_stale_input_is_flushed_before_a_request(peer: LinePeer) -> None:
    """Lines that arrived before a request are dropped, not taken as its reply."""
    async with make_line(peer) as line:
        peer.send(b"LATE NOISE\r\n")
        await asyncio.sleep(0.01)  # let the stray line reach the port
        assert await line.request("ping") == "PING"


async def test_skip_drops_late_replies_to_other_commands(peer: LinePeer) -> None:
    """A reply line the caller marks as stale is skipped and the real reply returned."""
    peer.respond = lambda line: b"OLD reply\r\n" + line.upper() + b"\r\n"
    async with make_line(peer) as line:
        reply = await line.request("new", skip=lambda text: text.startswith("OLD"))
    assert reply == "NEW"


async def test_undecodable_reply_raises_protocol_error_and_line_recovers(peer: LinePeer) -> None:
    """Non-ASCII garbage raises ProtocolError naming device, port and command; the next
    request works."""
    peer.respond = lambda _: b"\xff\xfe\x80\r\n"
    async with make_line(peer) as line:
        with pytest.raises(ProtocolError) as caught:
            await line.request("status")
        assert "peer" in str(caught.value)
        assert str(peer.link) in str(caught.value)
        assert "'status'" in str(caught.value)
        peer.respond = upper
        assert await line.request("again") == "AGAIN"


async def test_silent_device_raises_device_timeout(peer: LinePeer) -> None:
    """No reply within the timeout raises DeviceTimeout naming device, port and command."""
    peer.respond = lambda _: None
    async with make_line(peer, timeout=0.05) as line:
        with pytest.raises(DeviceTimeout) as caught:
            await line.request("hello?")
    message = str(caught.value)
    assert "peer" in message and str(peer.link) in message and "'hello?'" in message


async def test_vanished_port_raises_unavailable_then_reopens(peer: LinePeer) -> None:
    """When the pty goes away requests raise DeviceUnavailable; once it is back at the same
    path a later request reopens the port and succeeds."""
    async with make_line(peer) as line:
        assert await line.request("a") == "A"
        peer.close()
        with pytest.raises(DeviceUnavailable):
            await line.request("b")
        assert not line.is_open
        peer.open()
        for _ in range(200):  # reopen attempts are spaced by the retry backoff
            try:
                reply = await line.request("c")
                break
            except DeviceUnavailable:
                await asyncio.sleep(0.01)
        assert reply == "C"
        assert line.is_open


async def test_missing_port_raises_device_unavailable(tmp_path: Path) -> None:
    """Opening a path where no device is raises DeviceUnavailable naming the port."""
    line = SerialLine("ghost", str(tmp_path / "nothing"), clock=SystemClock())
    with pytest.raises(DeviceUnavailable, match="nothing"):
        await line.open()


async def test_bad_serial_settings_raise_configuration_error(peer: LinePeer) -> None:
    """A parity pyserial does not know is a ConfigurationError, not a device fault."""
    line = SerialLine("peer", str(peer.link), clock=SystemClock(), parity="Q")
    with pytest.raises(ConfigurationError, match="peer"):
        await line.open()


def test_reply_parser_normalises_units_to_grams() -> None:
    """Weights in kg and mg are returned in grams."""
    assert parse_weight("b", "SI", parse_reply("b", "SI", "S S      1.250 kg")) == 1250.0
    assert parse_weight("b", "S", parse_reply("b", "S", "S S    500.0 mg")) == 0.5
    assert parse_weight("b", "TA", parse_reply("b", "TA", "TA A    -12.30 g")) == -12.3


@pytest.mark.parametrize("code", ["ES", "ET", "EL"])
def test_error_replies_raise_device_error_reply(code: str) -> None:
    """ES, ET and EL raise DeviceErrorReply naming the device, the code and the command."""
    with pytest.raises(DeviceErrorReply, match=rf"bal: {code} .*'Z'"):
        parse_reply("bal", "Z", code)


@pytest.mark.parametrize("line", ["", "S", 'I4 A "unterminated', "Z A", "S S 12.0 lb", "S S x g"])
def test_malformed_replies_raise_protocol_error(line: str) -> None:
    """Replies the protocol does not allow raise ProtocolError, not a wrong value."""
    with pytest.raises(ProtocolError):
        parse_weight("bal", "SI", parse_reply("bal", "SI", line))


def test_reply_tokens_of_commands() -> None:
    """SI is answered with S and @ with I4; other commands echo their own name."""
    assert [reply_token(c) for c in ("SI", "@", "TA 1 g", "Z")] == ["S", "I4", "TA", "Z"]


def test_unsupported_point_command_is_a_configuration_error() -> None:
    """A point whose command the driver cannot read is refused at construction."""
    with pytest.raises(ConfigurationError, match="'Z'"):
        MtSicsBalance("bal", "/dev/null", [SerialPoint("w", "Z")], clock=SystemClock())


async def test_closed_line_refuses_requests(peer: LinePeer) -> None:
    """After close() a request raises DeviceUnavailable instead of silently reopening."""
    line = make_line(peer)
    assert await line.request("first") == "FIRST"  # a first request opens the port
    await line.close()
    with pytest.raises(DeviceUnavailable, match="closed"):
        await line.request("late")
    assert peer.received == [b"first"]
