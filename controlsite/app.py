"""The control site's HTTP API (Starlette).

::

    POST /api/v1/ingest                       a unit's signed batch -> {"ack": seq}
    GET  /api/v1/units                        enrolled units and their heads
    GET  /api/v1/units/{unit}/records         ?run=&kind=&after=&limit= (limit <= 1000)
    GET  /api/v1/units/{unit}/latest          the last value of every tag
    GET  /api/v1/units/{unit}/alarms          tamper alarms, newest first

Ingest is authenticated by the unit's request signature (``controlsite.ingest``); every GET
needs ``Authorization: Bearer <api token>`` (the token ``bedside control-site init`` wrote;
without a configured token the queries answer 401). Errors are JSON
``{"error": code, "reason": text, ...}``. Store calls are synchronous and run in worker
threads, so a slow database never stalls the event loop.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.records import Kind
from controlsite.ingest import MAX_BODY_BYTES, Ingestor, IngestRequest, Refused
from controlsite.store import ControlSiteError, Store, StoreError

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
    api_token: str | None,
    now: Callable[[], datetime] | None = None,
    max_skew: float | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The ASGI app over ``store``. ``now`` stamps alarms (default: the system's UTC time);
    ``max_skew`` refuses requests whose signed time is further off than that many seconds."""
    ingestor = Ingestor(store, now=now or (lambda: datetime.now(UTC)), max_skew=max_skew)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return (
            api_token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), api_token.encode())
        )

    def query(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not authorized(request):
                return _error(401, "unauthorized", "a valid bearer API token is required")
            return await handler(request)

        return guarded

    async def known_unit(request: Request) -> str:
        unit = request.path_params["unit"]
        if await anyio.to_thread.run_sync(store.unit, unit) is None:
            raise Refused(404, "unknown_unit", f"unit {unit!r} is not enrolled")
        return str(unit)

    async def ingest(request: Request) -> Response:
        h = request.headers
        declared = h.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise Refused(413, "too_large", f"body of {declared} bytes exceeds {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise Refused(413, "too_large", f"body exceeds {max_body_bytes} bytes")
        missing = [
            name
            for name in ("bedside-unit", "bedside-time", "bedside-nonce", "bedside-signature")
            if not h.get(name)
        ]
        if missing:
            raise Refused(400, "bad_request", f"missing header(s) {', '.join(missing)}")
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
        unit = request.path_params["unit"]  # alarms exist for units that failed to enrol, too
        limit = _int_param(request, "limit", 100, 1, 1000)
        found = await anyio.to_thread.run_sync(store.alarms, unit, limit)
        return JSONResponse({"unit": unit, "alarms": [a.as_dict() for a in found]})

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return JSONResponse(exc.as_dict(), status_code=exc.status)

    async def store_failed(request: Request, exc: Exception) -> Response:
        log.error("store_failed", path=request.url.path, error=str(exc))
        return _error(503, "store_unavailable", str(exc), retry=True)

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
