"""The one error tree of the drivers.

::

    DriverError                      any failure of a device driver
    ├── ConfigurationError           a point or endpoint that cannot work (bad address, type)
    ├── DeviceUnavailable            the device cannot be reached (refused, dropped, timed out)
    │   └── DeviceTimeout            the device did not answer in time
    ├── ProtocolError                the device answered, but not as the protocol says
    │   ├── ModbusException          a Modbus exception response (code and name)
    │   └── DeviceErrorReply         a line protocol's error reply (e.g. MT-SICS ``ES``/``EL``)
    ├── WriteRefused                 a write refused before or by the device (limits, read-only)
    └── MethodFailed                 a device method call returned a bad status

Every message names the device, and where it applies the tag, the address and the value.
Library exceptions (asyncua, pymodbus, pyserial) are translated at the driver boundary with
``raise ... from exc``; a driver never returns ``None`` for a failure.
"""

from __future__ import annotations

from typing import ClassVar


class DriverError(Exception):
    """A device driver failed; the message names the device and what was being done."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device
        self.detail = message


class ConfigurationError(DriverError):
    """A point, endpoint or option that cannot work, found before talking to the device."""


class DeviceUnavailable(DriverError):
    """The device cannot be reached: connection refused, dropped or not yet re-established."""


class DeviceTimeout(DeviceUnavailable):
    """The device did not answer within the configured timeout."""


class ProtocolError(DriverError):
    """The device answered, but not in a way the protocol allows."""


class ModbusException(ProtocolError):
    """A Modbus exception response; ``code`` is the exception code (1 = illegal function...)."""

    NAMES: ClassVar[dict[int, str]] = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "server device failure",
        5: "acknowledge",
        6: "server device busy",
        8: "memory parity error",
        10: "gateway path unavailable",
        11: "gateway target device failed to respond",
    }

    def __init__(self, device: str, message: str, code: int) -> None:
        name = self.NAMES.get(code, "unknown exception")
        super().__init__(device, f"{message}: exception code {code} ({name})")
        self.code = code
        self.name = name


class DeviceErrorReply(ProtocolError):
    """A line protocol's error reply, e.g. MT-SICS ``ES`` (syntax) or ``EL`` (logical)."""


class WriteRefused(DriverError):
    """A write refused: outside the tag's limits, read-only tag, or refused by the device."""


class MethodFailed(DriverError):
    """A device method call failed or returned a bad status."""
