"""YAML documents that remember where every value came from.

Configurations and recipes are validated with pydantic; its errors name a path such as
``devices.bioreactor.tags.temperature.limits``. ``load_yaml`` returns the plain data *and* a
map from each path to its line, so every problem is reported with file, line and path.
``${VAR}`` and ``${VAR:-default}`` in string scalars are expanded from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

Loc = tuple[str | int, ...]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a document: where it is, what is wrong, and a hint."""

    file: str
    line: int | None
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
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


def _expand(value: str) -> str:
    return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def _build(node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader("").construct_object(key_node)
            if key in out:
                raise DocumentError(
                    [
                        Problem(
                            file,
                            key_node.start_mark.line + 1,
                            ".".join(map(str, (*loc, key))),
                            f"duplicate key {key!r}",
                            "each key may appear once",
                        )
                    ]
                )
            out[key] = _build(value_node, (*loc, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, (*loc, i), lines, file) for i, v in enumerate(node.value)]
    value = yaml.SafeLoader("").construct_object(node)
    return _expand(value) if isinstance(value, str) else value


def parse_yaml(text: str, file: str = "<string>") -> Located:
    """Parse YAML text into data with line marks; syntax errors become a ``DocumentError``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise DocumentError(
            [
                Problem(
                    file,
                    mark.line + 1 if mark else None,
                    "",
                    f"YAML syntax: {exc.problem}",
                    str(exc.context or ""),
                )
            ]
        ) from exc
    if root is None:
        raise DocumentError([Problem(file, None, "", "the document is empty")])
    lines: dict[Loc, int] = {}
    data = _build(root, (), lines, file)
    return Located(data, file, lines)


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML file; an unreadable file is a ``DocumentError`` too."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DocumentError(
            [Problem(str(p), None, "", f"cannot read the file: {exc.strerror}")]
        ) from exc
    except UnicodeDecodeError as exc:
        raise DocumentError([Problem(str(p), None, "", f"not UTF-8 text: {exc.reason}")]) from exc
    return parse_yaml(text, str(p))
