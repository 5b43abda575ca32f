"""Fault injection shared by the simulators: one mutable ``FaultState`` per simulated device.

A test or the simulator CLI flips fields while a simulator runs; the physics model and the
protocol server consult the state on every step or request, so a fault takes effect at once and
clears when the field is reset. Other simulators (pumps, balance, cell processor) add their own
fields here; keep each field documented in the class docstring and in ``describe()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultState:
    """Faults currently injected into a simulated device.

    Fields:

    - ``heater_failed``: the heater delivers no power (the controller still asks for it), so the
      culture cools towards ambient and the reported heater power is 0 W.
    - ``stuck_sensors``: names of sensors whose measured value is frozen at the value it had when
      the fault began; a server reports it with an Uncertain status (last usable value).
    - ``failed_sensors``: names of sensors that no longer measure; a server reports them Bad
      (sensor failure) and keeps the last value.
    - ``drift``: sensor name -> drift rate in the sensor's units per hour of simulated time; the
      offset grows while the entry is present and resets (recalibration) when it is removed.
    - ``leak_ml_per_h``: culture lost through a leaking bag or line, mL per simulated hour.
    - ``slow_reply_s``: extra delay (seconds of the simulator's clock) before a server answers a
      read or write request, to exercise client timeouts.

    Sensor names of the bioreactor: ``temperature``, ``do``, ``ph``, ``vcd``, ``viability``,
    ``glucose``, ``lactate``, ``volume``, ``heater_power``.
    """

    heater_failed: bool = False
    stuck_sensors: set[str] = field(default_factory=set)
    failed_sensors: set[str] = field(default_factory=set)
    drift: dict[str, float] = field(default_factory=dict)
    leak_ml_per_h: float = 0.0
    slow_reply_s: float = 0.0

    def clear(self) -> None:
        """Remove every fault."""
        self.heater_failed = False
        self.stuck_sensors.clear()
        self.failed_sensors.clear()
        self.drift.clear()
        self.leak_ml_per_h = 0.0
        self.slow_reply_s = 0.0

    @property
    def active(self) -> bool:
        """True when any fault is injected."""
        return bool(
            self.heater_failed
            or self.stuck_sensors
            or self.failed_sensors
            or self.drift
            or self.leak_ml_per_h
            or self.slow_reply_s
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready dict of the current faults (sets as sorted lists)."""
        return {
            "heater_failed": self.heater_failed,
            "stuck_sensors": sorted(self.stuck_sensors),
            "failed_sensors": sorted(self.failed_sensors),
            "drift": dict(sorted(self.drift.items())),
            "leak_ml_per_h": self.leak_ml_per_h,
            "slow_reply_s": self.slow_reply_s,
        }
