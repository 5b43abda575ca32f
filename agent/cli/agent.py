"""``bedside keys``, ``agent``, ``status`` and ``control-site`` commands."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import typer

from agent.cli.common import fail, load_config_or_exit, run_async

keys_app = typer.Typer(help="The unit's signing key.", no_args_is_help=True)
agent_app = typer.Typer(help="The on-site agent service.", no_args_is_help=True)
cs_app = typer.Typer(help="The control-site service.", no_args_is_help=True)
token_app = typer.Typer(help="The control site's query-API tokens.", no_args_is_help=True)
cs_app.add_typer(token_app, name="token")

STATE_DIR = typer.Option(
    Path(os.environ.get("BEDSIDE_STATE_DIR", ".bedside")),
    "--state-dir",
    help="the unit's state folder (journal, keys)",
)
CS_STATE = typer.Option(
    Path(os.environ.get("BEDSIDE_CONTROL_SITE_DIR", ".bedside-control-site")),
    "--state-dir",
    help="the control site's state folder (the admin API token file)",
)


@keys_app.command("init")
def keys_init(
    state_dir: Path = STATE_DIR,
    force: bool = typer.Option(
        False, "--force", help="replace an existing key (orphans the enrolment)"
    ),
) -> None:
    """Create the unit's Ed25519 key (0600) and print its public key for enrolment."""
    from agent.record.format import JournalError
    from agent.record.keys import init_unit_key

    try:
        key, public = init_unit_key(state_dir, force=force)
    except JournalError as exc:
        fail(str(exc))
    typer.echo(
        json.dumps({"state_dir": str(state_dir), "key_id": key.key_id, "public_key": public})
    )


@keys_app.command("rotate")
def keys_rotate(
    state_dir: Path = STATE_DIR,
    reason: str = typer.Option("key rotation", "--reason", help="why (signed into the journal)"),
) -> None:
    """Replace the unit key of the stopped agent without breaking its chain: the journal records
    a rotation signed by the old and the new key. The control site does not follow it yet: its
    enrolment must be updated before the uplink is accepted again."""
    from agent.journal.rotation import rotate_unit_key
    from agent.record.format import JournalError

    try:
        done = rotate_unit_key(state_dir, reason)
    except JournalError as exc:
        fail(str(exc))
    typer.echo(
        json.dumps(
            {
                "state_dir": str(state_dir),
                "old_key_id": done.old_key_id,
                "key_id": done.new_key_id,
                "public_key": done.public_key,
                "rotation_seq": done.seq,
                "resumed": done.resumed,
            }
        )
    )


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
    from agent.record.format import JournalError
    from agent.runtime.service import AgentService, AgentSettings, run_until_signalled
    from agent.uplink import UplinkURLError, check_control_site_url
    from drivers.clock import ScaledClock, SystemClock

    if control_site is not None:  # first of all: nothing connects anywhere before this
        try:
            control_site = check_control_site_url(control_site)
        except UplinkURLError as exc:
            fail(str(exc))
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


CS_DB = typer.Option("controlsite.db", "--db", help="SQLite path or postgresql:// URL")


def _cs_store(db: str) -> Any:
    """The control-site store at ``db``, or a clear error."""
    from controlsite.store.base import ControlSiteError, open_store

    try:
        return open_store(db)
    except ControlSiteError as exc:
        fail(str(exc))


def _now() -> datetime:
    return datetime.now(UTC)


@cs_app.command("init")
def cs_init(
    state_dir: Path = CS_STATE,
    db: str = CS_DB,
    force: bool = typer.Option(False, "--force", help="replace (and revoke) the admin token"),
) -> None:
    """Create the database and an admin API token, written to <state dir>/api-token (0600)."""
    from controlsite.store.base import ControlSiteError
    from controlsite.tokens import TOKEN_FILE, init_state

    store = _cs_store(db)
    try:
        token = init_state(state_dir, store, now=_now(), force=force)
    except ControlSiteError as exc:
        fail(str(exc))
    finally:
        store.close()
    typer.echo(
        json.dumps(
            {
                "state_dir": str(state_dir),
                "db": db,
                "api_token_file": str(state_dir / TOKEN_FILE),
                "token_id": token.id,
                "user": token.user,
            }
        )
    )


@cs_app.command("serve")
def cs_serve(
    db: str = CS_DB,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8443, "--port"),
    tls_cert: str = typer.Option(None, "--tls-cert"),
    tls_key: str = typer.Option(None, "--tls-key"),
    insecure: bool = typer.Option(
        False, "--insecure", help="allow plain HTTP on a non-loopback address"
    ),
) -> None:
    """Serve ingest and queries: HTTPS when a certificate and key are given; plain HTTP only
    on loopback, unless --insecure."""
    from controlsite.service import serve

    try:
        serve(db, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, insecure=insecure)
    except Exception as exc:
        fail(str(exc))


@cs_app.command("enroll")
def cs_enroll(unit: str, pubkey: str, db: str = CS_DB) -> None:
    """Register a unit and its public key."""
    from controlsite.enroll import enroll

    try:
        typer.echo(json.dumps(enroll(db, unit, pubkey)))
    except Exception as exc:
        fail(str(exc))


@token_app.command("create")
def cs_token_create(
    user: str = typer.Option(..., "--user", help="who the token is for"),
    expires_days: int = typer.Option(None, "--expires-days", help="valid for N days"),
    db: str = CS_DB,
) -> None:
    """Create a query-API token; its secret is printed this once and never again."""
    from controlsite.store.base import ControlSiteError
    from controlsite.tokens import issue

    store = _cs_store(db)
    try:
        issued = issue(store, user, now=_now(), expires_days=expires_days)
    except ControlSiteError as exc:
        fail(str(exc))
    finally:
        store.close()
    typer.echo(json.dumps({**issued.token.as_dict(), "token": issued.secret}))


@token_app.command("list")
def cs_token_list(db: str = CS_DB) -> None:
    """List the tokens: id, user, created, expires, revoked (never a secret)."""
    from controlsite.store.base import ControlSiteError

    store = _cs_store(db)
    try:
        tokens = store.tokens()
    except ControlSiteError as exc:
        fail(str(exc))
    finally:
        store.close()
    typer.echo(json.dumps({"tokens": [t.as_dict() for t in tokens]}))


@token_app.command("revoke")
def cs_token_revoke(token_id: str, db: str = CS_DB) -> None:
    """Revoke a token by its id: it is refused from the next request on."""
    from controlsite.store.base import ControlSiteError
    from controlsite.tokens import revoke

    store = _cs_store(db)
    try:
        token = revoke(store, token_id, _now())
    except ControlSiteError as exc:
        fail(str(exc))
    finally:
        store.close()
    typer.echo(json.dumps(token.as_dict()))
