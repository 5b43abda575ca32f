"""Stopping an asyncua server without leaving its clients' sessions running.

When a client's connection drops while it holds subscriptions, asyncua 2.1 keeps the session
(OPC UA Part 4 §6.7: the client may reactivate it on a new channel) together with its timeout
watchdog and one publishing task per subscription. ``Server.stop()`` closes the connections but
not those sessions, so their tasks outlive the server until the session timeout (an hour for
asyncua's own client). A simulated device that stops or restarts loses its sessions, as a real
one would: the simulators stop through ``stop_server`` and restart through
``close_lingering_sessions``.
"""

from __future__ import annotations

import structlog
from asyncua import Server

log = structlog.get_logger(__name__)


async def close_lingering_sessions(server: Server) -> int:
    """Close every client session the server still holds (and delete its subscriptions).

    Returns how many were closed. Call it once the connections are gone (after
    ``server.stop()`` or ``server.bserver.stop()``); asyncua 2.1 has no public accessor for
    the sessions, hence ``iserver._external_sessions``.
    """
    sessions = list(server.iserver._external_sessions.values())
    for session in sessions:
        await session.close_session(True)
    if sessions:
        log.debug("opcua_sessions_closed", count=len(sessions))
    return len(sessions)


async def stop_server(server: Server) -> None:
    """Stop an asyncua server and close the client sessions it would leave running."""
    await server.stop()
    await close_lingering_sessions(server)
