"""A request/response line transport over a serial port (pyserial), for asyncio.

pyserial opens and configures the port (baud rate, framing, exclusive lock) and then the line
works on the port's non-blocking file descriptor with the event loop (``add_reader``): no
threads, and a vanished device is noticed the moment its descriptor reports end-of-file or an
error, even between requests. Ports without a file descriptor (``rfc2217://`` URLs, Windows)
are not supported.

One request at a time: a lock keeps concurrent requests from interleaving on the wire, and
input left over from an earlier request (a late reply, line noise) is flushed before each one.

When the port vanishes (the read end sees EOF or an OS error, a write fails, or the device path
is gone after a silent request) the line closes the port and raises ``DeviceUnavailable``; later
requests try to reopen it, spaced by the ``RetryPolicy`` backoff on the injected clock, and fail
fast with ``DeviceUnavailable`` in between. ``timeout`` is in wall-clock seconds (a device
answers in real time, however fast the process clock runs); the backoff uses the injected clock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import termios
from collections.abc import Callable
from types import TracebackType
from typing import Self

import serial
import structlog

from drivers.clock import Clock
from drivers.errors import ConfigurationError, DeviceTimeout, DeviceUnavailable, ProtocolError
from drivers.points import RetryPolicy

_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


def _read_blocks_until_data(fd: int) -> None:
    """Set VMIN=1: pyserial leaves VMIN=0, where an empty non-blocking read returns b"" just
    like end-of-file; with VMIN=1 it raises EAGAIN and b"" means the device is gone."""
    attributes = termios.tcgetattr(fd)
    attributes[6][termios.VMIN] = 1
    attributes[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attributes)


class SerialLine:
    """One serial port speaking a line protocol: write a command line, read its reply lines."""

    def __init__(
        self,
        device: str,
        port: str,
        *,
        clock: Clock,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        terminator: bytes = b"\r\n",
        timeout: float = 1.0,
        retry: RetryPolicy = RetryPolicy(),
        encoding: str = "ascii",
    ) -> None:
        if not terminator:
            raise ConfigurationError(device, f"port {port}: empty line terminator")
        if not timeout > 0:
            raise ConfigurationError(device, f"port {port}: timeout must be > 0, got {timeout!r}")
        self.device = device
        self.port = port
        self.timeout = timeout
        self._clock = clock
        self._settings = {
            "baudrate": baudrate,
            "bytesize": bytesize,
            "parity": parity,
            "stopbits": stopbits,
        }
        self._terminator = terminator
        self._retry = retry
        self._encoding = encoding
        self._lock = asyncio.Lock()
        self._serial: serial.Serial | None = None
        self._buffer = bytearray()
        self._lines: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost_reason = "port not open"
        self._was_lost = False
        self._closed = False  # only an explicit close() stops requests from (re)opening
        self._delay = retry.initial
        self._next_attempt = 0.0
        self._log = structlog.get_logger(__name__).bind(device=device, port=port)

    # -- life cycle --------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether the port is open now (it may still vanish at any moment)."""
        return self._serial is not None

    async def open(self) -> None:
        """Open the port now; raises ``DeviceUnavailable`` when it cannot be opened. (A first
        request also opens it.)"""
        self._closed = False
        if self._serial is None:
            self._open()

    async def close(self) -> None:
        """Close the port; safe to call twice. Requests fail until ``open()`` again."""
        self._closed = True
        self._drop_port("closed")
        self._was_lost = False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open(self) -> None:
        try:
            port = serial.Serial(self.port, timeout=0, exclusive=True, **self._settings)
        except ValueError as exc:
            raise ConfigurationError(self.device, f"port {self.port}: {exc}") from exc
        except (serial.SerialException, OSError) as exc:
            self._next_attempt = self._clock.monotonic() + self._delay
            self._log.debug("serial_open_failed", error=str(exc), retry_in=self._delay)
            self._delay = min(self._delay * self._retry.factor, self._retry.maximum)
            errno_ = getattr(exc, "errno", None)
            if "exclusively lock" in str(exc):
                reason = "in use (locked by another process)"
            else:
                reason = os.strerror(errno_) if isinstance(errno_, int) else str(exc)
            raise DeviceUnavailable(self.device, f"cannot open port {self.port}: {reason}") from exc
        try:
            _read_blocks_until_data(port.fileno())
        except termios.error as exc:
            port.close()
            raise DeviceUnavailable(
                self.device, f"cannot configure port {self.port}: {exc}"
            ) from exc
        self._serial = port
        self._buffer.clear()
        self._lines.clear()
        self._delay = self._retry.initial
        asyncio.get_running_loop().add_reader(port.fileno(), self._on_readable)
        if self._was_lost:
            self._was_lost = False
            self._log.info("serial_port_reopened")
        else:
            self._log.debug("serial_port_opened")

    def _drop_port(self, reason: str) -> None:
        port, self._serial = self._serial, None
        self._lost_reason = reason
        if port is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(port.fileno())
            loop.remove_writer(port.fileno())
            # the device may be gone already; closing must still release the descriptor
            with contextlib.suppress(serial.SerialException, OSError, termios.error):
                port.close()
        self._wake()

    def _lose(self, reason: str) -> None:
        """The port vanished: close it, schedule the first reopen, say so once."""
        if self._serial is None:
            return
        self._drop_port(reason)
        self._was_lost = True
        self._delay = self._retry.initial
        self._next_attempt = self._clock.monotonic() + self._delay
        self._log.warning("serial_port_lost", reason=reason)

    async def _ensure_open(self, command: str) -> serial.Serial:
        if self._closed:
            raise DeviceUnavailable(
                self.device, f"port {self.port} is closed; command {command!r} not sent"
            )
        if self._serial is None:
            wait = self._next_attempt - self._clock.monotonic()
            if wait > 0:
                raise DeviceUnavailable(
                    self.device,
                    f"port {self.port} unavailable ({self._lost_reason}); command {command!r} "
                    f"not sent, next reopen attempt in {wait:.2f} s",
                )
            self._open()
        assert self._serial is not None
        return self._serial

    # -- reading ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Take in what the port holds. With VMIN=1 and O_NONBLOCK an empty port raises
        EAGAIN, so an empty read is end-of-file: a pty whose other end closed."""
        port = self._serial
        if port is None:
            return
        while True:
            try:
                chunk = os.read(port.fileno(), 4096)
            except OSError as exc:
                if exc.errno in _RETRY_ERRNOS:
                    break
                self._lose(f"read failed: {exc}")
                return
            if not chunk:
                self._lose("read returned end-of-file (device disconnected)")
                return
            self._buffer.extend(chunk)
            if len(chunk) < 4096:
                break
        term = self._terminator
        while (end := self._buffer.find(term)) >= 0:
            self._lines.append(bytes(self._buffer[:end]))
            del self._buffer[: end + len(term)]
        if self._lines:
            self._wake()

    def _path_gone(self) -> bool:
        return not os.path.exists(self.port)  # one stat, only after a request timed out

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _flush_input(self, port: serial.Serial, command: str) -> None:
        self._on_readable()  # take in what the kernel holds, then drop all of it
        still_open = self._serial is port
        if still_open:
            try:
                port.reset_input_buffer()
            except (serial.SerialException, OSError, termios.error) as exc:
                self._lose(f"flush failed: {exc}")
        if self._serial is None:
            raise DeviceUnavailable(
                self.device, f"port {self.port} lost ({self._lost_reason}) before {command!r}"
            )
        if self._lines or self._buffer:
            self._log.debug("serial_stale_input_dropped", lines=len(self._lines))
        self._lines.clear()
        self._buffer.clear()

    async def _next_line(self, timer: asyncio.Future[None], command: str, limit: float) -> bytes:
        while not self._lines:
            if self._serial is None:
                raise DeviceUnavailable(
                    self.device,
                    f"port {self.port} lost ({self._lost_reason}) awaiting reply to {command!r}",
                )
            if timer.done():
                if self._path_gone():
                    self._lose("device path is gone")
                    continue
                raise DeviceTimeout(
                    self.device,
                    f"no reply on port {self.port} to {command!r} within {limit} s",
                )
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({self._waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiter = None
        return self._lines.popleft()

    # -- writing ------------------------------------------------------------------------------

    async def _write_all(
        self, port: serial.Serial, data: bytes, timer: asyncio.Future[None], limit: float
    ) -> None:
        loop = asyncio.get_running_loop()
        fd = port.fileno()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                self._lose(f"write failed: {exc}")
                raise DeviceUnavailable(
                    self.device, f"cannot write {data!r} to port {self.port}: {exc}"
                ) from exc
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, writable.set_result, None)
            try:
                await asyncio.wait({writable, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_writer(fd)  # harmless if the port was dropped meanwhile
            if self._serial is None:
                raise DeviceUnavailable(
                    self.device, f"port {self.port} lost ({self._lost_reason}) writing {data!r}"
                )
            if timer.done():
                raise DeviceTimeout(
                    self.device, f"port {self.port} did not accept {data!r} in {limit} s"
                )

    # -- requests -----------------------------------------------------------------------------

    async def request(
        self,
        line: str,
        *,
        skip: Callable[[str], bool] | None = None,
        reply_timeout: float | None = None,
    ) -> str:
        """Send one command line and return its one reply line (without terminator).

        Reply lines for which ``skip`` is true (e.g. a late reply to an earlier command) are
        dropped. Raises ``DeviceTimeout``, ``DeviceUnavailable`` or ``ProtocolError``
        (undecodable reply), each naming the device, port and command.
        """
        return (await self.request_lines(line, skip=skip, reply_timeout=reply_timeout))[0]

    async def request_lines(
        self,
        line: str,
        *,
        more: Callable[[str], bool] | None = None,
        skip: Callable[[str], bool] | None = None,
        reply_timeout: float | None = None,
    ) -> list[str]:
        """Send one command line and collect reply lines while ``more(line)`` says more follow.

        ``reply_timeout`` (default: the line's ``timeout``) covers the whole exchange.
        """
        try:
            data = line.encode(self._encoding) + self._terminator
        except UnicodeEncodeError as exc:
            raise ConfigurationError(
                self.device, f"command {line!r} for port {self.port} is not {self._encoding}"
            ) from exc
        async with self._lock:
            port = await self._ensure_open(line)
            self._flush_input(port, line)
            limit = self.timeout if reply_timeout is None else reply_timeout
            # a device's reply time is wall time: it does not scale with simulated time
            timer = asyncio.ensure_future(asyncio.sleep(limit))
            try:
                await self._write_all(port, data, timer, limit)
                replies: list[str] = []
                while True:
                    raw = await self._next_line(timer, line, limit)
                    try:
                        text = raw.decode(self._encoding)
                    except UnicodeDecodeError as exc:
                        raise ProtocolError(
                            self.device,
                            f"undecodable reply {raw!r} on port {self.port} to {line!r}",
                        ) from exc
                    if skip is not None and skip(text):
                        self._log.debug("serial_reply_skipped", command=line, reply=text)
                        continue
                    replies.append(text)
                    if more is None or not more(text):
                        return replies
            finally:
                timer.cancel()
