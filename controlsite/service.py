"""Running the control site: the uvicorn server, and the rule that keeps it off plain HTTP.

``serve(...)`` runs the service until interrupted (the ``bedside control-site serve``
command); ``ControlSiteServer`` runs it inside an existing event loop (the demo, tests,
benchmarks)::

    async with ControlSiteServer(store, port=port) as site:
        ...  # site.url is e.g. "http://127.0.0.1:8443"

The queries need a token of the store (``controlsite.tokens``). The service binds 127.0.0.1
unless told otherwise and speaks HTTPS when given a certificate and key (PEM files); plain HTTP
on any address but loopback is refused unless ``insecure`` (``check_transport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
import uvicorn

from controlsite.app import create_app
from controlsite.store.base import ControlSiteError, Store, open_store

log = structlog.get_logger(__name__)

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``; a wildcard
    (0.0.0.0, ::) or any other name is not."""
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(host: str, port: int, *, tls: bool, insecure: bool) -> None:
    """Refuse plain HTTP on an address other hosts can reach, unless ``insecure``: tokens and
    patients' records would cross the network in clear text."""
    if tls or insecure or is_loopback(host):
        return
    raise ControlSiteError(
        f"refusing to serve plain HTTP on {host}:{port}: API tokens and records would cross "
        "the network unencrypted; give --tls-cert and --tls-key, or --insecure to accept that "
        "(e.g. behind a TLS proxy on the same machine)"
    )


def _config(
    store: Store,
    *,
    host: str,
    port: int,
    tls_cert: str | Path | None,
    tls_key: str | Path | None,
    insecure: bool,
    max_skew: float | None,
) -> uvicorn.Config:
    if (tls_cert is None) != (tls_key is None):
        raise ControlSiteError("HTTPS needs both a certificate and its key")
    check_transport(host, port, tls=tls_cert is not None, insecure=insecure)
    app = create_app(store, max_skew=max_skew)
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
        host: str = "127.0.0.1",
        port: int = 8443,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        insecure: bool = False,
        max_skew: float | None = None,
    ) -> None:
        config = _config(
            store,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            insecure=insecure,
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
    insecure: bool = False,
    max_skew: float | None = None,
) -> None:
    """Serve the control site on ``db_url`` until interrupted; refuses plain HTTP off loopback
    unless ``insecure`` (checked before the database is opened or a port bound)."""
    if (tls_cert is None) != (tls_key is None):
        raise ControlSiteError("HTTPS needs both --tls-cert and --tls-key")
    check_transport(host, port, tls=tls_cert is not None, insecure=insecure)
    store = open_store(db_url)
    try:
        config = _config(
            store,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            insecure=insecure,
            max_skew=max_skew,
        )
        if not store.tokens():
            log.warning("control_site_no_tokens", hint="`bedside control-site token create`")
        if insecure and tls_cert is None and not is_loopback(host):
            log.warning("control_site_plain_http", host=host, port=port)
        log.info("control_site_serving", host=host, port=port, tls=tls_cert is not None)
        uvicorn.Server(config).run()
    finally:
        store.close()
