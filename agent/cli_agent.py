"""``bedside keys``, ``verify``, ``agent``, ``status`` and ``control-site`` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import typer

from agent.cli_common import fail, load_config_or_exit, run_async

keys_app = typer.Typer(help="The unit's signing key.", no_args_is_help=True)
agent_app = typer.Typer(help="The on-site agent service.", no_args_is_help=True)
cs_app = typer.Typer(help="The control-site service.", no_args_is_help=True)

STATE_DIR = typer.Option(
    Path(os.environ.get("BEDSIDE_STATE_DIR", ".bedside")),
    "--state-dir",
    help="the unit's state folder (journal, keys)",
)
CS_STATE = typer.Option(
    Path(os.environ.get("BEDSIDE_CONTROL_SITE_DIR", ".bedside-control-site")),
    "--state-dir",
    help="the control site's state folder (API token)",
)


@keys_app.command("init")
def keys_init(
    state_dir: Path = STATE_DIR,
    force: bool = typer.Option(
        False, "--force", help="replace an existing key (orphans the enrolment)"
    ),
) -> None:
    """Create the unit's Ed25519 key (0600) and print its public key for enrolment."""
    from agent.keys import init_unit_key
    from agent.records import JournalError

    try:
        key, public = init_unit_key(state_dir, force=force)
    except JournalError as exc:
        fail(str(exc))
    typer.echo(
        json.dumps({"state_dir": str(state_dir), "key_id": key.key_id, "public_key": public})
    )


def verify(
    path: Path,
    public_key: str = typer.Option(None, "--public-key", help="the enrolled key (base64 or hex)"),
) -> None:
    """Verify a journal or an export offline; names the first bad record and why."""
    from agent.records import JournalError
    from agent.verify import verify_path

    try:
        report = verify_path(path, public_key)
    except (JournalError, ValueError) as exc:
        fail(str(exc))
    typer.echo(
        json.dumps(
            {
                "ok": report.ok,
                "records": report.count,
                "first_bad": report.first_bad,
                "reason": report.reason,
                "unit": report.unit,
                "head_seq": report.head_seq,
                "checkpoints": report.checkpoints,
                "unsealed": report.unsealed,
                "signatures_checked": report.signatures_checked,
            }
        )
    )
    if not report.ok:
        raise typer.Exit(1)


@agent_app.command("run")
def agent_run(
    config: Path = typer.Option(
        None, "--config", help="unit configuration (default: the simulated unit)"
    ),
    state_dir: Path = STATE_DIR,
    control_site: str = typer.Option(
        None, "--control-site", help="control-site URL, e.g. https://cs.example:8443"
    ),
    ca: str = typer.Option(None, "--ca", help="CA or self-signed certificate of the control site"),
    api_port: int = typer.Option(8780, "--api-port", help="port of the local API (127.0.0.1)"),
    speed: float = typer.Option(
        1.0, "--speed", help="clock speed (simulated seconds per wall second)"
    ),
    retention_days: float = typer.Option(
        30.0, "--retention-days", help="prune acknowledged records older than this many days"
    ),
    low_disk_mib: float = typer.Option(
        256.0, "--low-disk-mib", help="raise the low_disk alarm below this much free space"
    ),
    recipes: Path = typer.Option(
        None, "--recipes", help="the recipe store runs start from (default: STATE_DIR/recipes)"
    ),
) -> None:
    """Run the agent: record every configured tag into the journal and forward it.
    SIGTERM or Ctrl-C stops it cleanly (journal flushed, signed and closed; exit 0)."""
    from agent.records import JournalError
    from agent.service import AgentService, AgentSettings, run_until_signalled
    from drivers.clock import ScaledClock, SystemClock

    if not speed > 0:
        fail(f"--speed must be positive, not {speed}")
    if not retention_days > 0:
        fail(f"--retention-days must be positive, not {retention_days}")
    cfg = load_config_or_exit(config)
    if not (state_dir / "unit.key").exists():
        fail(f"no unit key in {state_dir}; run `bedside keys init --state-dir {state_dir}` first")
    clock = SystemClock() if speed == 1 else ScaledClock(speed)
    service = AgentService(
        cfg,
        clock,
        AgentSettings(
            state_dir=state_dir,
            control_site_url=control_site,
            control_site_ca=ca,
            api_port=api_port,
            retention_seconds=retention_days * 86400.0,
            low_disk_bytes=int(low_disk_mib * 2**20),
            recipes_dir=recipes,
        ),
    )
    try:
        run_async(run_until_signalled(service))
    except (OSError, JournalError) as exc:
        fail(str(exc))


def status(
    api: str = typer.Option(
        os.environ.get("BEDSIDE_API", "http://127.0.0.1:8780"),
        "--api",
        help="the agent's local API",
    ),
) -> None:
    """Show the running agent's journal, uplink (link, backlog, last acked seq) and devices."""
    try:
        r = httpx.get(f"{api}/api/v1/status", timeout=5)
    except httpx.HTTPError as exc:
        fail(f"no agent answers at {api}: {exc}")
    typer.echo(json.dumps(r.json(), indent=2))


@cs_app.command("init")
def cs_init(state_dir: Path = CS_STATE, force: bool = typer.Option(False, "--force")) -> None:
    """Create the control site's state folder and its API token (0600)."""
    from controlsite.service import init_state

    token = init_state(state_dir, force=force)
    typer.echo(
        json.dumps(
            {
                "state_dir": str(state_dir),
                "api_token_file": str(state_dir / "api-token"),
                "api_token": token,
            }
        )
    )


@cs_app.command("serve")
def cs_serve(
    db: str = typer.Option("controlsite.db", "--db", help="SQLite path or postgresql:// URL"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8443, "--port"),
    tls_cert: str = typer.Option(None, "--tls-cert"),
    tls_key: str = typer.Option(None, "--tls-key"),
    state_dir: Path = CS_STATE,
) -> None:
    """Serve ingest and queries (HTTPS when a certificate and key are given)."""
    from controlsite.service import serve

    try:
        serve(db, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, state_dir=state_dir)
    except Exception as exc:
        fail(str(exc))


@cs_app.command("enroll")
def cs_enroll(
    unit: str,
    pubkey: str,
    db: str = typer.Option("controlsite.db", "--db", help="SQLite path or postgresql:// URL"),
) -> None:
    """Register a unit and its public key."""
    from controlsite.enroll import enroll

    try:
        typer.echo(json.dumps(enroll(db, unit, pubkey)))
    except Exception as exc:
        fail(str(exc))
