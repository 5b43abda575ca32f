"""The local API against bad input and strangers: every malformed body a 4xx naming its field,
authorisation before the body is read, refusals journaled, recipes only from the store.

System test: ``bedside agent run`` as a subprocess on a unit whose devices are not there (the
API does not need them to refuse a request), one agent for the module; every request is real
HTTP on loopback, and after each one the agent must still answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent.api.bodies import MAX_BODY, MAX_TEXT
from agent.auth.outbox import AuditOutbox
from tests.api_agent import PARAMS, PASSWORDS, RECIPE_NAME, Agent, agent_argv, prepare_state
from tests.conftest import free_port

SECRET = "TOP-SECRET-MARKER-7f3a"  # the content of a file outside the store


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent for the module (devices absent), four users, the T-cell recipe installed, a
    secret file next to its state folder and a symlink to it planted in the store."""
    root = tmp_path_factory.mktemp("api")
    state = root / "unit"
    asyncio.run(prepare_state(state))
    secret = root / "secret.yaml"
    secret.write_text(f"{SECRET}: [\n")  # not even YAML: any parse error would quote it
    (state / "recipes" / "planted.yaml").symlink_to(secret)
    (state / "recipes" / "passwd.yaml").symlink_to("/etc/passwd")
    env = {
        **os.environ,
        "BEDSIDE_SIM_OPCUA_PORT": str(free_port()),
        "BEDSIDE_SIM_CELLPROC_PORT": str(free_port()),
        "BEDSIDE_SIM_MODBUS_PORT": str(free_port()),
        "BEDSIDE_RUN_DIR": str(root / "run"),
    }
    port = free_port()
    proc = subprocess.Popen(
        agent_argv(state, port, speed=1),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    service = Agent(port, state)
    try:
        deadline = time.monotonic() + 60
        while not _up(service):
            assert proc.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not come up"
            time.sleep(0.2)
        yield service
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _up(service: Agent) -> bool:
    try:
        return httpx.get(f"{service.url}/api/v1/status", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def post(
    service: Agent, path: str, body: Any = None, *, raw: bytes | None = None, user: str | None
) -> httpx.Response:
    """POST ``body`` (as JSON) or ``raw`` bytes as ``user`` (None: no credentials)."""
    auth = (user, PASSWORDS[user]) if user else None
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(
        f"{service.url}{path}", content=content, headers=headers, auth=auth, timeout=30
    )


def _refused_cleanly(r: httpx.Response, service: Agent, status: set[int]) -> dict[str, Any]:
    assert r.status_code in status, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text and 'File "' not in r.text
    data: dict[str, Any] = r.json()
    assert _up(service), "the agent stopped answering"
    return data


# --- every POST endpoint, every kind of malformed body ---------------------------------------

ENDPOINTS = {  # path: (a user allowed to call it, a valid body)
    "/api/v1/run/start": ("alice", {"recipe": RECIPE_NAME, "params": PARAMS}),
    "/api/v1/run/command": ("bob", {"command": "hold", "why": "test"}),
    "/api/v1/run/answer": ("alice", {"phase": "scan_bag", "inputs": {"volume": 200}}),
    "/api/v1/alarms/ack": ("alice", {"alarm": "temperature_low", "reason": "seen"}),
    "/api/v1/alarms/shelve": ("bob", {"alarm": "temperature_low", "reason": "maint"}),
}
REQUIRED = {
    "/api/v1/run/start": ["recipe"],
    "/api/v1/run/command": ["command"],
    "/api/v1/run/answer": ["phase"],
    "/api/v1/alarms/ack": ["alarm", "reason"],
    "/api/v1/alarms/shelve": ["alarm", "reason"],
}
HUGE = "x" * 100_000

# (case id, raw body, the field the message must name); the same for every endpoint
WHOLE_BODY = [
    ("not-json", b"{not json", "body"),
    ("empty", b"", "body"),
    ("array", b"[1, 2]", "body"),
    ("string", b'"hello"', "body"),
    ("null", b"null", "body"),
    ("number", b"42", "body"),
    ("invalid-utf8", b'{"why": "\xff\xfe"}', "body"),
    ("deep-nesting", b"[" * 5000 + b"]" * 5000, "body"),
    ("deep-object", b'{"a":' * 200 + b"1" + b"}" * 200, "body"),
    ("huge-body", json.dumps({"why": HUGE}).encode(), "body"),
    ("huge-integer", b'{"why": ' + b"9" * 5000 + b"}", "body"),
    ("duplicate-key", b'{"why": "a", "why": "b"}', "body"),
]


def _merge(path: str, **fields: Any) -> dict[str, Any]:
    return {**ENDPOINTS[path][1], **fields}


# (endpoint, case id, body as JSON text or a dict, the field path the message must name)
FIELD_CASES: list[tuple[str, str, Any, str]] = []
for _path in ENDPOINTS:
    FIELD_CASES += [
        (_path, "extra-field", _merge(_path, colour="red"), "colour"),
        (_path, "missing-fields", {}, REQUIRED[_path][0]),
        (_path, "nested-junk-field", _merge(_path, junk={"a": [{"b": [1, {"c": None}]}]}), "junk"),
    ]
FIELD_CASES += [
    ("/api/v1/run/start", "recipe-number", {"recipe": 5}, "recipe"),
    ("/api/v1/run/start", "recipe-null", {"recipe": None}, "recipe"),
    ("/api/v1/run/start", "recipe-huge", {"recipe": HUGE[:10_000]}, "recipe"),
    ("/api/v1/run/start", "recipe-object", {"recipe": {"path": "/etc/passwd"}}, "recipe"),
    ("/api/v1/run/start", "params-list", _merge("/api/v1/run/start", params=[1]), "params"),
    (
        "/api/v1/run/start",
        "params-nested",
        _merge("/api/v1/run/start", params={"coi_id": {"a": 1}}),
        "params.coi_id",
    ),
    (
        "/api/v1/run/start",
        "params-huge",
        _merge("/api/v1/run/start", params={"coi_id": HUGE[:5000]}),
        "params.coi_id",
    ),
    (
        "/api/v1/run/start",
        "params-nan",
        '{"recipe": "tcell-selection-wash", "params": {"coi_id": NaN}}',
        "params.coi_id",
    ),
    (
        "/api/v1/run/start",
        "params-infinity",
        '{"recipe": "tcell-selection-wash", "params": {"wash_cycles": 1e999}}',
        "params.wash_cycles",
    ),
    (
        "/api/v1/run/start",
        "params-bad-key",
        _merge("/api/v1/run/start", params={"no such/key": 1}),
        "params",
    ),
    (
        "/api/v1/run/start",
        "params-control",
        _merge("/api/v1/run/start", params={"coi_id": "COI-1\x00"}),
        "params.coi_id",
    ),
    (
        "/api/v1/run/start",
        "too-many-params",
        _merge("/api/v1/run/start", params={f"p{i}": i for i in range(100)}),
        "params",
    ),
    (
        "/api/v1/run/start",
        "bind-number",
        _merge("/api/v1/run/start", bind={"cell_processor": 5}),
        "bind.cell_processor",
    ),
    ("/api/v1/run/start", "why-number", _merge("/api/v1/run/start", why=5), "why"),
    (
        "/api/v1/run/start",
        "why-huge",
        _merge("/api/v1/run/start", why="w" * (MAX_TEXT + 1)),
        "why",
    ),
    (
        "/api/v1/run/start",
        "why-bidi",
        _merge("/api/v1/run/start", why="ok\u202edesrever"),
        "why",
    ),
    (
        "/api/v1/run/start",
        "why-newline",
        _merge("/api/v1/run/start", why="line\nforged: entry"),
        "why",
    ),
    (
        "/api/v1/run/start",
        "why-surrogate",
        '{"recipe": "tcell-selection-wash", "why": "\\ud800"}',
        "why",
    ),
    ("/api/v1/run/command", "command-number", {"command": 5}, "command"),
    ("/api/v1/run/command", "command-unknown", {"command": "explode"}, "command"),
    ("/api/v1/run/command", "command-done", {"command": "done"}, "command"),
    ("/api/v1/run/command", "command-list", {"command": ["hold"]}, "command"),
    ("/api/v1/run/command", "why-huge", _merge("/api/v1/run/command", why=HUGE[:5000]), "why"),
    ("/api/v1/run/command", "why-nan", '{"command": "hold", "why": NaN}', "why"),
    (
        "/api/v1/run/command",
        "why-zero-width",
        _merge("/api/v1/run/command", why="a\u200bb"),
        "why",
    ),
    ("/api/v1/run/answer", "phase-list", {"phase": []}, "phase"),
    ("/api/v1/run/answer", "phase-huge", {"phase": HUGE[:5000]}, "phase"),
    (
        "/api/v1/run/answer",
        "inputs-nested",
        _merge("/api/v1/run/answer", inputs={"volume": [1]}),
        "inputs.volume",
    ),
    (
        "/api/v1/run/answer",
        "inputs-huge",
        _merge("/api/v1/run/answer", inputs={"bag_id": HUGE[:5000]}),
        "inputs.bag_id",
    ),
    (
        "/api/v1/run/answer",
        "inputs-nan",
        '{"phase": "scan_bag", "inputs": {"volume": NaN}}',
        "inputs.volume",
    ),
    (
        "/api/v1/run/answer",
        "inputs-escape",
        _merge("/api/v1/run/answer", inputs={"bag_id": "\x1b[2J"}),
        "inputs.bag_id",
    ),
    (
        "/api/v1/run/answer",
        "signatures-string",
        _merge("/api/v1/run/answer", signatures="alice"),
        "signatures",
    ),
    (
        "/api/v1/run/answer",
        "signature-password-number",
        _merge(
            "/api/v1/run/answer",
            signatures=[{"meaning": "performed", "user": "alice", "password": 5}],
        ),
        "signatures[0].password",
    ),
    (
        "/api/v1/run/answer",
        "signature-user-huge",
        _merge(
            "/api/v1/run/answer",
            signatures=[{"meaning": "performed", "user": HUGE[:5000], "password": "x"}],
        ),
        "signatures[0].user",
    ),
    (
        "/api/v1/run/answer",
        "signature-meaning",
        _merge(
            "/api/v1/run/answer",
            signatures=[{"meaning": "owned", "user": "alice", "password": "x"}],
        ),
        "signatures[0].meaning",
    ),
    (
        "/api/v1/run/answer",
        "too-many-signatures",
        _merge(
            "/api/v1/run/answer",
            signatures=[{"meaning": "performed", "user": "alice", "password": "x"}] * 50,
        ),
        "signatures",
    ),
    ("/api/v1/alarms/ack", "alarm-number", {"alarm": 5, "reason": "r"}, "alarm"),
    ("/api/v1/alarms/ack", "reason-empty", {"alarm": "a", "reason": ""}, "reason"),
    ("/api/v1/alarms/ack", "reason-huge", {"alarm": "a", "reason": HUGE[:5000]}, "reason"),
    ("/api/v1/alarms/ack", "reason-control", {"alarm": "a", "reason": "bell\x07"}, "reason"),
    (
        "/api/v1/alarms/shelve",
        "minutes-string",
        _merge("/api/v1/alarms/shelve", minutes="5"),
        "minutes",
    ),
    (
        "/api/v1/alarms/shelve",
        "minutes-bool",
        _merge("/api/v1/alarms/shelve", minutes=True),
        "minutes",
    ),
    (
        "/api/v1/alarms/shelve",
        "minutes-negative",
        _merge("/api/v1/alarms/shelve", minutes=-5),
        "minutes",
    ),
    (
        "/api/v1/alarms/shelve",
        "minutes-nan",
        '{"alarm": "a", "reason": "r", "minutes": NaN}',
        "minutes",
    ),
    (
        "/api/v1/alarms/shelve",
        "minutes-infinite",
        '{"alarm": "a", "reason": "r", "minutes": Infinity}',
        "minutes",
    ),
    (
        "/api/v1/alarms/shelve",
        "minutes-absurd",
        _merge("/api/v1/alarms/shelve", minutes=1e300),
        "minutes",
    ),
]


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize(("case", "raw", "field"), WHOLE_BODY, ids=[c[0] for c in WHOLE_BODY])
def test_a_malformed_body_is_a_4xx_naming_the_body(
    agent: Agent, path: str, case: str, raw: bytes, field: str
) -> None:
    """A body that is not a JSON object of sane size gets 400/413 naming ``body``, no 500."""
    data = _refused_cleanly(post(agent, path, raw=raw, user=ENDPOINTS[path][0]), agent, {400, 413})
    assert any(p.startswith(f"{field}:") for p in data["problems"]), data


@pytest.mark.parametrize(
    ("path", "case", "body", "field"), FIELD_CASES, ids=[f"{c[0][8:]}:{c[1]}" for c in FIELD_CASES]
)
def test_a_bad_field_is_a_400_naming_the_field(
    agent: Agent, path: str, case: str, body: Any, field: str
) -> None:
    """Wrong types, huge strings, missing and extra fields, NaN and control characters each get
    400 with a problem that starts with the field's path; the agent keeps serving."""
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    data = _refused_cleanly(post(agent, path, raw=raw, user=ENDPOINTS[path][0]), agent, {400})
    assert any(p.startswith(f"{field}:") or p.startswith(f"{field}.") for p in data["problems"]), (
        data
    )
    assert all(len(p) < 600 for p in data["problems"]), "a problem echoes the input"


def test_no_malformed_request_left_anything_in_the_journal(agent: Agent) -> None:
    """After the bad requests no run exists and the journal holds no record of their text."""
    post(
        agent, "/api/v1/run/start", raw=b'{"recipe": 5, "why": "' + b"z" * 400 + b'"}', user="alice"
    )
    assert httpx.get(f"{agent.url}/api/v1/run", timeout=10).json()["run"] is None
    journal = b"".join(r.data for r in agent.records())
    assert b"z" * 400 not in journal and HUGE[:1000].encode() not in journal


def test_a_body_larger_than_the_limit_is_413(agent: Agent) -> None:
    """A body over the limit is refused with 413 naming the body, before it is parsed."""
    raw = json.dumps({"recipe": RECIPE_NAME, "why": "y" * (2 * MAX_BODY)}).encode()
    data = _refused_cleanly(post(agent, "/api/v1/run/start", raw=raw, user="alice"), agent, {413})
    assert data["problems"][0].startswith("body:")


def test_a_chunked_body_without_a_length_is_cut_at_the_limit(agent: Agent) -> None:
    """A body streamed in chunks (no Content-Length) is refused with 413 once past the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"recipe": "tcell-selection-wash", "why": "'
        for _ in range(40):
            yield b"c" * 4096
        yield b'"}'

    r = httpx.post(
        f"{agent.url}/api/v1/run/start",
        content=chunks(),
        auth=("alice", PASSWORDS["alice"]),
        timeout=30,
    )
    assert "content-length" not in r.request.headers
    assert _refused_cleanly(r, agent, {413})["problems"][0].startswith("body:")


# --- authorisation before parsing; refusals journaled -----------------------------------------


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_an_unauthorised_user_gets_403_whatever_the_body(agent: Agent, path: str) -> None:
    """An engineer (no run or alarm rights) sending a malformed body gets 403, not the 400
    that would tell them how the body is checked."""
    r = post(agent, path, raw=b'{"recipe": 5, "colour": [', user="erin")
    data = _refused_cleanly(r, agent, {403})
    assert data["problems"] == [] and "erin" in data["error"]


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_no_credentials_get_401_whatever_the_body(agent: Agent, path: str) -> None:
    """Without credentials every POST is 401 before its body is looked at."""
    _refused_cleanly(post(agent, path, raw=b"{not json", user=None), agent, {401})


def test_an_operator_may_not_abort_even_with_a_malformed_reason(agent: Agent) -> None:
    """The command is authorised before the rest of its body is checked: 403, not 400."""
    r = post(agent, "/api/v1/run/command", {"command": "abort", "why": 5}, user="alice")
    assert _refused_cleanly(r, agent, {403})["error"].startswith("user 'alice'")


def test_refusals_are_journaled_with_who_what_where_and_why(agent: Agent) -> None:
    """A 403 and a 401 each leave an audit record: the user, the request, the client address
    and the reason."""
    post(agent, "/api/v1/alarms/shelve", {"alarm": "a", "reason": "r"}, user="erin")
    post(agent, "/api/v1/run/start", {"recipe": RECIPE_NAME}, user=None)
    refused = agent.audits("request_refused")
    forbidden = [a for a in refused if a["status"] == 403 and a["who"] == "erin"]
    assert any(
        a["request"] == "POST /api/v1/alarms/shelve"
        and a["from"].startswith("127.0.0.1:")
        and a["action"] == "request_refused"
        and a["needs"] == "alarm.shelve"
        and "alarm.shelve" in a["reason"]
        for a in forbidden
    ), refused
    assert any(
        a["status"] == 401 and a["who"] is None and a["request"] == "POST /api/v1/run/start"
        for a in refused
    )


def test_an_attacker_chosen_user_name_is_journaled_short_and_escaped(agent: Agent) -> None:
    """A 5000-character user name with control and bidi characters gets 401; the journal
    keeps at most a few dozen escaped characters of it."""
    name = "\u202eevil\x00\x1b[2J" + "n" * 5000
    token = base64.b64encode(f"{name}:whatever".encode()).decode()
    r = httpx.post(
        f"{agent.url}/api/v1/run/start",
        content=b"{}",
        headers={"authorization": f"Basic {token}"},
        timeout=30,
    )
    assert _refused_cleanly(r, agent, {401})["error"] == "unknown user or wrong password"
    refused = agent.audits("request_refused")
    shown = [a["who"] for a in refused if (a["who"] or "").startswith("\\u202e")]
    failed = [a["who"] for a in agent.audits("login_failed") if a["who"].startswith("\\u202e")]
    assert shown and failed
    for who in shown + failed:
        assert len(who) < 80 and who.isascii() and who.isprintable(), who
        assert "\x00" not in who and "\u202e" not in who


def test_a_refused_sign_in_at_the_users_cli_reaches_the_journal_while_the_agent_runs(
    agent: Agent,
) -> None:
    """The users' audit outbox is drained while the agent runs, not only at its next start."""

    async def refused_at_the_cli() -> None:
        await AuditOutbox.in_dir(agent.state)(
            "audit", {"action": "login_failed", "who": "mallory-cli", "purpose": "login"}
        )

    asyncio.run(refused_at_the_cli())
    deadline = time.monotonic() + 30
    while not any(a.get("who") == "mallory-cli" for a in agent.audits("login_failed")):
        assert time.monotonic() < deadline, "the outbox record was not journaled"
        time.sleep(0.2)
    assert AuditOutbox.in_dir(agent.state).pending() == []


# --- the recipe store: names only, nothing outside it is read ---------------------------------

ESCAPES = [
    "../../etc/passwd",
    "../secret",
    "/etc/passwd",
    "recipes/tcell-selection-wash.yaml",
    "tcell-selection-wash.yaml",
    "tcell-selection-wash\x00",
    "tcell\x00/../../etc/passwd",
    "..",
    ".",
    "",
    "a" * 5000,
    "a/b",
    "a\\b",
    "~root",
    "file:///etc/passwd",
    "TCELL-SELECTION-WASH",
]


@pytest.mark.parametrize("name", ESCAPES, ids=[repr(n[:20]) for n in ESCAPES])
def test_a_recipe_is_chosen_by_name_never_by_path(agent: Agent, name: str) -> None:
    """Paths, traversals, NUL bytes, slashes and absurd names are refused (400, naming
    ``recipe``) and nothing of any file's content comes back."""
    r = post(agent, "/api/v1/run/start", {"recipe": name, "params": PARAMS}, user="alice")
    data = _refused_cleanly(r, agent, {400})
    assert data["problems"][0].startswith("recipe:")
    assert "root:" not in r.text and SECRET not in r.text


@pytest.mark.parametrize("name", ["planted", "passwd"])
def test_a_symlink_out_of_the_store_is_refused_without_its_content(agent: Agent, name: str) -> None:
    """A symlink planted in the store, pointing at a file outside it, is refused (422) and
    neither the file's content nor a parse error of it appears in the answer or the journal."""
    r = post(agent, "/api/v1/run/start", {"recipe": name, "params": PARAMS}, user="alice")
    data = _refused_cleanly(r, agent, {422})
    assert "not a file inside the unit's recipe store" in data["error"]
    assert SECRET not in r.text and "root:" not in r.text
    journal = b"".join(r.data for r in agent.records())
    assert SECRET.encode() not in journal and b"root:x:" not in journal


def test_an_unknown_recipe_name_is_404_listing_what_is_installed(agent: Agent) -> None:
    """A well-formed name not in the store gets 404 naming the recipes that are."""
    r = post(agent, "/api/v1/run/start", {"recipe": "no-such-recipe"}, user="alice")
    data = _refused_cleanly(r, agent, {404})
    assert "no recipe 'no-such-recipe'" in data["error"] and RECIPE_NAME in data["error"]
