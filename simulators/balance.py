"""A laboratory balance speaking MT-SICS level 0 on a pseudo-terminal.

The simulator owns both ends of a pty (``os.openpty``), sets it raw (no echo, ``\\r\\n`` passes
unchanged) and points ``link_path`` at the slave device, so a driver opens ``link_path`` like a
real serial port. Commands arrive on the master end and are answered in order::

    S   -> S S <net> g | S I (not stable) | S + (overload) | S - (underload)
    SI  -> S S <net> g | S D <net> g (dynamic, with noise) | S + | S -
    Z   -> Z A | Z I | Z + | Z -          T  -> T S <tare> g | T I | T + | T -
    TA  -> TA A <tare> g                  TA <value> [g|kg|mg] -> TA A <tare> g | TA L | EL
    @   -> I4 A "<serial>" (clears the tare)
    I0 / I2 / I4 -> command list / model and capacity / serial number;  anything else -> ES

The load on the cell comes from ``weight_source()`` (default: what ``place()`` put there). After
the load changes by more than half the resolution the reading is dynamic until ``settle_time_s``
of clock time has passed. A ``weight_source`` is sampled when a command asks for the weight, so
its changes are noticed at the next command (``place()`` at once). Dynamic readings carry
gaussian noise from a seeded generator, stable ones none. Above ``capacity_g`` the balance is
overloaded; a load below zero (pan lifted) is an underload. Displayed weights are net:
load - zero offset - tare.

``BalanceFaults`` injects garbled or corrupted replies, slow replies and silence;
``disconnect()`` and ``reconnect()`` make the port vanish and come back at the same path.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import tty
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog

from drivers.clock import Clock
from simulators.ptylink import link_to, unlink_if_ours

_UNITS_IN_GRAMS = {"g": 1.0, "kg": 1000.0, "mg": 0.001}
_COMMANDS = ("I0", "I2", "I4", "S", "SI", "Z", "T", "TA", "@")


@dataclass
class BalanceFaults:
    """Faults currently injected into the simulated balance; flip fields while it runs.

    - ``garble``: probability (0..1) that a reply is replaced by random non-ASCII bytes.
    - ``corrupt``: probability that two characters of each reply line become ``#`` (the line
      stays ASCII but no longer parses).
    - ``slow_reply_s``: each reply is sent this many seconds of the simulator's clock late.
    - ``silent``: commands are read and never answered.

    The port vanishing is an action, not a field: ``BalanceSimulator.disconnect()`` and
    ``reconnect()``.
    """

    garble: float = 0.0
    corrupt: float = 0.0
    slow_reply_s: float = 0.0
    silent: bool = False

    def clear(self) -> None:
        """Remove every fault."""
        self.garble = self.corrupt = self.slow_reply_s = 0.0
        self.silent = False

    @property
    def active(self) -> bool:
        """True when any fault is injected."""
        return bool(self.garble or self.corrupt or self.slow_reply_s or self.silent)


class BalanceSimulator:
    """An MT-SICS balance on a pty reachable at ``link_path``; an async context manager."""

    def __init__(
        self,
        clock: Clock,
        *,
        link_path: str,
        weight_source: Callable[[], float] | None = None,
        capacity_g: float = 6200.0,
        resolution_g: float = 0.01,
        settle_time_s: float = 2.0,
        noise_g: float = 0.02,
        seed: int = 0,
        faults: BalanceFaults | None = None,
        serial_number: str = "SIM0000001",
        model: str = "BedsideSim",
    ) -> None:
        self.link_path = link_path
        self.faults = faults or BalanceFaults()
        self.capacity_g = capacity_g
        self.resolution_g = resolution_g
        self.settle_time_s = settle_time_s
        self.noise_g = noise_g
        self.serial_number = serial_number
        self.model = model
        self.load_g = 0.0
        self.zero_offset_g = 0.0
        self.tare_g = 0.0
        self._clock = clock
        self._source = weight_source or (lambda: self.load_g)
        self._external_source = weight_source is not None
        self._rng = random.Random(seed)
        self._decimals = max(0, -math.floor(math.log10(resolution_g)))
        self._last_raw: float | None = None
        self._changed_at = 0.0
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_name: str | None = None
        self._buffer = bytearray()
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger(__name__).bind(device="balance_sim", link=link_path)

    # -- life cycle --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the pty exists and ``link_path`` points at it."""
        return self._master is not None

    @property
    def device_name(self) -> str | None:
        """The slave device the link points at (``/dev/pts/N``), while connected."""
        return self._slave_name

    async def start(self) -> None:
        """Create the pty, link it and start answering."""
        if self._task is not None:
            return
        self._last_raw = self._source()
        self._changed_at = self._clock.monotonic() - self.settle_time_s
        self._open_pty()
        self._task = asyncio.create_task(self._serve(), name="balance_simulator")

    async def stop(self) -> None:
        """Stop answering, close the pty and remove the link; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self._close_pty()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def disconnect(self) -> None:
        """Make the port vanish: close both pty ends and remove the link."""
        self._close_pty()
        self._log.info("balance_sim_disconnected")

    async def reconnect(self) -> None:
        """Bring the port back: a new pty linked at the same path."""
        if self._master is None:
            self._open_pty()
            self._log.info("balance_sim_reconnected", device_name=self.device_name)

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation: bytes pass as sent
        os.set_blocking(master, False)
        # the simulator keeps the slave open too, so the master never reads EIO while no
        # driver has the port open
        self._master, self._slave, self._slave_name = master, slave, os.ttyname(slave)
        link_to(self.link_path, self._slave_name)  # atomic: it never points nowhere
        asyncio.get_running_loop().add_reader(master, self._on_readable)

    def _close_pty(self) -> None:
        master, slave, name = self._master, self._slave, self._slave_name
        self._master = self._slave = self._slave_name = None
        if master is not None:
            asyncio.get_running_loop().remove_reader(master)
            os.close(master)
        if slave is not None:
            unlink_if_ours(self.link_path, name)
            os.close(slave)
        self._buffer.clear()
        while not self._queue.empty():
            self._queue.get_nowait()

    # -- the wire -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            chunk = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._log.warning("balance_sim_read_failed", error=str(exc))
            return
        self._buffer.extend(chunk)
        while (end := self._buffer.find(b"\n")) >= 0:
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            try:
                self._queue.put_nowait(raw.decode("ascii", errors="replace"))
            except asyncio.QueueFull:
                self._log.warning("balance_sim_command_dropped", command=raw)

    async def _serve(self) -> None:
        while True:
            command = await self._queue.get()
            if not command.strip():
                continue
            replies = self.handle(command)
            if self.faults.silent:
                self._log.debug("balance_sim_silent", command=command)
                continue
            if self.faults.slow_reply_s > 0:
                await self._clock.sleep(self.faults.slow_reply_s)
            self._send(self._apply_faults(replies))

    def _apply_faults(self, replies: list[str]) -> bytes:
        if self._rng.random() < self.faults.garble:
            noise = bytes(self._rng.randrange(0x80, 0x100) for _ in range(self._rng.randint(4, 12)))
            return noise + b"\r\n"
        lines = []
        for line in replies:
            if self._rng.random() < self.faults.corrupt:
                chars = list(line)
                for i in self._rng.sample(range(len(chars)), k=min(2, len(chars))):
                    chars[i] = "#"
                line = "".join(chars)
            lines.append(line)
        return "".join(f"{line}\r\n" for line in lines).encode("ascii")

    def _send(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except OSError as exc:  # nobody reads the port and its buffer is full
            self._log.debug("balance_sim_reply_dropped", error=str(exc))

    # -- the balance --------------------------------------------------------------------------

    def place(self, grams: float) -> None:
        """Put ``grams`` on the pan (only without a ``weight_source``)."""
        if self._external_source:
            raise RuntimeError("the load comes from weight_source; place() does not apply")
        self.load_g = grams
        self._raw()

    def _raw(self) -> float:
        raw = self._source()
        if self._last_raw is None or abs(raw - self._last_raw) > self.resolution_g / 2:
            self._last_raw = raw
            self._changed_at = self._clock.monotonic()
        return raw

    def _stable(self) -> bool:
        return self._clock.monotonic() - self._changed_at >= self.settle_time_s

    def _weight(self, value: float) -> str:
        steps = round(value / self.resolution_g)
        return f"{steps * self.resolution_g if steps else 0.0:>10.{self._decimals}f} g"

    def _limit(self, raw: float) -> str | None:
        if raw > self.capacity_g:
            return "+"
        return "-" if raw < 0 else None

    def handle(self, command: str) -> list[str]:
        """The reply lines to one command line."""
        name, *args = command.split()
        if name == "TA":
            return self._tare_preset(args)
        if args or name not in _COMMANDS:
            return ["ES"]
        if name == "I0":
            return [f'I0 {"A" if c == _COMMANDS[-1] else "B"} 0 "{c}"' for c in _COMMANDS]
        if name == "I2":
            return [f'I2 A "{self.model} {self.capacity_g:.{self._decimals}f} g"']
        if name in ("I4", "@"):
            if name == "@":
                self.tare_g = 0.0
            return [f'I4 A "{self.serial_number}"']
        raw = self._raw()
        status = self._limit(raw) or ("S" if self._stable() else "D")
        if name in ("Z", "T") and status == "D":
            status = "I"
        if name == "Z":
            if status == "S":
                self.zero_offset_g, self.tare_g = raw, 0.0
            return [f"Z {'A' if status == 'S' else status}"]
        if name == "T":
            if status != "S":
                return [f"T {status}"]
            self.tare_g = raw - self.zero_offset_g
            return [f"T S {self._weight(self.tare_g)}"]
        net = raw - self.zero_offset_g - self.tare_g
        if name == "S" and status == "D":
            return ["S I"]
        if status == "D":
            net += self._rng.gauss(0.0, self.noise_g)
        return [f"S {status} {self._weight(net)}" if status in "SD" else f"S {status}"]

    def _tare_preset(self, args: list[str]) -> list[str]:
        if not args:
            return [f"TA A {self._weight(self.tare_g)}"]
        if len(args) > 2 or (len(args) == 2 and args[1] not in _UNITS_IN_GRAMS):
            return ["EL"]
        try:
            value = float(args[0]) * _UNITS_IN_GRAMS[args[1] if len(args) == 2 else "g"]
        except ValueError:
            return ["EL"]
        if not 0.0 <= value <= self.capacity_g:
            return ["TA L"]
        self.tare_g = value
        return [f"TA A {self._weight(self.tare_g)}"]
