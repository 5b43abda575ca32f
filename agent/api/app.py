"""The agent's local API (127.0.0.1): status, runs, prompts and alarms.

Every request that changes state carries HTTP Basic credentials of a user of this unit,
checked by the authenticator (lockout after repeated failures) and authorised for its action
*before* its body is read: a caller who may not do something learns nothing from validation.
Signatures carry each signer's password again in the body. Every refusal (401, 403) is
journaled as an ``audit`` record ``request_refused`` (who tried, what, from where, why), at
most ``REFUSALS_PER_MINUTE`` a minute so that a flood cannot fill the journal (the next record
says how many were left out). Bodies are checked field by field (``agent.api.bodies``) before
anything reaches the engine or the journal. ``GET /api/v1/run`` shows the run parameters
(patient identifiers such as the COI and donation id) only to a signed-in user with
``run.view``; anonymous callers see them redacted.

::

    GET  /api/v1/status                       agent, journal, uplink, devices
    GET  /api/v1/run                          the current run (state, allowed commands, prompts)
    POST /api/v1/run/start      {recipe, params?, bind?, why?}   recipe: a name in the store
    POST /api/v1/run/command    {command, why?}              hold, restart, pause, resume ...
    POST /api/v1/run/answer     {phase, inputs?, signatures?: [{meaning, user, password}]}
    GET  /api/v1/alarms
    POST /api/v1/alarms/ack     {alarm, reason}
    POST /api/v1/alarms/shelve  {alarm, reason, minutes?}

Errors answer JSON ``{"error": ..., "problems": [...]}`` (each problem names its field): 400
bad request, 401 not authenticated, 403 not authorised, 404 no such recipe, 409 refused in this
state, 413 body too large, 422 invalid recipe, binding, parameters or answer. Nothing else
escapes: an unexpected error answers 500 with a reference to the agent's log, never a
traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.alarms.manager import AlarmError
from agent.api.bodies import (
    COMMANDS,
    MAX_BODY,
    MAX_PASSWORD,
    AckBody,
    AnswerBody,
    BodyInvalid,
    CommandBody,
    ShelveBody,
    StartBody,
    decode,
    parse,
    validate,
)
from agent.auth.authenticator import (
    Action,
    AuthError,
    NotAuthorized,
    action_for_command,
    authorize,
    can,
)
from agent.auth.users import User, escaped_name
from agent.engine.prompts import PromptRejected
from agent.engine.runs import RunManager, RunRefused
from agent.engine.states import CommandRefused
from agent.recipe.loader import BindError, ParameterError
from agent.recipe.store import RecipeNotFound, RecipeStore, RecipeStoreError
from agent.record.format import Kind
from agent.text.yamlsource import DocumentError

log = structlog.get_logger(__name__)

Handler = Callable[[Request], Awaitable[JSONResponse]]
AuditSink = Callable[[str, dict[str, Any]], Awaitable[object]]

REFUSALS_PER_MINUTE = 30
REDACTED = "(redacted: sign in with run.view to see)"


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


class Refusals:
    """Journals refused requests as audit records, at most ``limit`` a ``window`` (seconds
    of the event loop's monotonic clock: a rate, not process time)."""

    def __init__(
        self, sink: AuditSink | None, limit: int = REFUSALS_PER_MINUTE, window: float = 60.0
    ) -> None:
        self.sink, self.limit, self.window = sink, limit, window
        self._start, self._count, self._left_out = 0.0, 0, 0

    async def __call__(
        self, request: Request, status: int, reason: str, who: str | None, **what: Any
    ) -> None:
        client = request.client
        body: dict[str, Any] = {
            "action": "request_refused",
            "status": status,
            "request": f"{request.method} {request.url.path}",
            "from": f"{client.host}:{client.port}" if client else "unknown",
            "who": None if who is None else escaped_name(who),
            "reason": reason[:300],
            **what,
        }
        log.warning("request_refused", **{k: v for k, v in body.items() if k != "action"})
        if self.sink is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        if self._count >= self.limit:
            self._left_out += 1
            return
        self._count += 1
        if self._left_out:
            body["refusals_left_out_before"], self._left_out = self._left_out, 0
        try:
            await self.sink(Kind.AUDIT, body)
        except Exception as exc:  # a full disk must not turn a refusal into a 500
            log.error("request_refused_not_journaled", error=str(exc))


def create_api(
    status: Callable[[], dict[str, Any]],
    runs: RunManager | None,
    authenticator: Any,
    *,
    recipes: RecipeStore | None = None,
    audit: AuditSink | None = None,
) -> Starlette:
    """The ASGI app of the local API; ``audit`` journals refusals (``journal.append``)."""
    refused = Refusals(audit)

    async def refuse(
        request: Request, status: int, error: str, who: str | None, **what: Any
    ) -> ApiError:
        await refused(request, status, error, who, **what)
        return ApiError(status, error)

    async def identify(request: Request, *, optional: bool = False) -> User | None:
        """The signed-in user (401, journaled, if the credentials do not sign in)."""
        header = request.headers.get("authorization")
        if header is None and optional:
            return None
        if authenticator is None:
            raise await refuse(
                request, 401, "this agent has no users: run `bedside users add` first", None
            )
        if not header or not header.startswith("Basic "):
            raise await refuse(
                request, 401, "credentials needed (HTTP Basic: user and password)", None
            )
        try:
            name, sep, password = (
                base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise await refuse(request, 401, "malformed credentials", None) from None
        if not sep or len(password) > MAX_PASSWORD:
            raise await refuse(request, 401, "malformed credentials", name)
        try:
            user: User = await authenticator.authenticate(name, password)
        except AuthError as exc:
            raise await refuse(request, 401, str(exc), name) from None
        return user

    async def allowed(request: Request, who: User, action: Action, **what: Any) -> None:
        try:
            authorize(who, action)
        except NotAuthorized as exc:
            error = str(exc)
            raise await refuse(request, 403, error, who.name, needs=str(action), **what) from None

    async def user(request: Request, action: Action) -> User:
        who = await identify(request)
        assert who is not None
        await allowed(request, who, action)
        return who

    async def raw_body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, "body too large", [f"body: {length} bytes; at most {MAX_BODY}"])
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, "body too large", [f"body: more than {MAX_BODY} bytes"])
        return bytes(data)

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
            except BodyInvalid as exc:
                return JSONResponse({"error": "bad request", "problems": exc.problems}, exc.status)
            except RecipeNotFound as exc:
                return JSONResponse({"error": str(exc), "problems": [f"recipe: {exc}"]}, 404)
            except RecipeStoreError as exc:
                return JSONResponse({"error": str(exc), "problems": [f"recipe: {exc}"]}, 422)
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
            except Exception:  # the log has the traceback; the caller gets a reference
                ref = secrets.token_hex(4)
                log.exception("api_error", ref=ref, path=request.url.path)
                return JSONResponse(
                    {"error": f"internal error (see the agent's log, ref {ref})", "problems": []},
                    500,
                )

        return wrapper

    @guarded
    async def get_status(_: Request) -> JSONResponse:
        return JSONResponse(status())

    @guarded
    async def get_run(request: Request) -> JSONResponse:
        who = await identify(request, optional=True)
        if who is not None:
            await allowed(request, who, Action.RUN_VIEW)
        if runs is None or runs.engine is None:
            return JSONResponse({"state": "Idle", "run": None})
        view = _view(runs.engine.status())
        if who is None:  # parameters carry patient identifiers (COI, donation id)
            view["params"] = dict.fromkeys(view.get("params") or {}, REDACTED)
            view["redacted"] = ["params"]
        return JSONResponse(view)

    @guarded
    async def start(request: Request) -> JSONResponse:
        who = await user(request, Action.RUN_START)
        body = parse(await raw_body(request), StartBody)
        if runs is None or recipes is None:
            raise ApiError(409, "this agent cannot start runs (no run manager or recipe store)")
        stored = await asyncio.to_thread(recipes.read, body.recipe)
        eng = await runs.start(
            stored, dict(body.params), who=who.name, why=body.why, overrides=dict(body.bind)
        )
        return JSONResponse({"run": eng.run, "state": eng.sm.state.value})

    @guarded
    async def command(request: Request) -> JSONResponse:
        who = await identify(request)
        assert who is not None
        if not any(can(who, action_for_command(c)) for c in COMMANDS):
            await allowed(request, who, Action.RUN_HOLD)  # the least command: refused, journaled
        data = decode(await raw_body(request))
        name = data.get("command")
        if isinstance(name, str) and name in COMMANDS:  # authorised before the rest is checked
            await allowed(request, who, action_for_command(name), command=name)
        body = validate(data, CommandBody)
        state = await engine().command(body.command, who=who.name, why=body.why)
        return JSONResponse({"state": state.value})

    @guarded
    async def answer(request: Request) -> JSONResponse:
        who = await user(request, Action.PROMPT_ANSWER)
        body = parse(await raw_body(request), AnswerBody)
        accepted = await engine().prompts.answer(
            body.phase,
            dict(body.inputs),
            [s.model_dump() for s in body.signatures],
            who.name,
        )
        return JSONResponse({"accepted": accepted})

    @guarded
    async def alarms(_: Request) -> JSONResponse:
        return JSONResponse({"alarms": _view(engine().alarms.active())})

    @guarded
    async def ack(request: Request) -> JSONResponse:
        who = await user(request, Action.ALARM_ACKNOWLEDGE)
        body = parse(await raw_body(request), AckBody)
        view = await engine().alarms.acknowledge(body.alarm, who.name, body.reason)
        return JSONResponse(_view(view))

    @guarded
    async def shelve(request: Request) -> JSONResponse:
        who = await user(request, Action.ALARM_SHELVE)
        body = parse(await raw_body(request), ShelveBody)
        view = await engine().alarms.shelve(body.alarm, who.name, body.reason, body.minutes * 60)
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
