"""Device drivers: one small async protocol, implemented for OPC UA, Modbus and serial lines.

This package depends only on the standard library and the protocol libraries (asyncua,
pymodbus, pyserial); it knows nothing of the agent that uses it.
"""

from drivers.base import Driver, Quality, Sample
from drivers.errors import (
    ConfigurationError,
    DeviceErrorReply,
    DeviceTimeout,
    DeviceUnavailable,
    DriverError,
    MethodFailed,
    ModbusException,
    ProtocolError,
    WriteRefused,
)

__all__ = [
    "ConfigurationError",
    "DeviceErrorReply",
    "DeviceTimeout",
    "DeviceUnavailable",
    "Driver",
    "DriverError",
    "MethodFailed",
    "ModbusException",
    "ProtocolError",
    "Quality",
    "Sample",
    "WriteRefused",
]
