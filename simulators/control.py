"""The simulators' control endpoint: inject and clear faults while the unit runs.

A small HTTP API on 127.0.0.1 (``bedside sim`` prints its address). Every request needs the
bearer token that ``bedside sim`` writes to ``control.token`` (mode 0600) in its run folder, so
that nothing on the machine changes the simulated process without the engineer who started it.

- ``GET  /faults``            every fault flag of every simulator, as JSON
- ``POST /faults``            ``{"target": "bioreactor", "field": "heater_failed", "value": true}``
- ``POST /actions``           ``{"action": "bioreactor.restart"}`` (see ``GET /actions``)
- ``GET  /state``             the simulated process as the physics sees it (true values)

A bad request is answered 400 with a message naming what is wrong; nothing is changed. Values
are JSON of the field's type: sets as lists (``"stuck_sensors"``: ``["ph"]``), dicts as objects
(``"exception_code"``: ``{"1": 4}``, keys of int-keyed fields as decimal text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Action = Callable[[], Awaitable[Any]]


class BadRequest(Exception):
    """A control request that cannot be carried out; the message says why."""


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` (decoded JSON) as the type ``hint``; ``TypeError`` or ``ValueError`` if not.

    JSON has no sets and only text keys: a set field takes a list, and a dict field with int
    keys takes ``{"1": ...}`` as ``{1: ...}``.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for arm in args:
            with contextlib.suppress(TypeError, ValueError):
                return _coerce(arm, value)
        raise TypeError(value)
    if hint is type(None):
        if value is not None:
            raise TypeError(value)
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(value)
        if hint is int and not float(value).is_integer():
            raise ValueError(value)
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if origin is set:
        if not isinstance(value, list):
            raise TypeError(value)
        return {_coerce(args[0], item) for item in value}
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        key_type, value_type = args
        out = {}
        for key, item in value.items():
            if key_type is int and isinstance(key, str):
                key = int(key)  # JSON object keys are text
            out[_coerce(key_type, key)] = _coerce(value_type, item)
        return out
    raise TypeError(f"no JSON form for {hint!r}")


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def set_fault(targets: dict[str, Any], target: str, field: str, value: Any) -> Any:
    """Set one fault field, coercing the JSON value to the field's type; returns the new value.

    ``BadRequest`` (and nothing changed) for an unknown target or field or a value that is not
    of the field's type (sets are given as JSON lists).
    """
    if target not in targets:
        raise BadRequest(f"unknown target {target!r}; targets: {', '.join(sorted(targets))}")
    obj = targets[target]
    names = {f.name for f in dataclasses.fields(obj)}
    if field not in names:
        raise BadRequest(f"{target} has no fault {field!r}; faults: {', '.join(sorted(names))}")
    hint = typing.get_type_hints(type(obj))[field]
    try:
        new = _coerce(hint, value)
    except (TypeError, ValueError):
        raise BadRequest(f"{target}.{field} takes a {_type_name(hint)}, not {value!r}") from None
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
            if not isinstance(name, str) or name not in actions:
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
