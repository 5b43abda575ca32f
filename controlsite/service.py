"""Running the control site: state directory, API token, and the uvicorn server.

``init_state(state_dir)`` writes a random API token to ``<state_dir>/api-token`` (mode 0600);
the queries of the API need it as ``Authorization: Bearer <token>``. ``serve(...)`` runs the
service until interrupted (the ``bedside control-site serve`` command);
``ControlSiteServer`` runs it inside an existing event loop (the demo, tests, benchmarks)::

    async with ControlSiteServer(store, api_token=token, port=port) as site:
        ...  # site.url is e.g. "http://127.0.0.1:8443"

The service binds 127.0.0.1 unless told otherwise and speaks HTTPS when given a certificate
and key (PEM files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
import uvicorn

from controlsite.app import create_app
from controlsite.store import ControlSiteError, Store, open_store

log = structlog.get_logger(__name__)

TOKEN_FILE = "api-token"


def init_state(state_dir: str | Path, *, force: bool = False) -> str:
    """Create ``state_dir`` and write a new random API token into it (0600); returns the token.
    Refuses to replace an existing token unless ``force`` (clients would lose access)."""
    state = Path(state_dir)
    path = state / TOKEN_FILE
    if path.exists() and not force:
        raise ControlSiteError(f"{path} already exists; replacing the API token needs force")
    token = secrets.token_urlsafe(32)
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(TOKEN_FILE + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ControlSiteError(f"cannot write the API token into {state}: {exc}") from exc
    return token


def load_api_token(state_dir: str | Path) -> str:
    """The API token ``init_state`` wrote; refuses a token file others can read."""
    path = Path(state_dir) / TOKEN_FILE
    try:
        if path.stat().st_mode & 0o077:
            raise ControlSiteError(f"{path} is readable by others; chmod 600 it")
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise ControlSiteError(f"no API token at {path}; run `bedside control-site init`") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlSiteError(f"cannot read the API token {path}: {exc}") from exc
    if not token:
        raise ControlSiteError(f"the API token file {path} is empty")
    return token


def _config(
    store: Store,
    *,
    api_token: str | None,
    host: str,
    port: int,
    tls_cert: str | Path | None,
    tls_key: str | Path | None,
    max_skew: float | None,
) -> uvicorn.Config:
    if (tls_cert is None) != (tls_key is None):
        raise ControlSiteError("HTTPS needs both a certificate and its key")
    app = create_app(store, api_token=api_token, max_skew=max_skew)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_config=None,  # structlog, configured at the entry point, owns logging
        access_log=False,
        server_header=False,
        lifespan="off",
    )


class ControlSiteServer:
    """The control site served by uvicorn in the running event loop (an async context manager).

    The caller owns ``store`` (open before, close after).
    """

    def __init__(
        self,
        store: Store,
        *,
        api_token: str | None,
        host: str = "127.0.0.1",
        port: int = 8443,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_skew: float | None = None,
    ) -> None:
        config = _config(
            store,
            api_token=api_token,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_skew=max_skew,
        )
        self.url = f"{'https' if tls_cert else 'http'}://{host}:{port}"
        self._host, self._port = host, port
        self._socket: socket.socket | None = None
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        # bind here: uvicorn answers a bind failure with sys.exit, which would end the loop
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((self._host, self._port))
        except OSError as exc:
            self._socket.close()
            raise ControlSiteError(f"cannot listen on {self.url}: {exc}") from exc
        serving = self._server.serve(sockets=[self._socket])
        self._task = asyncio.create_task(serving, name=f"control-site {self.url}")
        while not self._server.started:
            if self._task.done():  # failed to bind, bad certificate, ...
                await self._task
                raise ControlSiteError(f"the control site at {self.url} did not start")
            await asyncio.sleep(0.01)
        log.info("control_site_started", url=self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        finally:
            if self._socket is not None:
                self._socket.close()
        log.info("control_site_stopped", url=self.url)


def serve(
    db_url: str,
    host: str = "127.0.0.1",
    port: int = 8443,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    *,
    api_token: str | None = None,
    state_dir: str | Path | None = None,
    max_skew: float | None = None,
) -> None:
    """Serve the control site on ``db_url`` until interrupted. The API token is ``api_token``,
    else the one in ``state_dir``; without either the query endpoints answer 401."""
    if api_token is None and state_dir is not None:
        api_token = load_api_token(state_dir)
    if api_token is None:
        log.warning("control_site_no_api_token", hint="queries will answer 401")
    store = open_store(db_url)
    try:
        config = _config(
            store,
            api_token=api_token,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_skew=max_skew,
        )
        log.info("control_site_serving", host=host, port=port, tls=tls_cert is not None)
        uvicorn.Server(config).run()
    finally:
        store.close()
