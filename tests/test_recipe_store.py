"""The unit's recipe store: names only, nothing outside it read, installs validated and atomic.

Real files and folders in a temporary directory; ``bedside recipe install|installed`` and
``bedside run start`` through typer's CliRunner (their sub-apps, so that the root's logging
set-up does not bind structlog to the runner's short-lived streams).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import main as cli
from agent.cli.recipe import app as recipe_app
from agent.cli.run import run_app
from agent.recipe.store import (
    MAX_BYTES,
    RecipeNameInvalid,
    RecipeNotFound,
    RecipeStore,
    RecipeStoreError,
)

assert cli.app  # importing the root registers the store commands on `bedside recipe`
RECIPES = Path(__file__).parent.parent / "recipes"
TCELL = RECIPES / "tcell-selection-wash.yaml"
SECRET = "SECRET-CONTENT-91c2"


@pytest.fixture
def store(tmp_path: Path) -> RecipeStore:
    """A store with the T-cell recipe, next to a secret file outside it."""
    (tmp_path / "secret.yaml").write_text(f"{SECRET}\n")
    s = RecipeStore.in_dir(tmp_path / "unit")
    s.install("tcell", TCELL.read_bytes())
    return s


def test_an_installed_recipe_is_read_back_by_name(store: RecipeStore) -> None:
    """``read`` returns the very bytes installed, their SHA-256 and a path inside the store."""
    got = store.read("tcell")
    assert got.data == TCELL.read_bytes() and got.name == "tcell"
    assert got.path.parent == Path(os.path.realpath(store.root))
    assert store.names() == ["tcell"]
    assert stat.S_IMODE(got.path.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "name",
    [
        "../secret",
        "../../etc/passwd",
        "/etc/passwd",
        "tcell.yaml",
        "tcell\x00",
        "tc\x00ell",
        "a/b",
        "a\\b",
        ".hidden",
        "..",
        "",
        " tcell",
        "Tcell",
        "t" * 65,
        "t" * 100_000,
    ],
    ids=lambda n: repr(n[:16]),
)
def test_a_name_that_is_not_a_store_name_is_refused_before_any_file_is_touched(
    store: RecipeStore, name: str
) -> None:
    """Traversals, absolute paths, NUL bytes, slashes and overlong names are refused by the
    name rule; the message is short and says a recipe is chosen by name."""
    with pytest.raises(RecipeNameInvalid, match="never by a path") as caught:
        store.read(name)
    assert len(str(caught.value)) < 400 and SECRET not in str(caught.value)


def test_non_strings_are_not_names(store: RecipeStore) -> None:
    """A name that is not a string at all is refused by the same rule."""
    for name in (None, 5, ["tcell"], b"tcell"):
        with pytest.raises(RecipeNameInvalid):
            store.read(name)


def test_a_symlink_out_of_the_store_is_never_followed(store: RecipeStore, tmp_path: Path) -> None:
    """A symlink planted in the store (to a file outside it, or to /etc/passwd) is refused
    and its target's content appears nowhere in the error."""
    (store.root / "evil.yaml").symlink_to(tmp_path / "secret.yaml")
    (store.root / "passwd.yaml").symlink_to("/etc/passwd")
    for name in ("evil", "passwd"):
        with pytest.raises(RecipeStoreError, match="not a file inside") as caught:
            store.read(name)
        assert SECRET not in str(caught.value) and "root:" not in str(caught.value)
    assert store.names() == ["tcell"]  # symlinks are not listed as recipes


def test_a_symlink_inside_the_store_is_refused_too(store: RecipeStore) -> None:
    """Install never makes symlinks, so even one to another store file is refused."""
    (store.root / "alias.yaml").symlink_to(store.root / "tcell.yaml")
    with pytest.raises(RecipeStoreError, match="not a file inside"):
        store.read("alias")


def test_a_store_folder_that_is_itself_a_symlink_still_works(tmp_path: Path) -> None:
    """The store's own folder may be a symlink (a mounted volume): names resolve inside it."""
    real = tmp_path / "real-store"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    store = RecipeStore(tmp_path / "linked")
    store.install("tcell", TCELL.read_bytes())
    assert store.read("tcell").data == TCELL.read_bytes()


def test_a_fifo_a_folder_or_a_huge_file_is_refused_without_hanging(store: RecipeStore) -> None:
    """Only regular files of at most MAX_BYTES are read; a FIFO cannot block the agent."""
    os.mkfifo(store.root / "pipe.yaml")
    (store.root / "folder.yaml").mkdir()
    with (store.root / "huge.yaml").open("wb") as f:
        f.truncate(MAX_BYTES + 1)
    for name, why in (("pipe", "not a regular file"), ("folder", "not a regular file")):
        with pytest.raises(RecipeStoreError, match=why):
            store.read(name)
    with pytest.raises(RecipeStoreError, match="bytes; at most"):
        store.read("huge")


def test_an_unknown_name_lists_what_is_installed(store: RecipeStore) -> None:
    """A well-formed name not installed says so and names the installed recipes."""
    with pytest.raises(RecipeNotFound, match=r"no recipe 'cart' .* installed: tcell"):
        store.read("cart")


def test_installing_a_different_recipe_under_a_taken_name_needs_replace(
    store: RecipeStore,
) -> None:
    """The same bytes again are a no-op; different bytes are refused unless ``replace``."""
    assert store.install("tcell", TCELL.read_bytes()).data == TCELL.read_bytes()
    other = (RECIPES / "cart-expansion.yaml").read_bytes()
    with pytest.raises(RecipeStoreError, match="--replace"):
        store.install("tcell", other)
    assert store.read("tcell").data == TCELL.read_bytes()
    assert store.install("tcell", other, replace=True).data == other
    assert not list(store.root.glob(".*.tmp"))


def test_install_replaces_a_planted_symlink_not_its_target(
    store: RecipeStore, tmp_path: Path
) -> None:
    """Installing over a planted symlink needs ``replace``, then writes the store's own file;
    the symlink's target is untouched."""
    (store.root / "evil.yaml").symlink_to(tmp_path / "secret.yaml")
    with pytest.raises(RecipeStoreError, match="--replace"):
        store.install("evil", TCELL.read_bytes())
    store.install("evil", TCELL.read_bytes(), replace=True)
    assert (tmp_path / "secret.yaml").read_text() == f"{SECRET}\n"
    assert not (store.root / "evil.yaml").is_symlink()


# --- the CLI -----------------------------------------------------------------------------------


def test_recipe_install_validates_then_installs_and_leaves_an_audit_record(
    tmp_path: Path,
) -> None:
    """``bedside recipe install`` checks the recipe against the unit, installs it under its id,
    lists it, and leaves a ``recipe_installed`` record for the agent to journal."""
    from agent.auth.outbox import AuditOutbox

    state = tmp_path / "unit"
    r = CliRunner().invoke(recipe_app, ["install", str(TCELL), "--state-dir", str(state)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["name"] == "tcell-selection-wash" and summary["version"] == 1
    listed = CliRunner().invoke(recipe_app, ["installed", "--state-dir", str(state)])
    assert json.loads(listed.stdout) == [{"name": summary["name"], "sha256": summary["sha256"]}]
    (kind, body), *_ = AuditOutbox.in_dir(state).pending()
    assert kind == "audit" and body["action"] == "recipe_installed"
    assert body["sha256"] == summary["sha256"] and body["who"].startswith("system:")


def test_recipe_install_refuses_an_invalid_recipe_and_installs_nothing(tmp_path: Path) -> None:
    """A recipe with problems is refused with file:line problems (exit 2); the store is empty."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(TCELL.read_text().replace("version: 1", "version: 1\ncolour: red"))
    state = tmp_path / "unit"
    r = CliRunner().invoke(recipe_app, ["install", str(bad), "--state-dir", str(state)])
    assert r.exit_code == 2 and "bad.yaml:" in r.stderr and "Traceback" not in r.output
    assert RecipeStore.in_dir(state).names() == []


def test_recipe_install_refuses_a_name_that_is_a_path(tmp_path: Path) -> None:
    """``--name ../x`` is refused by the name rule; nothing is written outside the store."""
    state = tmp_path / "unit"
    r = CliRunner().invoke(
        recipe_app, ["install", str(TCELL), "--state-dir", str(state), "--name", "../x"]
    )
    assert r.exit_code == 2 and "never by a path" in r.stderr
    assert not (tmp_path / "x.yaml").exists() and not (state / "x.yaml").exists()


def test_run_start_takes_a_name_not_a_file(tmp_path: Path) -> None:
    """``bedside run start recipes/x.yaml`` is refused before any request, with the way to
    install the file instead."""
    r = CliRunner().invoke(
        run_app, ["start", str(TCELL), "--user", "alice", "--api", "http://127.0.0.1:9"]
    )
    assert r.exit_code == 2 and "bedside recipe install" in r.stderr
