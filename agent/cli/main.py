"""The ``bedside`` command: the composition root of every Bedside process.

Configuration is parsed here, once, into frozen objects and passed down. Sub-commands live in
their own modules (``cli_devices``, ``cli_sim``, ...); each prints one clear line on stderr and
exits non-zero when something is wrong.
"""

from __future__ import annotations

import sys

import typer

from agent.cli.common import fail
from agent.logging import configure_logging

app = typer.Typer(
    name="bedside",
    help="Bedside: point-of-care manufacturing of cell therapies, beside the patient.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    log_format: str = typer.Option("auto", "--log-format", help="json, console or auto"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    if log_format not in ("json", "console", "auto"):
        fail(f"--log-format must be json, console or auto, not {log_format!r}")
    configure_logging(log_format, log_level)  # type: ignore[arg-type]


def _register() -> None:
    from agent.cli import agent as cli_agent
    from agent.cli import demo as cli_demo
    from agent.cli import devices as cli_devices
    from agent.cli import journal as cli_journal
    from agent.cli import recipe as cli_recipe
    from agent.cli import recipe_store as cli_recipe_store
    from agent.cli import run as cli_run
    from agent.cli import sim as cli_sim
    from agent.cli import users as cli_users

    app.command("demo", help=cli_demo.demo.__doc__)(cli_demo.demo)
    app.add_typer(cli_devices.app, name="devices")
    app.command("sim", help=cli_sim.serve.__doc__)(cli_sim.serve)
    app.add_typer(cli_sim.fault_app, name="sim-fault")
    app.add_typer(cli_agent.keys_app, name="keys")
    app.add_typer(cli_users.app, name="users")
    cli_recipe.app.command("simulate", help=cli_run.simulate.__doc__)(cli_run.simulate)
    for store_command in (cli_recipe_store.install, cli_recipe_store.installed):
        cli_recipe.app.command(help=store_command.__doc__)(store_command)
    app.add_typer(cli_recipe.app, name="recipe")
    app.add_typer(cli_run.run_app, name="run")
    app.add_typer(cli_run.alarms_app, name="alarms")
    app.add_typer(cli_agent.agent_app, name="agent")
    app.add_typer(cli_agent.cs_app, name="control-site")
    app.command("verify", help=cli_journal.verify.__doc__)(cli_journal.verify)
    app.command("export", help=cli_journal.export.__doc__)(cli_journal.export)
    app.command("status", help=cli_agent.status.__doc__)(cli_agent.status)


_register()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `bedside devices watch ... | head`
        sys.stderr.close()
        raise SystemExit(0) from None
