"""The simulators' control endpoint: inject and clear faults while the unit runs.

A small HTTP API on 127.0.0.1 (``bedside sim`` prints its address). Every request needs the
bearer token that ``bedside sim`` writes to ``control.token`` (mode 0600) in its run folder, so
that nothing on the machine changes the simulated process without the engineer who started it.

- ``GET  /faults``            every fault flag of every simulator, as JSON
- ``POST /faults``            ``{"target": "bioreactor", "field": "heater_failed", "value": true}``
- ``POST /actions``           ``{"action": "bioreactor.restart"}`` (see ``GET /actions``)
- ``GET  /state``             the simulated process as the physics sees it (true values)

A bad request is answered 400 with a message naming what is wrong; nothing is changed.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Action = Callable[[], Awaitable[Any]]


class BadRequest(Exception):
    """A control request that cannot be carried out; the message says why."""


def set_fault(targets: dict[str, Any], target: str, field: str, value: Any) -> Any:
    """Set one fault field, coercing the JSON value to the field's type; returns the new value."""
    if target not in targets:
        raise BadRequest(f"unknown target {target!r}; targets: {', '.join(sorted(targets))}")
    obj = targets[target]
    names = {f.name for f in dataclasses.fields(obj)}
    if field not in names:
        raise BadRequest(f"{target} has no fault {field!r}; faults: {', '.join(sorted(names))}")
    current = getattr(obj, field)
    try:
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise TypeError
            new: Any = value
        elif isinstance(current, int | float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            new = type(current)(value)
        elif isinstance(current, set):
            new = set(value)
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise TypeError
            new = dict(value)
        elif current is None or isinstance(current, str):
            new = value
        else:
            raise TypeError
    except (TypeError, ValueError):
        raise BadRequest(
            f"{target}.{field} takes a {type(current).__name__}, not {value!r}"
        ) from None
    setattr(obj, field, new)
    return new


def describe(obj: Any) -> dict[str, Any]:
    """A JSON-ready view of a fault dataclass."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = sorted(v) if isinstance(v, set) else v
    return out


def control_app(
    token: str,
    targets: dict[str, Any],
    actions: dict[str, Action],
    state: Callable[[], dict[str, Any]],
) -> Starlette:
    """The ASGI app of the control endpoint."""

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def refuse() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong bearer token (see control.token)"}, 401)

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    async def get_faults(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse()
        return JSONResponse({name: describe(obj) for name, obj in targets.items()})

    async def post_faults(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse()
        try:
            data = await body(request)
            missing = [k for k in ("target", "field", "value") if k not in data]
            if missing:
                raise BadRequest(f"missing {', '.join(missing)}")
            new = set_fault(targets, str(data["target"]), str(data["field"]), data["value"])
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, 400)
        value = sorted(new) if isinstance(new, set) else new
        return JSONResponse({"target": data["target"], "field": data["field"], "value": value})

    async def list_actions(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse()
        return JSONResponse({"actions": sorted(actions)})

    async def post_action(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse()
        try:
            data = await body(request)
            name = data.get("action")
            if name not in actions:
                raise BadRequest(f"unknown action {name!r}; actions: {', '.join(sorted(actions))}")
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, 400)
        result = await actions[name]()
        return JSONResponse({"action": name, "result": result})

    async def get_state(request: Request) -> JSONResponse:
        if not authorised(request):
            return refuse()
        return JSONResponse(state())

    return Starlette(
        routes=[
            Route("/faults", get_faults, methods=["GET"]),
            Route("/faults", post_faults, methods=["POST"]),
            Route("/actions", list_actions, methods=["GET"]),
            Route("/actions", post_action, methods=["POST"]),
            Route("/state", get_state, methods=["GET"]),
        ]
    )
