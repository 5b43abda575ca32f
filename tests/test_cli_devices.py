"""System tests of the commissioning CLI: the real `bedside` command against a simulated unit.

The simulated unit runs in this process, on its own event loop in a thread, so that the tests
can run `bedside devices ...` as ordinary subprocesses with the shipped configuration
(`agent/data/unit-sim.yaml`) pointed at it through the environment variables it expands.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua.common.callback import CallbackType, ServerItemCallback

from agent.config import default_config_path, load_config
from simulators.bioreactor_space import CONTROLLER_FUNCTIONS, SENSOR_FUNCTIONS
from simulators.unit import SimEndpoints, SimulatedUnit
from tests.conftest import free_port
from tests.simthread import SimThread as BaseSimThread

T = TypeVar("T")
SPEED = 600.0  # ten simulated minutes per wall second
CONFIG = str(default_config_path())
REPO = Path(__file__).resolve().parent.parent
FUNCTION_SET = "2:DeviceSet/2:Bioreactor/2:FunctionalUnitSet/2:Cultivation/2:FunctionSet"


def sim_env(run_dir: Path, opcua: int, cellproc: int, modbus: int) -> dict[str, str]:
    """The environment that points the shipped configuration at a simulated unit."""
    return {
        **os.environ,
        "BEDSIDE_SIM_OPCUA_PORT": str(opcua),
        "BEDSIDE_SIM_CELLPROC_PORT": str(cellproc),
        "BEDSIDE_SIM_MODBUS_PORT": str(modbus),
        "BEDSIDE_RUN_DIR": str(run_dir),
        "BEDSIDE_STATE_DIR": str(run_dir / "state"),
    }


def bedside(
    env: dict[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the real `bedside` command (logs as JSON lines on stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "--log-format", "json", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The CLI's own error lines (stderr also carries JSON log events)."""
    return [line for line in stderr.splitlines() if line.startswith("bedside: error:")]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


class SimThread(BaseSimThread):
    """The simulated unit in its own thread, at this module's speed."""

    def __init__(self, endpoints: SimEndpoints) -> None:
        super().__init__(endpoints, SPEED)

    def call(self, fn: Callable[[SimulatedUnit], T]) -> T:
        """Run ``fn(unit)`` on the simulator's loop and return its result."""
        result: T = self.submit(fn).result(timeout=10)
        return result


@dataclass
class Sim:
    thread: SimThread
    env: dict[str, str]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """The simulated unit at 600x on free ports, and the environment that reaches it."""
    run_dir = tmp_path_factory.mktemp("sim")
    opcua, cellproc, modbus = free_port(), free_port(), free_port()
    endpoints = SimEndpoints(
        bioreactor_port=opcua,
        cell_processor_port=cellproc,
        modbus_port=modbus,
        rtu_link=str(run_dir / "pumps-rtu"),
        balance_link=str(run_dir / "balance"),
        control_port=free_port(),
        run_dir=str(run_dir),
    )
    with SimThread(endpoints) as thread:
        yield Sim(thread, sim_env(run_dir, opcua, cellproc, modbus))


def wait_for(condition: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {within} s")
        time.sleep(0.1)


# ------------------------------------------------------------------ devices read / write


def test_read_prints_a_good_json_line_for_every_tag(sim: Sim) -> None:
    """`devices read` with no tags prints one JSON line per configured tag, all of good quality."""
    result = bedside(sim.env, "devices", "read", CONFIG)
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert [line["tag"] for line in lines] == list(load_config(CONFIG).all_tags())
    bad = {line["tag"]: line for line in lines if line["quality"] != "good"}
    assert not bad
    assert {line["device"] for line in lines} == {
        "bioreactor",
        "cell_processor",
        "feed_pump",
        "harvest_pump",
        "balance",
    }


def test_write_within_limits_is_followed_by_the_process(sim: Sim) -> None:
    """`devices write temperature_sp 30` sets the set-point and the culture starts cooling."""
    before = sim.thread.call(lambda u: u.model.true_values()["temperature"])
    assert before > 30.5
    result = bedside(sim.env, "devices", "write", CONFIG, "temperature_sp", "30")
    assert result.returncode == 0, result.stderr
    (line,) = json_lines(result.stdout)
    assert line["tag"] == "temperature_sp"
    assert line["written"] == line["read_back"] == 30.0
    assert line["quality"] == "good"
    assert sim.thread.call(lambda u: u.model.controls.temperature_sp) == 30.0
    wait_for(
        lambda: sim.thread.call(lambda u: u.model.true_values()["temperature"]) < before - 0.5,
        "the culture cooling towards 30 degC",
    )


def test_write_outside_limits_is_refused_and_nothing_is_sent(sim: Sim) -> None:
    """`devices write temperature_sp 55` exits non-zero with one line naming the tag and its
    limits, and the bioreactor receives no write at all."""
    writes: list[Any] = []

    async def on_write(event: ServerItemCallback, _dispatcher: Any) -> None:
        if event.is_external:
            writes.append(event.request_params)

    def watch_writes(unit: SimulatedUnit, on: bool) -> float:
        server = unit.bioreactor._require()  # the asyncua server, for its write callbacks
        if on:
            server.subscribe_server_callback(CallbackType.PreWrite, on_write)
        else:
            server.unsubscribe_server_callback(CallbackType.PreWrite, on_write)
        return unit.model.controls.temperature_sp

    set_point = sim.thread.call(lambda u: watch_writes(u, True))
    try:
        result = bedside(sim.env, "devices", "write", CONFIG, "temperature_sp", "55")
    finally:
        after = sim.thread.call(lambda u: watch_writes(u, False))
    assert result.returncode != 0
    assert result.stdout == ""
    (error,) = error_lines(result.stderr)
    assert "temperature_sp" in error and "[20.0, 40.0]" in error and "55" in error
    assert writes == []
    assert after == set_point


def test_write_outside_limits_is_refused_before_connecting(tmp_path: Path) -> None:
    """The limit check needs no device: with nothing serving the bioreactor, the refusal still
    names the limits (and no connection is attempted)."""
    env = sim_env(tmp_path, free_port(), free_port(), free_port())
    result = bedside(env, "devices", "write", CONFIG, "temperature_sp", "55")
    assert result.returncode != 0
    (error,) = error_lines(result.stderr)
    assert "temperature_sp" in error and "[20.0, 40.0]" in error
    assert "cannot connect" not in result.stderr


# ------------------------------------------------------------------ watch and browse


def test_watch_prints_values_as_they_move(sim: Sim) -> None:
    """`devices watch --duration` streams JSON lines in which the process values change, then
    exits 0."""
    tags = ["dissolved_oxygen", "ph", "temperature", "heater_power"]
    result = bedside(sim.env, "devices", "watch", CONFIG, *tags, "--duration", "4")
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert {line["tag"] for line in lines} == set(tags)
    assert all(line["device"] == "bioreactor" for line in lines)
    values: dict[str, set[float]] = {}
    for line in lines:
        values.setdefault(line["tag"], set()).add(line["value"])
    assert max(len(v) for v in values.values()) >= 2, values


def test_browse_lists_the_lads_nodes(sim: Sim) -> None:
    """`devices browse` walks the bioreactor's LADS function set, with writable TargetValues."""
    endpoint = f"opc.tcp://127.0.0.1:{sim.env['BEDSIDE_SIM_OPCUA_PORT']}/bedside/bioreactor"
    result = bedside(sim.env, "devices", "browse", endpoint)
    assert result.returncode == 0, result.stderr
    nodes = {line["path"]: line for line in json_lines(result.stdout)}
    for sf in SENSOR_FUNCTIONS:
        value = nodes[f"{FUNCTION_SET}/2:{sf.name}/2:SensorValue"]
        assert value["node_class"] == "Variable" and value["data_type"] == "Double"
    for cf in CONTROLLER_FUNCTIONS:
        base = f"{FUNCTION_SET}/2:{cf.name}"
        assert nodes[f"{base}/2:TargetValue"]["access"] == "rw"
        assert nodes[f"{base}/2:CurrentValue"]["access"] == "r"
        assert nodes[f"{base}/2:ControlFunctionState/2:Start"]["node_class"] == "Method"


# ------------------------------------------------------------------ errors


BROKEN = """\
unit:
  id: unit-broken
devices:
  bioreactor:
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    tags:
      temperature_sp:
        browse_path: 2:DeviceSet/2:Bioreactor
        writable: true
  scale:
    driver: profibus
    endpoint: tcp://127.0.0.1:5020
  balance:
    driver: serial
    endpoint: /dev/ttyUSB0
    colour: blue
    tags: {}
"""


def test_broken_config_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    """A configuration with three mistakes gives three error lines, each with file and line,
    and exit code 2."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = bedside(dict(os.environ), "devices", "read", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    errors = error_lines(result.stderr)
    assert len(errors) == 3, result.stderr
    assert all(e.startswith(f"bedside: error: {path}:") for e in errors)
    lines = {int(e.split(f"{path}:", 1)[1].split(":", 1)[0]): e for e in errors}
    (tag_line,) = [n for n, e in lines.items() if "temperature_sp" in e]
    assert 8 <= tag_line <= 10 and "needs limits" in lines[tag_line]  # the tag's block
    assert "driver must be one of" in lines[12]  # profibus
    assert "unknown key 'colour'" in lines[17]


def test_unknown_tag_is_refused_with_a_clear_line(sim: Sim) -> None:
    """An unknown tag exits non-zero with one line naming it, and reads nothing."""
    result = bedside(sim.env, "devices", "read", CONFIG, "temperature", "no_such_tag")
    assert result.returncode != 0
    assert result.stdout == ""
    (error,) = error_lines(result.stderr)
    assert "no_such_tag" in error and "unknown tag" in error


@pytest.mark.parametrize(
    ("tag", "device", "where"),
    [
        ("temperature", "bioreactor", "opc.tcp://127.0.0.1:{opcua}/bedside/bioreactor"),
        ("feed_speed", "feed_pump", "127.0.0.1:{modbus}"),
        ("harvest_run", "harvest_pump", "{run_dir}/pumps-rtu"),
        ("bag_weight", "balance", "{run_dir}/balance"),
    ],
)
def test_device_down_gives_one_clear_error_line(
    tmp_path: Path, tag: str, device: str, where: str
) -> None:
    """Reading from a device nobody serves exits non-zero with one line naming the device and
    where it was looked for (no traceback)."""
    opcua, modbus = free_port(), free_port()
    env = sim_env(tmp_path, opcua, free_port(), modbus)
    result = bedside(env, "devices", "read", CONFIG, tag)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (error,) = error_lines(result.stderr)
    assert error.startswith(f"bedside: error: {device}: ")
    assert where.format(opcua=opcua, modbus=modbus, run_dir=tmp_path) in error


# ------------------------------------------------------------------ bedside sim itself


@dataclass
class SimProcess:
    process: asyncio.subprocess.Process
    ready: dict[str, Any]
    env: dict[str, str]
    run_dir: Path


@pytest.fixture
async def sim_process(tmp_path: Path) -> AsyncIterator[SimProcess]:
    """`bedside sim --speed 600` in a subprocess on free ports, once it printed `sim_ready`."""
    run_dir = tmp_path / "run"
    env = sim_env(run_dir, free_port(), free_port(), free_port())
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "agent", "--log-format", "json", "sim"),
        *("--speed", str(SPEED), "--control-port", str(free_port())),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        yield SimProcess(process, json.loads(line), env, run_dir)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def bedside_async(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `bedside` without blocking the event loop; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "agent", *args),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_sim_prints_its_endpoints_and_stops_cleanly_on_sigterm(
    sim_process: SimProcess,
) -> None:
    """`bedside sim` prints `sim_ready` with the endpoints of the configuration it serves, and on
    SIGTERM exits 0 and removes its serial-port links."""
    ready, env, run_dir = sim_process.ready, sim_process.env, sim_process.run_dir
    assert ready["event"] == "sim_ready" and ready["speed"] == SPEED
    endpoints = ready["endpoints"]
    port = env["BEDSIDE_SIM_OPCUA_PORT"]
    assert endpoints["bioreactor"] == f"opc.tcp://127.0.0.1:{port}/bedside/bioreactor"
    cellproc = env["BEDSIDE_SIM_CELLPROC_PORT"]
    assert endpoints["cell_processor"] == f"opc.tcp://127.0.0.1:{cellproc}/bedside/cellprocessor"
    assert endpoints["pumps_tcp"] == f"tcp://127.0.0.1:{env['BEDSIDE_SIM_MODBUS_PORT']}"
    assert endpoints["pumps_rtu"] == f"rtu://{run_dir}/pumps-rtu"
    assert endpoints["balance"] == f"{run_dir}/balance"
    links = [run_dir / "pumps-rtu", run_dir / "balance"]
    assert all(link.is_symlink() for link in links)

    sim_process.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(sim_process.process.wait(), 30) == 0
    assert not any(link.is_symlink() for link in links)
    assert not (run_dir / "control.token").exists()


async def test_sim_fault_set_changes_the_running_simulator(sim_process: SimProcess) -> None:
    """`bedside sim-fault set bioreactor heater_failed true` against a running `bedside sim`
    changes the fault, as `sim-fault show` reads back."""
    env = sim_process.env
    code, out, err = await bedside_async(env, "sim-fault", "show")
    assert code == 0, err
    assert json.loads(out)["bioreactor"]["heater_failed"] is False

    code, out, err = await bedside_async(
        env, "sim-fault", "set", "bioreactor", "heater_failed", "true"
    )
    assert code == 0, err
    assert json.loads(out) == {"target": "bioreactor", "field": "heater_failed", "value": True}

    code, out, err = await bedside_async(env, "sim-fault", "show")
    assert code == 0, err
    assert json.loads(out)["bioreactor"]["heater_failed"] is True
