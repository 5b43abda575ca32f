"""``make bench``: throughput and latency figures, each beside a reference measured in the same run.

Figures are medians of nothing: one run each, flat out on loopback, client and server on the same
machine. Run it twice to see the spread (about +-20 % on a 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from tests.bench import protocols


def row(name: str, value: float, unit: str, ref: float | None = None, goal: str = "") -> None:
    ratio = (
        f"  driver/raw {value / ref:5.2f} (overhead {100 * (1 - value / ref):+.0f} %)"
        if ref
        else ""
    )
    print(f"  {name:<46} {value:>14,.1f} {unit:<16}{ratio}  {goal}")
    sys.stdout.flush()


def section(title: str) -> None:
    print(f"\n{title}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument(
        "--only", default="", help="comma-separated sections: opcua,modbus,bioreactor,journal,drain"
    )
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want: Callable[[str], bool] = lambda s: not only or s in only  # noqa: E731
    s = args.seconds
    print(f"Bedside benchmarks ({s:g} s per measurement)")

    if want("opcua"):
        section("OPC UA (asyncua server on loopback, 100 Double variables)")
        r: dict[str, Any] = asyncio.run(protocols.opcua(s))
        row("raw asyncua read_values", r["opcua_raw_values_per_s"], "values/s")
        row("driver read", r["opcua_driver_values_per_s"], "values/s", r["opcua_raw_values_per_s"])
        row("raw asyncua subscription", r["opcua_raw_notifications_per_s"], "notifications/s")
        row(
            "driver observe",
            r["opcua_driver_notifications_per_s"],
            "notifications/s",
            r["opcua_raw_notifications_per_s"],
        )

    if want("modbus"):
        section("Modbus TCP (pymodbus server on loopback, 100 holding registers)")
        r = asyncio.run(protocols.modbus(s))
        row("raw pymodbus read_holding_registers", r["modbus_raw_registers_per_s"], "registers/s")
        row(
            "driver read (100 tags, merged)",
            r["modbus_driver_registers_per_s"],
            "registers/s",
            r["modbus_raw_registers_per_s"],
            "goal: overhead < 20 %",
        )

    if want("bioreactor"):
        from simulators.bioreactor_model import benchmark_days_per_minute

        section("Bioreactor physics (full model, sub-stepped)")
        row(
            "simulated days per wall-clock minute",
            benchmark_days_per_minute(s),
            "days/min",
            goal="goal: >= 8",
        )

    if want("journal"):
        from agent.journal_bench import bench as journal_bench

        section("Journal (SQLite WAL, one core)")
        j = journal_bench(s)
        for key, value in j.items():
            row(key, value, "")


if __name__ == "__main__":
    main()
