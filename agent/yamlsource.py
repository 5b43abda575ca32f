"""YAML documents that remember where every value came from, read within safe limits.

Configurations and recipes are validated with pydantic; its errors name a path such as
``devices.bioreactor.tags.temperature.limits``. ``load_yaml`` returns the plain data *and* a
map from each path to its line, so every problem is reported with file, line and path.
``${VAR}`` and ``${VAR:-default}`` in string scalars are expanded from the environment (unit
configurations only: ``expand_env=False`` for recipes).

Whatever a file holds, the answer is data or a ``DocumentError`` naming file, line and column,
quickly: files over ``MAX_BYTES``, nesting over ``MAX_DEPTH``, more than ``MAX_ALIASES``
aliases or ``MAX_VALUES`` values after alias expansion (alias bombs), an alias inside its own
anchor, explicit tags (``!!python/...``, ``!!binary``), merge keys, keys that are mappings or
lists, duplicate keys, bytes that are not UTF-8 and characters YAML forbids (NUL and other
control characters) are all refused. Public API: ``read_source``, ``decode``, ``parse_yaml``,
``load_yaml``, ``Located``, ``Problem``, ``DocumentError``.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import SafeConstructor

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


def _expand(value: str) -> str:
    return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


# ------------------------------------------------------------------------ limits
#
# Bedside files are small (the shipped recipes and unit configuration are 3-13 kB, nested
# at most 8 levels, with one alias). The limits are far above that and far below what would
# make parsing slow, so a hostile or corrupt file is refused at once rather than parsed.

MAX_BYTES = 256 * 1024
"""Largest file (and text) accepted, in bytes."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences, counted after aliases are expanded."""
MAX_ALIASES = 100
"""Most aliases (``*name``) in one document."""
MAX_VALUES = 100_000
"""Most values (scalars, mappings, sequences) in one document after aliases are expanded:
this is what stops an alias bomb ("billion laughs"), whose text is small but whose
expansion is not."""
_KEY_TYPES = (str, int, float, bool, type(None))


class _Refused(Exception):
    """A limit or rule of Bedside YAML broken at ``mark``."""

    def __init__(self, mark: yaml.Mark | None, message: str, hint: str = "") -> None:
        self.mark = mark
        self.message = message
        self.hint = hint
        super().__init__(message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer with Bedside's limits: nesting depth and alias count checked as
    each node is composed (the composer recurses, so this runs before Python's own limit),
    an alias inside its own anchor refused (it would be infinite), explicit tags refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._open: set[str] = set()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if event.anchor in self._open:
                raise _Refused(
                    event.start_mark,
                    f"the alias *{event.anchor} is inside its own anchor &{event.anchor}",
                    "an alias repeats an earlier, complete value",
                )
            if self._aliases > MAX_ALIASES:
                raise _Refused(event.start_mark, f"more than {MAX_ALIASES} aliases (*name)")
            # the anchor's node, marked where the alias is written, so that the alias's line
            # is reported for its value (and for an expansion that breaks the budget)
            node = copy.copy(super().compose_node(parent, index))
            node.start_mark, node.end_mark = event.start_mark, event.end_mark
            node.alias = event.anchor  # type: ignore[attr-defined]
            return node
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise _Refused(
                event.start_mark,
                f"the YAML tag {tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed",
                "Bedside files hold plain text, numbers, true/false, lists and mappings",
            )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(
                event.start_mark,
                f"the document is nested too deeply (more than {MAX_DEPTH} levels)",
            )
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)


class _Builder:
    """Plain data and line marks from a composed node graph, expanding aliases within the
    value budget; keys must be single values and unique."""

    def __init__(self, file: str, expand_env: bool) -> None:
        self.file = file
        self.expand_env = expand_env
        self.lines: dict[Loc, int] = {}
        self.values = 0
        self.alias: Any = None  # the alias node being expanded, if any
        self.scalars = SafeConstructor()

    def build(self, node: yaml.Node, loc: Loc, depth: int = 1) -> Any:
        alias = getattr(node, "alias", None)
        if alias is not None and self.alias is None:  # the outermost alias being expanded
            self.alias = node
            try:
                return self.build_node(node, loc, depth)
            finally:
                self.alias = None
        return self.build_node(node, loc, depth)

    def build_node(self, node: yaml.Node, loc: Loc, depth: int) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            where = self.alias or node
            what = f"the alias *{self.alias.alias}" if self.alias else "the document"
            raise _Refused(
                where.start_mark,
                f"{what} expands the document to more than {MAX_VALUES} values",
                "aliases (*name) repeat their anchor's whole value; is this an alias bomb?",
            )
        if depth > MAX_DEPTH:
            raise _Refused(
                node.start_mark,
                f"the document is nested too deeply (more than {MAX_DEPTH} levels)",
            )
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, loc, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, (*loc, i), depth + 1) for i, v in enumerate(node.value)]
        value = self.scalar(node)
        return _expand(value) if self.expand_env and isinstance(value, str) else value

    def mapping(self, node: yaml.MappingNode, loc: Loc, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node)
            if key in out:
                raise DocumentError(
                    [
                        Problem(
                            self.file,
                            key_node.start_mark.line + 1,
                            ".".join(map(str, (*loc, key))),
                            f"duplicate key {key!r}",
                            "each key may appear once",
                            key_node.start_mark.column + 1,
                        )
                    ]
                )
            out[key] = self.build(value_node, (*loc, key), depth + 1)
        return out

    def key(self, node: yaml.Node) -> Any:
        if node.tag == "tag:yaml.org,2002:merge":
            raise _Refused(
                node.start_mark, "merge keys (<<) are not supported", "write the keys out"
            )
        if not isinstance(node, yaml.ScalarNode):
            kind = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
            raise _Refused(
                node.start_mark,
                f"a key must be a single value (text or a number), not {kind}",
            )
        key = self.scalar(node)
        if not isinstance(key, _KEY_TYPES):
            raise _Refused(
                node.start_mark,
                f"a key must be text or a number, not {type(key).__name__} {node.value!r:.40}",
                "quote it",
            )
        return key

    def scalar(self, node: yaml.Node) -> Any:
        try:
            return self.scalars.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of 5000 digits
            reason = str(exc).split(";")[0].splitlines()[0]
            message = f"unusable value {node.value!r:.40}: {reason}"
            raise _Refused(node.start_mark, message) from None


def _problem(file: str, mark: yaml.Mark | None, message: str, hint: str = "") -> Problem:
    if mark is None:
        return Problem(file, 1, "", message, hint)
    return Problem(file, mark.line + 1, "", message, hint, mark.column + 1)


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
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
        if root is None:
            raise DocumentError([Problem(file, 1, "", "the document is empty")])
        builder = _Builder(file, expand_env)
        data = builder.build(root, ())
    except _Refused as exc:
        raise DocumentError([_problem(file, exc.mark, exc.message, exc.hint)]) from None
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
    return Located(data, file, builder.lines)


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
