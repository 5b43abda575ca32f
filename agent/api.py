"""The agent's local API (127.0.0.1): status, runs, prompts and alarms.

Reading needs nothing; every request that changes state carries HTTP Basic credentials of a
user of this unit, checked by the authenticator (lockout after repeated failures) and
authorised per action; signatures carry each signer's password again in the body.

::

    GET  /api/v1/status                       agent, journal, uplink, devices
    GET  /api/v1/run                          the current run (state, allowed commands, prompts)
    POST /api/v1/run/start      {recipe, params, bind?, why?}
    POST /api/v1/run/command    {command, why?}              hold, restart, pause, resume ...
    POST /api/v1/run/answer     {phase, inputs, signatures: [{meaning, user, password}]}
    GET  /api/v1/alarms
    POST /api/v1/alarms/ack     {alarm, reason}
    POST /api/v1/alarms/shelve  {alarm, reason, minutes}

Errors answer JSON ``{"error": ..., "problems": [...]}``: 400 bad request, 401 not
authenticated, 403 not authorised, 409 refused in this state, 422 invalid recipe, binding,
parameters or answer.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.alarms import AlarmError
from agent.auth import Action, AuthError, NotAuthorized, action_for_command, authorize
from agent.prompts import PromptRejected
from agent.recipe_loader import BindError, ParameterError
from agent.runs import RunManager, RunRefused
from agent.states import CommandRefused
from agent.yamlsource import DocumentError

Handler = Callable[[Request], Awaitable[JSONResponse]]


class ApiError(Exception):
    def __init__(self, status: int, error: str, problems: list[str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.problems = status, error, problems or []


def _view(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _view(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, list | tuple):
        return [_view(v) for v in obj]
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "value") and type(obj).__module__.startswith("agent"):
        return obj.value
    return obj


def create_api(
    status: Callable[[], dict[str, Any]], runs: RunManager | None, authenticator: Any
) -> Starlette:
    """The ASGI app of the local API."""

    async def user(request: Request, action: Action) -> Any:
        if authenticator is None:
            raise ApiError(401, "this agent has no users: run `bedside users add` first")
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            raise ApiError(401, "credentials needed (HTTP Basic: user and password)")
        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError(401, "malformed credentials") from None
        try:
            who = await authenticator.authenticate(name, password)
            authorize(who, action)
        except NotAuthorized as exc:
            raise ApiError(403, str(exc)) from None
        except AuthError as exc:
            raise ApiError(401, str(exc)) from None
        return who

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def engine() -> Any:
        if runs is None or runs.engine is None:
            raise ApiError(409, "no run on this unit")
        return runs.engine

    def guarded(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> JSONResponse:
            try:
                return await fn(request)
            except ApiError as exc:
                return JSONResponse({"error": exc.error, "problems": exc.problems}, exc.status)
            except (CommandRefused, RunRefused, AlarmError) as exc:
                return JSONResponse({"error": str(exc), "problems": []}, 409)
            except DocumentError as exc:
                return JSONResponse(
                    {"error": "invalid recipe", "problems": [str(p) for p in exc.problems]}, 422
                )
            except (BindError, ParameterError, PromptRejected) as exc:
                problems = list(getattr(exc, "problems", []) or [str(exc)])
                error = {
                    BindError: "the recipe does not fit this unit",
                    ParameterError: "invalid run parameters",
                    PromptRejected: "answer refused",
                }[type(exc)]
                return JSONResponse({"error": error, "problems": problems}, 422)

        return wrapper

    @guarded
    async def get_status(_: Request) -> JSONResponse:
        return JSONResponse(status())

    @guarded
    async def get_run(_: Request) -> JSONResponse:
        if runs is None or runs.engine is None:
            return JSONResponse({"state": "Idle", "run": None})
        return JSONResponse(_view(runs.engine.status()))

    @guarded
    async def start(request: Request) -> JSONResponse:
        who = await user(request, Action.RUN_START)
        data = await body(request)
        if runs is None or "recipe" not in data:
            raise ApiError(400, "give the recipe file as `recipe`")
        eng = await runs.start(
            data["recipe"],
            data.get("params") or {},
            who=who.name,
            why=str(data.get("why", "")),
            overrides=data.get("bind") or {},
        )
        return JSONResponse({"run": eng.run, "state": eng.sm.state.value})

    @guarded
    async def command(request: Request) -> JSONResponse:
        data = await body(request)
        name = str(data.get("command", ""))
        try:
            action = action_for_command(name)
        except (KeyError, ValueError):
            raise ApiError(400, f"unknown command {name!r}") from None
        who = await user(request, action)
        state = await engine().command(name, who=who.name, why=str(data.get("why", "")))
        return JSONResponse({"state": state.value})

    @guarded
    async def answer(request: Request) -> JSONResponse:
        who = await user(request, Action.PROMPT_ANSWER)
        data = await body(request)
        accepted = await engine().prompts.answer(
            str(data.get("phase", "")),
            data.get("inputs") or {},
            data.get("signatures") or [],
            who.name,
        )
        return JSONResponse({"accepted": accepted})

    @guarded
    async def alarms(_: Request) -> JSONResponse:
        return JSONResponse({"alarms": _view(engine().alarms.active())})

    @guarded
    async def ack(request: Request) -> JSONResponse:
        who = await user(request, Action.ALARM_ACKNOWLEDGE)
        data = await body(request)
        view = await engine().alarms.acknowledge(
            str(data.get("alarm")), who.name, str(data.get("reason", ""))
        )
        return JSONResponse(_view(view))

    @guarded
    async def shelve(request: Request) -> JSONResponse:
        who = await user(request, Action.ALARM_SHELVE)
        data = await body(request)
        try:
            minutes = float(data.get("minutes", 0))
        except (TypeError, ValueError):
            raise ApiError(400, "minutes must be a number") from None
        view = await engine().alarms.shelve(
            str(data.get("alarm")), who.name, str(data.get("reason", "")), minutes * 60
        )
        return JSONResponse(_view(view))

    return Starlette(
        routes=[
            Route("/api/v1/status", get_status, methods=["GET"]),
            Route("/api/v1/run", get_run, methods=["GET"]),
            Route("/api/v1/run/start", start, methods=["POST"]),
            Route("/api/v1/run/command", command, methods=["POST"]),
            Route("/api/v1/run/answer", answer, methods=["POST"]),
            Route("/api/v1/alarms", alarms, methods=["GET"]),
            Route("/api/v1/alarms/ack", ack, methods=["POST"]),
            Route("/api/v1/alarms/shelve", shelve, methods=["POST"]),
        ]
    )
