"""``bedside control-site`` as an operator runs it (subprocesses): tokens, init, and serve's
refusal of plain HTTP off loopback. Nothing here sends a packet to a non-loopback address: the
servers bound to 0.0.0.0 are reached on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_ingest import store_url  # noqa: F401  (fixture)
from tests.test_uplink import self_signed


def bedside(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``bedside ARGS`` as a subprocess, stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "--log-format", "json", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_token_secret_is_printed_once_listed_never_and_revocable(store_url: str) -> None:  # noqa: F811
    """token create prints the secret once; token list shows id, user, created, expires and
    revoked but no secret; token revoke marks it; unknown ids and bad input fail clearly."""
    made = bedside("control-site", "token", "create", "--user", "alice", "--expires-days", "7",
                   "--db", store_url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["token"].startswith("bst_") and token["user"] == "alice"
    assert token["expires"] > token["created"] and token["revoked"] is None
    listed = bedside("control-site", "token", "list", "--db", store_url)
    assert listed.returncode == 0, listed.stderr
    assert token["token"] not in listed.stdout + listed.stderr
    [shown] = json.loads(listed.stdout)["tokens"]
    assert shown == {k: token[k] for k in ("id", "user", "created", "expires", "revoked")}
    gone = bedside("control-site", "token", "revoke", token["id"], "--db", store_url)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["revoked"] is not None
    assert token["token"] not in gone.stdout + gone.stderr
    [shown] = json.loads(bedside("control-site", "token", "list", "--db", store_url).stdout)[
        "tokens"
    ]
    assert shown["revoked"] == json.loads(gone.stdout)["revoked"]
    unknown = bedside("control-site", "token", "revoke", "nope", "--db", store_url)
    assert unknown.returncode != 0 and "'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    for bad, why in ((["--user", "<x>"], "user"), (["--user", "a", "--expires-days", "0"], "0")):
        refused = bedside("control-site", "token", "create", *bad, "--db", store_url)
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_init_writes_the_admin_token_to_a_private_file_only(tmp_path: Path) -> None:
    """control-site init creates the database and an admin token file, both 0600, and prints
    the file's path but not the token; a second init without --force is refused."""
    state, db = tmp_path / "cs", tmp_path / "cs.db"
    done = bedside("control-site", "init", "--state-dir", str(state), "--db", str(db))
    assert done.returncode == 0, done.stderr
    secret = (state / "api-token").read_text().strip()
    assert secret.startswith("bst_") and secret not in done.stdout + done.stderr
    assert json.loads(done.stdout)["api_token_file"] == str(state / "api-token")
    for path in (state / "api-token", db):
        assert os.stat(path).st_mode & 0o777 == 0o600, path
    again = bedside("control-site", "init", "--state-dir", str(state), "--db", str(db))
    assert again.returncode != 0 and "--force" in again.stderr
    assert (state / "api-token").read_text().strip() == secret


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "cs.example.org"])
def test_serve_refuses_plain_http_off_loopback(tmp_path: Path, host: str) -> None:
    """serve on a non-loopback address without TLS or --insecure exits non-zero naming the
    address and the way out, before it opens the database or binds a port."""
    db = tmp_path / "cs.db"
    done = bedside("control-site", "serve", "--host", host, "--port", "8443", "--db", str(db))
    assert done.returncode != 0
    assert f"refusing to serve plain HTTP on {host}:8443" in done.stderr
    assert "--tls-cert" in done.stderr and "--insecure" in done.stderr
    assert "Traceback" not in done.stderr
    assert not db.exists()


@pytest.fixture
def serving(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """``control-site serve --host 0.0.0.0`` with the options named by the test's parameter;
    yields the loopback URL to reach it and the certificate (for https)."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    options = {"insecure": ["--insecure"], "tls": ["--tls-cert", str(cert), "--tls-key", str(key)]}
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--log-format", "json", "control-site", "serve",
             "--host", "0.0.0.0", "--port", str(port), "--db", str(tmp_path / "cs.db"),
             *options[request.param]],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    scheme = "https" if request.param == "tls" else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}", cert
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("serving", ["insecure", "tls"], indirect=True)
def test_serve_off_loopback_with_tls_or_insecure(serving: tuple[str, Path]) -> None:
    """With --tls-cert/--tls-key or --insecure, serve on 0.0.0.0 runs (queries answer 401)."""
    url, cert = serving
    verify = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        try:
            response = httpx.get(f"{url}/api/v1/units", verify=verify, timeout=5)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "the control site did not start"
            time.sleep(0.2)
    assert response.status_code == 401
