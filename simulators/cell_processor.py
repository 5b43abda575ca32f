"""The simulated cell processor as an OPC UA server (asyncua), shaped after LADS (OPC 30500).

Address space (namespace ``urn:bedside:simulator:cellprocessor``, index 2 on a fresh server;
browse names ``2:Name``; NodeIds are strings such as
``ns=2;s=CellProcessor.Processing.ProgramManager.State``, see ``node_id``)::

    Objects/DeviceSet/CellProcessor
        Identification {Manufacturer, Model, SerialNumber}              String
        FunctionalUnitSet/Processing
            ProgramManager
                StartProgram(name: String, volume_ml: Double, cycles: UInt32) -> (run_id: String)
                Abort()
                LoadInput(cells: Double, volume_ml: Double)
                State           String: idle, running, complete, aborted, error
                CurrentProgram  String      RunId  String
                Progress        Double, %   Result String (JSON of the last completed run)
                Error           String (why the last run failed)
                StatusMessage   String (what the last method call did, or why it was refused)
            Bag {Cells: Double, VolumeMl: Double, TargetPercent: Double}   the cells held

Programs (``simulators.cell_processor_programs``): select (CD4/CD8 magnetic selection, ~3 h,
recovery ~55 %, purity ~98 %), wash (~15 min per cycle), concentrate (~30 min), formulate
(~20 min), timed by the injected clock. ``select`` takes its input from the bag (loaded by
``LoadInput``) or, with nothing loaded, from ``volume_ml`` of a typical apheresis product; each
completed program leaves its output in the bag for the next one.

Refused calls answer like a spec-following server: an argument of the wrong type gives
``BadTypeMismatch``, a wrong count ``BadArgumentsMissing``/``BadTooManyArguments``, a bad value
``BadInvalidArgument`` with the argument's own code (``BadOutOfRange``...) in
InputArgumentResults, a call the state does not allow ``BadInvalidState``; ``StatusMessage``
says why in words. All variables are read-only to clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from asyncua import Node, Server, ua

from drivers.clock import Clock
from simulators.cell_processor_programs import (
    TRANSITIONS,
    Bag,
    Program,
    Refusal,
    State,
    check_start,
    run_outcome,
)
from simulators.opcua_sessions import stop_server

NAMESPACE = "urn:bedside:simulator:cellprocessor"
ENDPOINT_PATH = "/bedside/cellprocessor"
log = structlog.get_logger(__name__)

_S, _D, _U = ua.VariantType.String, ua.VariantType.Double, ua.VariantType.UInt32
SIGNATURES: dict[str, tuple[tuple[str, ua.VariantType], ...]] = {
    "StartProgram": (("name", _S), ("volume_ml", _D), ("cycles", _U)),
    "Abort": (),
    "LoadInput": (("cells", _D), ("volume_ml", _D)),
}
PROGRAM_VARIABLES: dict[str, tuple[Any, ua.VariantType]] = {
    "State": (State.IDLE.value, _S),
    "CurrentProgram": ("", _S),
    "RunId": ("", _S),
    "Progress": (0.0, _D),
    "Result": ("", _S),
    "Error": ("", _S),
    "StatusMessage": ("", _S),
}
BAG_VARIABLES = {"Cells": "cells", "VolumeMl": "volume_ml", "TargetPercent": "target_pct"}


@dataclass
class CellProcessorFaults:
    """Faults of the simulated cell processor; a test may change them while a run goes on.

    - ``fail_program``: a program name (or ``"any"``) whose runs fail; ``None`` for none.
    - ``fail_at_progress``: the progress (%) at which such a run goes to ``error``.
    - ``fail_message``: the text the ``Error`` variable then holds.
    """

    fail_program: str | None = None
    fail_at_progress: float = 50.0
    fail_message: str = "bag pressure alarm: run stopped"


_PROCESSING = "CellProcessor.Processing."


def node_id(path: str) -> str:
    """NodeId text of a node below Processing, e.g. ``node_id("ProgramManager.State")``."""
    return f"ns=2;s={_PROCESSING}{path}"


class CellProcessorServer:
    """The cell processor on ``opc.tcp://host:port``; an async context manager."""

    def __init__(
        self,
        clock: Clock,
        *,
        host: str = "127.0.0.1",
        port: int = 4841,
        faults: CellProcessorFaults | None = None,
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self.host = host
        self.port = port
        self.faults = faults if faults is not None else CellProcessorFaults()
        self.bag = Bag()
        self.state = State.IDLE
        self._rng = random.Random(seed)
        self._runs = itertools.count(1)
        self._server: Server | None = None
        self._nodes: dict[str, Node] = {}
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(device="cell-processor")

    @property
    def endpoint(self) -> str:
        """The endpoint URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    async def start(self) -> None:
        """Build the address space and listen."""
        server = Server()
        await server.init()
        server.disable_clock()  # its wall-clock time loop makes stop() wait a second
        server.set_endpoint(self.endpoint)
        server.set_server_name("Bedside cell processor simulator")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(NAMESPACE)
        await self._build(server, index)
        await server.start()
        self._server = server
        self._log.info("cell_processor_started", endpoint=self.endpoint)

    async def stop(self) -> None:
        """Stop any run and the server, closing every session."""
        await self._cancel_run()
        server, self._server = self._server, None
        if server is None:
            return
        await stop_server(server)  # also closes sessions cut while subscribed
        self._log.info("cell_processor_stopped")

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

    async def run(self) -> None:
        """Serve until cancelled."""
        async with self:
            await asyncio.Event().wait()

    # ---------------------------------------------------------------- address space

    async def _build(self, server: Server, index: int) -> None:
        def nid(path: str) -> ua.NodeId:
            return ua.NodeId(path, index)

        def qn(name: str) -> ua.QualifiedName:
            return ua.QualifiedName(name, index)

        device_set = await server.nodes.objects.add_object(nid("DeviceSet"), qn("DeviceSet"))
        device = await device_set.add_object(nid("CellProcessor"), qn("CellProcessor"))
        ident = await device.add_object(nid("CellProcessor.Identification"), qn("Identification"))
        for name, value in (
            ("Manufacturer", "Bedside simulators"),
            ("Model", "CP-1 cell processor"),
            ("SerialNumber", "SIM-CP-0001"),
        ):
            await ident.add_variable(nid(f"CellProcessor.Identification.{name}"), qn(name), value)
        units = await device.add_object(
            nid("CellProcessor.FunctionalUnitSet"), qn("FunctionalUnitSet")
        )
        processing = await units.add_object(nid("CellProcessor.Processing"), qn("Processing"))
        manager = await processing.add_object(
            nid(f"{_PROCESSING}ProgramManager"), qn("ProgramManager")
        )
        for name, (value, vtype) in PROGRAM_VARIABLES.items():
            self._nodes[name] = await manager.add_variable(
                nid(f"{_PROCESSING}ProgramManager.{name}"), qn(name), ua.Variant(value, vtype)
            )
        bag = await processing.add_object(nid(f"{_PROCESSING}Bag"), qn("Bag"))
        for name in BAG_VARIABLES:
            self._nodes[name] = await bag.add_variable(
                nid(f"{_PROCESSING}Bag.{name}"), qn(name), ua.Variant(0.0, _D)
            )
        handlers = {"StartProgram": self._start, "Abort": self._abort, "LoadInput": self._load}
        string = ua.NodeId(ua.ObjectIds.String)
        for method, signature in SIGNATURES.items():
            await manager.add_method(
                nid(f"{_PROCESSING}ProgramManager.{method}"),
                qn(method),
                self._checked(method, handlers[method]),
                [ua.Argument(n, ua.NodeId(vtype.value), -1) for n, vtype in signature],
                [ua.Argument("run_id", string, -1)] if method == "StartProgram" else [],
            )

    async def _set(self, name: str, value: Any) -> None:
        vtype = PROGRAM_VARIABLES[name][1] if name in PROGRAM_VARIABLES else _D
        now = self.clock.now()
        await self._nodes[name].write_value(
            ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now)
        )

    async def _set_bag(self, bag: Bag) -> None:
        self.bag = bag
        for name, field in BAG_VARIABLES.items():
            await self._set(name, float(getattr(bag, field)))

    async def _enter(self, command: str) -> None:
        new = TRANSITIONS.get((self.state, command))
        if new is None:
            raise Refusal("BadInvalidState", f"{command} is not allowed while {self.state.value}")
        self._log.info("cell_processor_state", old=self.state.value, new=new.value, command=command)
        self.state = new
        await self._set("State", new.value)

    # ---------------------------------------------------------------- methods

    def _checked(self, method: str, handler: Any) -> Any:
        """Wrap a handler: check argument count and types, turn ``Refusal`` into a status."""
        signature = SIGNATURES[method]

        async def call(parent: ua.NodeId, *args: ua.Variant) -> Any:
            try:
                if len(args) < len(signature):
                    raise Refusal("BadArgumentsMissing", f"{method} takes {len(signature)} args")
                if len(args) > len(signature):
                    raise Refusal("BadTooManyArguments", f"{method} takes {len(signature)} args")
                results = [
                    ua.StatusCode(
                        ua.StatusCodes.Good
                        if arg.VariantType == vtype
                        else ua.StatusCodes.BadTypeMismatch
                    )
                    for arg, (_, vtype) in zip(args, signature, strict=True)
                ]
                if any(r.is_bad() for r in results):
                    names = [n for (n, _), r in zip(signature, results, strict=True) if r.is_bad()]
                    await self._refused(method, "BadTypeMismatch", f"wrong type: {names}")
                    return ua.CallMethodResult(
                        StatusCode=ua.StatusCode(ua.StatusCodes.BadTypeMismatch),
                        InputArgumentResults=results,
                    )
                outputs: list[ua.Variant] = await handler(*(a.Value for a in args))
            except Refusal as refusal:
                await self._refused(method, refusal.status, str(refusal))
                return _refusal_result(refusal, len(args))
            return outputs

        return call

    async def _refused(self, method: str, status: str, message: str) -> None:
        self._log.warning(
            "cell_processor_call_refused", method=method, status=status, reason=message
        )
        await self._set("StatusMessage", f"{method} refused ({status}): {message}")

    async def _start(self, name: str, volume_ml: float, cycles: int) -> list[ua.Variant]:
        if (self.state, "start") not in TRANSITIONS:
            raise Refusal(
                "BadInvalidState", f"StartProgram is not allowed while {self.state.value}"
            )
        program = check_start(self.bag, name, volume_ml, cycles)
        run_id = f"CP-{self.clock.now():%Y%m%d}-{next(self._runs):04d}"
        await self._enter("start")
        for var, value in (
            ("CurrentProgram", name),
            ("RunId", run_id),
            ("Progress", 0.0),
            ("Result", ""),
            ("Error", ""),
            ("StatusMessage", f"{name} started as {run_id}"),
        ):
            await self._set(var, value)
        self._log.info(
            "cell_processor_program_started",
            run=run_id,
            program=name,
            volume_ml=volume_ml,
            cycles=cycles,
        )
        self._task = asyncio.create_task(self._run(program, run_id, volume_ml, cycles))
        return [ua.Variant(run_id, _S)]

    async def _abort(self) -> list[ua.Variant]:
        if (self.state, "abort") not in TRANSITIONS:
            raise Refusal("BadInvalidState", f"Abort is not allowed while {self.state.value}")
        await self._cancel_run()
        await self._enter("abort")
        await self._set("StatusMessage", "run aborted")
        self._log.warning("cell_processor_program_aborted")
        return []

    async def _load(self, cells: float, volume_ml: float) -> list[ua.Variant]:
        if self.state is State.RUNNING:
            raise Refusal("BadInvalidState", "LoadInput is not allowed while running")
        if cells < 0:
            raise Refusal("BadOutOfRange", f"cells {cells:g} must not be negative", 0)
        if not 0 < volume_ml <= 1000:
            raise Refusal("BadOutOfRange", f"volume_ml {volume_ml:g} outside 0..1000 mL", 1)
        share = self.bag.target_pct if not self.bag.empty else 45.0
        await self._set_bag(Bag(cells, volume_ml, share))
        await self._set("StatusMessage", f"loaded {cells:.3g} cells in {volume_ml:g} mL")
        return []

    # ---------------------------------------------------------------- runs

    async def _run(self, program: Program, run_id: str, volume_ml: float, cycles: int) -> None:
        duration = program.duration_s(cycles)
        start = self.clock.monotonic()
        while True:
            elapsed = self.clock.monotonic() - start
            progress = min(100.0, 100.0 * elapsed / duration)
            faults = self.faults
            if faults.fail_program in (program.name, "any") and progress >= faults.fail_at_progress:
                await self._set("Progress", round(faults.fail_at_progress, 2))
                await self._enter("fault")
                await self._set("Error", faults.fail_message)
                self._log.error(
                    "cell_processor_program_failed", run=run_id, error=faults.fail_message
                )
                return
            await self._set("Progress", round(progress, 2))
            if elapsed >= duration:
                break
            await self.clock.sleep(min(duration / 100, duration - elapsed))
        bag, result = run_outcome(program, self.bag, volume_ml, cycles, self._rng)
        await self._set_bag(bag)
        await self._set("Result", json.dumps({"run_id": run_id, **result}, sort_keys=True))
        await self._enter("done")
        await self._set("StatusMessage", f"{program.name} complete ({run_id})")
        self._log.info("cell_processor_program_complete", run=run_id, **result)

    async def _cancel_run(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _refusal_result(refusal: Refusal, count: int) -> ua.CallMethodResult:
    status = getattr(ua.StatusCodes, refusal.status)
    if refusal.argument is None:
        return ua.CallMethodResult(StatusCode=ua.StatusCode(status))
    results = [ua.StatusCode() for _ in range(count)]
    results[refusal.argument] = ua.StatusCode(status)
    return ua.CallMethodResult(
        StatusCode=ua.StatusCode(ua.StatusCodes.BadInvalidArgument), InputArgumentResults=results
    )
