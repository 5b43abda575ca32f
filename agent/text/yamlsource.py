"""YAML documents that remember where every value came from, read within safe limits.

Configurations and recipes are validated with pydantic; its errors name a path such as
``devices.bioreactor.tags.temperature.limits``. ``load_yaml`` returns the plain data *and* a
map from each path to its line, so every problem is reported with file, line and path.
``${VAR}`` and ``${VAR:-default}`` in string scalars are expanded from the environment (unit
configurations only: ``expand_env=False`` for recipes).

Whatever a file holds, the answer is data or a ``DocumentError`` naming file, line and column,
quickly: files over ``MAX_BYTES`` or not regular, bytes that are not UTF-8 and characters YAML
forbids (NUL and other control characters) are refused here; nesting, alias bombs, tags,
merge keys and bad or duplicate keys by the tree builder (``agent.text.yamltree``).

Public API: ``read_source``, ``decode``, ``parse_yaml``, ``load_yaml``, ``Located``,
``Problem``, ``DocumentError``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.text.yamltree import MAX_BYTES, Loc, Refused, build_tree

__all__ = [
    "MAX_BYTES",
    "DocumentError",
    "Loc",
    "Located",
    "Problem",
    "decode",
    "load_yaml",
    "parse_yaml",
    "read_source",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a document: where it is, what is wrong, and a hint."""

    file: str
    line: int | None
    path: str
    message: str
    hint: str = ""
    column: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.line and self.column:
            where += f":{self.column}"
        text = f"{where}: {self.path or '<document>'}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class DocumentError(Exception):
    """A document with one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Located:
    """Parsed YAML data and the line of each path in it."""

    data: Any
    file: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc`` or of its nearest ancestor that has one."""
        loc = tuple(loc)
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]

    def problems_from(
        self, exc: ValidationError, hints: dict[str, str] | None = None
    ) -> list[Problem]:
        """Translate pydantic's errors into located problems."""
        out = []
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            # pydantic adds union member names to loc for tagged unions; keep data keys only
            loc = _data_path(self.data, loc)
            path = ".".join(str(p) for p in loc)
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key {loc[-1]!r}"
            elif err["type"] == "missing":
                message = f"required key {loc[-1]!r} is missing"
            hint = (hints or {}).get(err["type"], "")
            if err["type"] == "extra_forbidden" and not hint:
                hint = "check the spelling; unknown keys are errors"
            out.append(Problem(self.file, self.line_of(loc), path, message, hint))
        return out


def _data_path(data: Any, loc: Loc) -> Loc:
    """Drop elements of a pydantic ``loc`` that are not keys in the data (union member names,
    validator names), keeping a final missing or unknown key so that it can be named."""
    kept: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            kept.append(part)
            node = node[part]
        elif last and isinstance(node, dict):
            kept.append(part)
        # otherwise a union member or validator name: not part of the document
    return tuple(kept)


def _problem(file: str, mark: Any, message: str, hint: str = "", path: str = "") -> Problem:
    if mark is None:
        return Problem(file, 1, path, message, hint)
    return Problem(file, mark.line + 1, path, message, hint, mark.column + 1)


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of a character index."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def parse_yaml(text: str, file: str = "<string>", *, expand_env: bool = True) -> Located:
    """Parse YAML text into data with line marks. Syntax errors, broken limits (size, depth,
    aliases, values), explicit tags, keys that are not single values, duplicate keys and
    characters YAML does not allow all become a ``DocumentError`` naming line and column.
    ``expand_env`` expands ``${VAR}`` in strings (unit configurations do, recipes do not)."""
    if len(text) > MAX_BYTES:
        line, _ = _position(text, MAX_BYTES)
        raise DocumentError(
            [Problem(file, line, "", f"the text is larger than {MAX_BYTES // 1024} KiB")]
        )
    try:
        tree = build_tree(text, expand_env)
        if tree is None:
            raise DocumentError([Problem(file, 1, "", "the document is empty")])
    except Refused as exc:
        path = ".".join(map(str, exc.path))
        raise DocumentError([_problem(file, exc.mark, exc.message, exc.hint, path)]) from None
    except yaml.reader.ReaderError as exc:
        line, column = _position(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise DocumentError(
            [
                Problem(
                    file,
                    line,
                    "",
                    f"not a text file: the character U+{code:04X} is not allowed in YAML",
                    "is this a YAML file? control characters such as NUL are refused",
                    column,
                )
            ]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise DocumentError(
            [_problem(file, mark, f"YAML syntax: {exc.problem}", str(exc.context or ""))]
        ) from None
    except yaml.YAMLError as exc:
        raise DocumentError([Problem(file, 1, "", f"YAML: {exc}".splitlines()[0])]) from None
    except RecursionError:  # not expected within the limits; never a traceback
        raise DocumentError([Problem(file, 1, "", "the document is nested too deeply")]) from None
    return Located(tree[0], file, tree[1])


def decode(data: bytes, file: str) -> str:
    """UTF-8 text of a file's bytes; ``DocumentError`` naming the line and column of the first
    byte that is not UTF-8, or when there are more than ``MAX_BYTES``."""
    if len(data) > MAX_BYTES:
        line = data.count(b"\n", 0, MAX_BYTES) + 1
        raise DocumentError(
            [
                Problem(
                    file,
                    line,
                    "",
                    f"the file is larger than {MAX_BYTES // 1024} KiB",
                    "Bedside recipes and unit configurations are a few kB",
                )
            ]
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DocumentError(
            [
                Problem(
                    file,
                    line,
                    "",
                    f"not UTF-8 text: byte 0x{data[exc.start]:02x} ({exc.reason})",
                    "is this a YAML file? save it as UTF-8",
                    column,
                )
            ]
        ) from None


def read_source(path: str | Path) -> str:
    """The text of a YAML file: a regular file of at most ``MAX_BYTES``, UTF-8; anything else
    is a ``DocumentError``. Reads no more than the limit (a device or a huge file costs
    nothing)."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DocumentError([Problem(str(p), 1, "", "not a regular file")])
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise DocumentError(
            [Problem(str(p), None, "", f"cannot read the file: {exc.strerror}")]
        ) from None
    return decode(data, str(p))


def load_yaml(path: str | Path, *, expand_env: bool = True) -> Located:
    """Read and parse a YAML file (see ``read_source`` and ``parse_yaml``)."""
    return parse_yaml(read_source(path), str(path), expand_env=expand_env)
