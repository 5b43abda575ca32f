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

from agent.logging import configure_logging
from tests import pg
from tests.bench import protocols

LOCAL_PG = pg.LOCAL_URL


def row(
    name: str,
    value: float,
    unit: str,
    ref: float | None = None,
    goal: str = "",
    vs: str = "driver/raw",
    decimals: int = 1,
) -> None:
    ratio = f"  {vs} {value / ref:5.2f} (overhead {100 * (1 - value / ref):+.0f} %)" if ref else ""
    print(f"  {name:<46} {value:>14,.{decimals}f} {unit:<16}{ratio}  {goal}")
    sys.stdout.flush()


def section(title: str) -> None:
    print(f"\n{title}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections: opcua,modbus,bioreactor,journal,drain,storage,latency,cart",
    )
    parser.add_argument(
        "--trips", type=int, default=30, help="trips per scan period in the latency section"
    )
    parser.add_argument(
        "--cart-speeds",
        default="20000,15000,10000",
        help="clock speeds the cart section tries in turn, until a run ends Complete",
    )
    parser.add_argument(
        "--storage-days",
        type=float,
        default=12.0,
        help="days of a CAR-T run to journal in the storage section (fewer: extrapolated)",
    )
    parser.add_argument(
        "--pg", default=LOCAL_PG, help="PostgreSQL for the drain section (skipped if silent)"
    )
    args = parser.parse_args()
    configure_logging("console", "warning")  # the figures, not the services' info events
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
        from tests.bench.journal import bench as journal_bench

        section("Journal (SQLite WAL, synchronous=FULL, one core)")
        j = journal_bench(s)
        row("raw SQLite, batched inserts (1000 rows/txn)", j["raw_samples_per_s"], "samples/s")
        row("raw SQLite, columnar batches (no chain)", j["columnar_samples_per_s"], "samples/s")
        row(
            "journal (chain, signed checkpoints, durable)",
            j["journal_samples_per_s"],
            "samples/s",
            goal="goal: >= 100,000",
        )
        row("raw batched / journal", j["ratio"], "x", goal="goal: <= 1.5", decimals=2)
        row("samples record, canonical JSON", j["bytes_per_sample"], "bytes/sample")
        row("samples record, deflate", j["deflate_bytes_per_sample"], "bytes/sample")

    if want("drain"):
        from tests.bench.drain import bench_drain

        section("Drain: a 100,000-sample backlog to the control site (verified and stored)")
        stores: list[tuple[str, str | None]] = [("SQLite", None)]
        if pg.answers(args.pg):
            stores.append(("PostgreSQL", args.pg))
        else:
            print(f"  (PostgreSQL at {args.pg} does not answer: skipped)")
        for name, url in stores:
            d = bench_drain(url)
            row(f"{name}: samples verified and stored", d["samples_per_s"], "samples/s",
                goal="goal: >= 100,000")  # fmt: skip
            row(f"{name}: records verified and stored", d["records_per_s"], "records/s")
            row(f"{name}: request bodies on the wire", d["bytes_per_sample"], "bytes/sample",
                goal="goal: <= 40")  # fmt: skip

    if want("storage"):
        from tests.bench import storage

        section(
            f"Storage: the journal of a {storage.RUN_DAYS}-day CAR-T run "
            "(shipped recording policies, simulated unit)"
        )
        storage.report(row, args.storage_days)

    if want("latency"):
        from tests.bench import engine

        section(
            "Trip-to-hold latency (real time, simulated unit: a set-point crosses a monitor's "
            "threshold at the device -> hold action's coil write reaches the feed pump)"
        )
        engine.report_latency(row, args.trips)

    if want("cart"):
        from tests.bench import engine

        section(
            "CAR-T recipe at full speed, full recording "
            "(agent.simulation.run, recipes/cart-expansion.yaml)"
        )
        engine.report_cart(row, [float(x) for x in args.cart_speeds.split(",")])


if __name__ == "__main__":
    main()
