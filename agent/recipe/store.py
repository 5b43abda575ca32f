"""The unit's recipe store: the only recipes a run can be started from, chosen by name.

Operators never give a path. An engineer installs a recipe (``bedside recipe install FILE``,
which validates it against the unit first); the store keeps it as ``<root>/<name>.yaml``,
0644, written atomically. ``read(name)`` is the one way in, and it opens nothing but a regular
file directly inside the store:

- the name must match ``NAME_PATTERN`` (a letter, then letters, digits, ``-`` or ``_``; at most
  64): no slash, dot, NUL, space or control character can get near the file system;
- the path is resolved with ``realpath`` and must still be directly inside the store's own
  resolved folder (a symlink pointing elsewhere is refused), then it is opened with
  ``O_NOFOLLOW`` (a symlink swapped in after the check fails to open) and ``O_NONBLOCK`` (a
  FIFO cannot hang the agent), and ``fstat`` must say regular file of at most ``MAX_BYTES``.

Errors name the recipe as asked (shortened and escaped: it comes from a request) and why;
they never quote the file's content. The root is ``<state dir>/recipes`` unless the agent is
told otherwise (``bedside agent run --recipes DIR``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MAX_BYTES = 1 << 20  # the largest shipped recipe is ~10 KiB; a megabyte is generous
SUFFIX = ".yaml"
DIR_NAME = "recipes"


class RecipeStoreError(Exception):
    """A recipe that cannot be read from or written to the store; the message says why."""


class RecipeNotFound(RecipeStoreError):
    """No recipe of that name is installed."""


class RecipeNameInvalid(RecipeStoreError):
    """The name is not a store name (``NAME_PATTERN``)."""


@dataclass(frozen=True, slots=True)
class StoredRecipe:
    """One recipe read from the store: its name, real path, bytes and their SHA-256."""

    name: str
    path: Path
    data: bytes

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of ``data``, as journaled in ``run_started``."""
        return hashlib.sha256(self.data).hexdigest()


def shown(text: object, limit: int = 40) -> str:
    """``text`` as safe to echo: ``repr`` (controls escaped) of at most ``limit`` characters."""
    value = str(text)
    cut = value[:limit]
    return repr(cut) + (f" (+{len(value) - limit} characters)" if len(value) > limit else "")


def check_name(name: object) -> str:
    """``name`` if it is a store name; ``RecipeNameInvalid`` naming the rule otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RecipeNameInvalid(
            f"recipe name {shown(name)} is not valid: a recipe is chosen by its name in the "
            "unit's recipe store (a lower-case letter, then letters, digits, '-' or '_'; at "
            "most 64), never by a path"
        )
    return name


class RecipeStore:
    """The recipes installed on this unit, in one flat folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> RecipeStore:
        """The store of the unit whose state folder is ``state_dir``."""
        return cls(Path(state_dir) / DIR_NAME)

    def names(self) -> list[str]:
        """The installed recipe names, sorted (files that are not store entries are ignored)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RecipeStoreError(
                f"cannot list the recipe store {self.root}: {exc.strerror}"
            ) from None
        found = []
        for entry in entries:
            stem = entry.name.removesuffix(SUFFIX)
            is_file = entry.is_file(follow_symlinks=False)
            if entry.name.endswith(SUFFIX) and NAME_PATTERN.fullmatch(stem) and is_file:
                found.append(stem)
        return sorted(found)

    def read(self, name: object) -> StoredRecipe:
        """The recipe installed as ``name``; ``RecipeStoreError`` (never quoting content)."""
        key = check_name(name)
        root = os.path.realpath(self.root)
        given = os.path.join(root, key + SUFFIX)
        path = os.path.realpath(given)
        # install never makes symlinks: one here was planted, wherever it points
        if os.path.islink(given) or os.path.dirname(path) != root:
            raise RecipeStoreError(
                f"recipe {key!r} is not a file inside the unit's recipe store; reinstall it "
                "with `bedside recipe install`"
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RecipeNotFound(self._missing(key)) from None
        except OSError as exc:
            raise RecipeStoreError(f"recipe {key!r} cannot be read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RecipeStoreError(f"recipe {key!r} in the store is not a regular file")
            if st.st_size > MAX_BYTES:
                raise RecipeStoreError(
                    f"recipe {key!r} is {st.st_size} bytes; at most {MAX_BYTES} are read"
                )
            data = _read_all(fd, MAX_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_BYTES:
            raise RecipeStoreError(f"recipe {key!r} grew past {MAX_BYTES} bytes while read")
        return StoredRecipe(key, Path(path), data)

    def install(self, name: str, data: bytes, *, replace: bool = False) -> StoredRecipe:
        """Write ``data`` (already validated by the caller) as recipe ``name``; refuses to
        replace a different recipe of the same name unless ``replace``."""
        key = check_name(name)
        if len(data) > MAX_BYTES:
            raise RecipeStoreError(f"the recipe is {len(data)} bytes; at most {MAX_BYTES}")
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise RecipeStoreError(
                f"cannot create the recipe store {self.root}: {exc.strerror}"
            ) from None
        try:
            current = self.read(key)
        except RecipeNotFound:
            pass
        except RecipeStoreError as exc:  # a planted symlink, a folder: replaced only if asked
            if not replace:
                raise RecipeStoreError(f"{exc}; give --replace to overwrite it") from None
        else:
            if current.data == data:
                return current
            if not replace:
                raise RecipeStoreError(
                    f"a different recipe {key!r} is installed already (sha256 "
                    f"{current.sha256[:12]}...); give --replace to replace it (a run of the old "
                    "one cannot be recovered after a restart)"
                )
        target = self.root / (key + SUFFIX)
        tmp = self.root / f".{key}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)  # replaces a symlink itself, never its target
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise RecipeStoreError(f"cannot install recipe {key!r}: {exc.strerror}") from exc
        return self.read(key)

    def _missing(self, key: str) -> str:
        try:
            names = self.names()
        except RecipeStoreError:
            names = []
        return (
            f"no recipe {key!r} in the unit's recipe store; installed: "
            f"{', '.join(names) or 'none'} (an engineer adds one with `bedside recipe install`)"
        )


def _read_all(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(1 << 16, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
