"""Simulated serial lines: pseudo-terminals reachable through a stable link path.

A simulated device listens on a pty and publishes it as a symlink (``link_to``) that a driver
opens like ``/dev/ttyUSB0``. The link is replaced atomically, so it never points nowhere while
a device restarts, and removed only while it still points at this simulator's pty
(``unlink_if_ours``), so a newer simulator's link survives an older one's shutdown.

``NullModem`` joins two ptys back to back, for a server library that must open a serial port
by name itself (pymodbus's serial server): the server opens ``server_port``, clients open
``link``, and the bytes are relayed between the two master ends on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty


def link_to(link: str, target: str) -> None:
    """Point ``link`` at ``target`` atomically (replacing any previous link)."""
    temporary = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def unlink_if_ours(link: str, target: str | None) -> None:
    """Remove ``link`` if it still points at ``target``; leave anything else alone."""
    if target is None:
        return
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            os.unlink(link)


class NullModem:
    """Two ptys joined back to back; ``server_port`` for the server, ``link`` for clients."""

    def __init__(self, link: str) -> None:
        self.link = link
        self._fds: list[int] = []
        self.server_port = ""
        self._client_port = ""

    @property
    def is_open(self) -> bool:
        """Whether the ptys exist (between ``open`` and ``close``)."""
        return bool(self._fds)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create both ptys, link the client end and start relaying."""
        master_a, slave_a = os.openpty()
        master_b, slave_b = os.openpty()
        self._fds = [master_a, slave_a, master_b, slave_b]
        for fd in (slave_a, slave_b):
            tty.setraw(fd)  # no echo or line editing until an opener configures the port
        for fd in (master_a, master_b):
            os.set_blocking(fd, False)
        self.server_port, self._client_port = os.ttyname(slave_a), os.ttyname(slave_b)
        link_to(self.link, self._client_port)
        loop.add_reader(master_a, self._relay, master_a, master_b)
        loop.add_reader(master_b, self._relay, master_b, master_a)

    @staticmethod
    def _relay(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
            os.write(dst, data)
        except OSError:  # nothing to read, or the line is full: bytes are lost, as on a wire
            pass

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop relaying, close the ptys and remove the link; safe to call twice."""
        if not self._fds:
            return
        loop.remove_reader(self._fds[0])
        loop.remove_reader(self._fds[2])
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        unlink_if_ours(self.link, self._client_port)
