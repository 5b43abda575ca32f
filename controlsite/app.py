"""The control site's HTTP API (Starlette).

::

    POST /api/v1/ingest                       a unit's signed batch -> {"ack": seq}
    GET  /api/v1/units                        enrolled units and their heads
    GET  /api/v1/units/{unit}/records         ?run=&kind=&after=&limit= (limit <= 1000)
    GET  /api/v1/units/{unit}/latest          the last value of every tag
    GET  /api/v1/units/{unit}/alarms          tamper alarms, newest first

Ingest is authenticated by the unit's request signature (``controlsite.ingest``); every GET
needs ``Authorization: Bearer <token>``, a live token of the store (``controlsite.tokens``:
per user, hashed, expiring, revocable), else it answers 401 before anything is read. Errors
are JSON ``{"error": code, "reason": text, ...}``. Store calls are synchronous and run in worker
threads, so a slow database never stalls the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.record.format import Kind
from controlsite.alarms import AlarmPolicy, clean_text
from controlsite.ingest import MAX_BODY_BYTES, Ingestor, IngestRequest, Refused
from controlsite.store.base import ControlSiteError, Store, StoreError
from controlsite.tokens import authenticate

log = structlog.get_logger(__name__)
KIND_VALUES = frozenset(k.value for k in Kind)

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, error: str, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "reason": reason, **extra}, status_code=status)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise Refused(
            400, "bad_request", f"query parameter {name}={text!r} is not an integer"
        ) from None
    if not low <= value <= high:
        raise Refused(400, "bad_request", f"query parameter {name}={value} is not in {low}..{high}")
    return value


def create_app(
    store: Store,
    *,
    now: Callable[[], datetime] | None = None,
    max_skew: float | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    alarm_policy: AlarmPolicy | None = None,
) -> Starlette:
    """The ASGI app over ``store``. ``now`` stamps alarms and checks token expiry (default: the
    system's UTC time); ``max_skew`` refuses requests whose signed time is further off than
    that many seconds; ``alarm_policy`` bounds the tamper alarms (default ``AlarmPolicy()``)."""
    clock = now or (lambda: datetime.now(UTC))
    ingestor = Ingestor(store, now=clock, max_skew=max_skew, alarms=alarm_policy)

    async def authorized(request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        token = await anyio.to_thread.run_sync(authenticate, store, presented.strip(), clock())
        if token is None:
            return False
        log.debug("query", user=token.user, token=token.id, path=request.url.path)
        return True

    def query(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not await authorized(request):
                return _error(
                    401, "unauthorized", "a valid bearer token is required (expired or revoked?)"
                )
            return await handler(request)

        return guarded

    async def known_unit(request: Request) -> str:
        unit = request.path_params["unit"]
        if await anyio.to_thread.run_sync(store.unit, unit) is None:
            raise Refused(404, "unknown_unit", f"unit {unit!r} is not enrolled")
        return str(unit)

    async def ingest(request: Request) -> Response:
        h = request.headers
        missing = [
            name
            for name in ("bedside-unit", "bedside-time", "bedside-nonce", "bedside-signature")
            if not h.get(name)
        ]
        if missing:  # before reading a byte of the body
            raise Refused(400, "bad_request", f"missing header(s) {', '.join(missing)}")
        await anyio.to_thread.run_sync(ingestor.admit, h["bedside-unit"])
        declared = h.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise Refused(413, "too_large", f"body of {declared} bytes exceeds {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise Refused(413, "too_large", f"body exceeds {max_body_bytes} bytes")
        req = IngestRequest(
            unit=h["bedside-unit"],
            time=h["bedside-time"],
            nonce=h["bedside-nonce"],
            signature=h["bedside-signature"],
            encoding=h.get("content-encoding", "").strip().lower(),
            body=bytes(body),
        )
        result = await anyio.to_thread.run_sync(ingestor.ingest, req)
        return JSONResponse(
            {"ack": result.ack, "stored": result.stored, "duplicates": result.duplicates}
        )

    async def units(request: Request) -> Response:
        found = await anyio.to_thread.run_sync(store.units)
        return JSONResponse({"units": [u.as_dict() for u in found]})

    async def records(request: Request) -> Response:
        unit = await known_unit(request)
        kind = request.query_params.get("kind")
        if kind is not None and kind not in KIND_VALUES:
            raise Refused(400, "bad_request", f"kind {kind!r} is not one of {sorted(KIND_VALUES)}")
        after = _int_param(request, "after", 0, 0, 2**62)
        limit = _int_param(request, "limit", 100, 1, 1000)
        run = request.query_params.get("run")

        def read() -> list[dict[str, Any]]:
            found = store.records(unit, after=after, limit=limit, run=run, kind=kind)
            return [{**r.fields(), "hash": r.hash_hex} for r in found]

        rows = await anyio.to_thread.run_sync(read)
        return JSONResponse(
            {"unit": unit, "records": rows, "next_after": rows[-1]["seq"] if rows else None}
        )

    async def latest(request: Request) -> Response:
        unit = await known_unit(request)
        found = await anyio.to_thread.run_sync(store.latest, unit)
        tags = {
            v.tag: {"value": v.value, "quality": v.quality, "time": v.time, "seq": v.seq}
            for v in found
        }
        return JSONResponse({"unit": unit, "tags": tags})

    async def alarms(request: Request) -> Response:
        unit = await known_unit(request)  # only enrolled units have alarms
        limit = _int_param(request, "limit", 100, 1, 1000)
        found = await anyio.to_thread.run_sync(store.alarms, unit, limit)
        return JSONResponse({"unit": unit, "alarms": [a.as_dict() for a in found]})

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return JSONResponse(exc.as_dict(), status_code=exc.status)

    async def store_failed(request: Request, exc: Exception) -> Response:
        log.error("store_failed", path=request.url.path, error=clean_text(str(exc)))
        return _error(503, "store_unavailable", clean_text(str(exc)), retry=True)

    routes = [
        Route("/api/v1/ingest", ingest, methods=["POST"]),
        Route("/api/v1/units", query(units), methods=["GET"]),
        Route("/api/v1/units/{unit}/records", query(records), methods=["GET"]),
        Route("/api/v1/units/{unit}/latest", query(latest), methods=["GET"]),
        Route("/api/v1/units/{unit}/alarms", query(alarms), methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Any]] = {
        Refused: refused,
        StoreError: store_failed,
        ControlSiteError: store_failed,
    }
    return Starlette(routes=routes, exception_handlers=handlers)
