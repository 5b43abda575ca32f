"""``bedside run``, ``bedside alarms`` and ``bedside recipe simulate|install|installed``.

Run and alarm commands act on the running agent through its local API, as an authenticated
user: ``--user`` (or ``BEDSIDE_USER``) and the password from ``BEDSIDE_PASSWORD`` or asked for.
A signer's password is asked for each signature (or ``BEDSIDE_PASSWORD_<USER>``). A run starts
from a recipe installed in the unit's recipe store, by name (``bedside run start NAME``); an
engineer installs recipe files there with ``bedside recipe install FILE``, which validates
them against the unit first. ``bedside run status`` shows the run parameters (patient
identifiers) only with ``--user``.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Any

import httpx
import typer

from agent.cli.common import fail, fail_problems, run_async

run_app = typer.Typer(
    help="Start and command the unit's run (through the agent's local API).", no_args_is_help=True
)
alarms_app = typer.Typer(
    help="The run's alarms: list, acknowledge, shelve.", invoke_without_command=True
)

API = typer.Option(
    os.environ.get("BEDSIDE_API", "http://127.0.0.1:8780"), "--api", help="the agent's local API"
)
USER = typer.Option(os.environ.get("BEDSIDE_USER", ""), "--user", help="your user name")
WHY = typer.Option("", "--why", help="the reason, for the audit trail")


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{what} {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _password(user: str) -> str:
    env = os.environ.get(f"BEDSIDE_PASSWORD_{user.upper().replace('-', '_')}") or os.environ.get(
        "BEDSIDE_PASSWORD"
    )
    return env if env is not None else getpass.getpass(f"password for {user}: ")


def _call(
    api: str, method: str, path: str, user: str = "", body: dict[str, Any] | None = None
) -> Any:
    auth = None
    if method == "POST" and not user:
        fail("give --user (or BEDSIDE_USER): every command is done by a named user")
    if user:
        auth = (user, _password(user))
    try:
        r = httpx.request(method, f"{api}{path}", json=body, auth=auth, timeout=30)
    except httpx.HTTPError as exc:
        fail(f"no agent answers at {api}: {exc}")
    try:
        data = r.json()
    except ValueError:
        fail(f"the agent answered {r.status_code} without JSON at {path}", 1)
    if r.status_code >= 400:
        for problem in data.get("problems", []):
            typer.echo(f"bedside: error: {problem}", err=True)
        fail(data.get("error", r.text), 1)
    return data


@run_app.command("start")
def start(
    recipe: str = typer.Argument(..., help="the recipe's name in the unit's recipe store"),
    param: list[str] = typer.Option(None, "--param", help="name=value"),
    bind: list[str] = typer.Option(None, "--bind", help="role=device"),
    api: str = API,
    user: str = USER,
    why: str = WHY,
) -> None:
    """Start a run of the installed recipe RECIPE (by name) with its parameters."""
    if "/" in recipe or recipe.endswith((".yaml", ".yml")):
        fail(
            f"give the recipe's name in the unit's recipe store, not a file ({recipe!r}); "
            "an engineer installs files with `bedside recipe install FILE`"
        )
    body = {
        "recipe": recipe,
        "params": _pairs(param, "--param"),
        "bind": _pairs(bind, "--bind"),
        "why": why,
    }
    typer.echo(json.dumps(_call(api, "POST", "/api/v1/run/start", user, body)))


@run_app.command("status")
def status(
    api: str = API,
    user: str = typer.Option(
        "", "--user", help="sign in to see the run parameters (otherwise redacted)"
    ),
) -> None:
    """The current run: state, allowed commands, phase, prompts, alarms."""
    typer.echo(json.dumps(_call(api, "GET", "/api/v1/run", user), indent=2))


def _command(name: str) -> Any:
    def command(api: str = API, user: str = USER, why: str = WHY) -> None:
        typer.echo(
            json.dumps(
                _call(api, "POST", "/api/v1/run/command", user, {"command": name, "why": why})
            )
        )

    command.__doc__ = f"Send the {name} command to the run."
    return command


for _name in ("hold", "restart", "pause", "resume", "stop", "abort", "reset"):
    run_app.command(_name)(_command(_name))


@run_app.command("answer")
def answer(
    phase: str,
    input_: list[str] = typer.Option(None, "--input", help="name=value"),
    sign: list[str] = typer.Option(None, "--sign", help="meaning=user (performed=alice)"),
    api: str = API,
    user: str = USER,
) -> None:
    """Answer the open prompt of PHASE (or enter a sample's results), with its signatures."""
    sigs = [
        {"meaning": m, "user": u, "password": _password(u)}
        for m, u in _pairs(sign, "--sign").items()
    ]
    body = {"phase": phase, "inputs": _pairs(input_, "--input"), "signatures": sigs}
    typer.echo(json.dumps(_call(api, "POST", "/api/v1/run/answer", user, body)))


@alarms_app.callback()
def alarms_list(ctx: typer.Context, api: str = API) -> None:
    """List the run's alarms (acknowledge or shelve them with the sub-commands)."""
    if ctx.invoked_subcommand is None:
        typer.echo(json.dumps(_call(api, "GET", "/api/v1/alarms"), indent=2))


@alarms_app.command("ack")
def ack(
    alarm: str, reason: str = typer.Option(..., "--reason"), api: str = API, user: str = USER
) -> None:
    """Acknowledge an alarm (audited with your reason)."""
    typer.echo(
        json.dumps(
            _call(api, "POST", "/api/v1/alarms/ack", user, {"alarm": alarm, "reason": reason})
        )
    )


@alarms_app.command("shelve")
def shelve(
    alarm: str,
    reason: str = typer.Option(..., "--reason"),
    minutes: float = typer.Option(60, "--minutes"),
    api: str = API,
    user: str = USER,
) -> None:
    """Shelve an alarm for a limited time (never a critical one; audited)."""
    typer.echo(
        json.dumps(
            _call(
                api,
                "POST",
                "/api/v1/alarms/shelve",
                user,
                {"alarm": alarm, "reason": reason, "minutes": minutes},
            )
        )
    )


def simulate(
    recipe: Path,
    speed: float = typer.Option(10000, "--speed", help="simulated seconds per wall second"),
    param: list[str] = typer.Option(None, "--param", help="name=value"),
    answer_: list[str] = typer.Option(None, "--answer", help="phase.input=value for prompts"),
    fault: list[str] = typer.Option(
        None,
        "--fault",
        help="target.field=value@time[+duration], e.g. bioreactor.heater_failed=true@2d+6h",
    ),
    seed: int = typer.Option(0, "--seed"),
    keep: Path = typer.Option(None, "--keep", help="keep the journal in this folder"),
) -> None:
    """Dry-run a recipe against the simulated unit at accelerated time and print a summary."""
    from agent.recipe.loader import BindError, ParameterError
    from agent.simulation.run import FaultPlan
    from agent.simulation.run import simulate as run_simulation
    from agent.text.yamlsource import DocumentError

    try:
        plans = [FaultPlan.parse(f) for f in fault or []]
    except ValueError as exc:
        fail(str(exc))
    try:
        summary = run_async(
            run_simulation(
                recipe,
                speed=speed,
                params=_pairs(param, "--param"),
                answers=_pairs(answer_, "--answer"),
                faults=plans,
                seed=seed,
                keep_dir=keep,
            )
        )
    except DocumentError as exc:
        fail_problems(exc.problems)
    except (BindError, ParameterError) as exc:
        fail_problems(getattr(exc, "problems", [str(exc)]))
    typer.echo(json.dumps(summary.__dict__, indent=2, default=str))
    if summary.state != "Complete":
        raise typer.Exit(1)
