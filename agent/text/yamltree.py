"""The data tree of a YAML text, built within limits that no hostile file can get past.

PyYAML's safe composer and constructor, with Bedside's rules: nesting depth and alias count
checked as each node is composed (the composer recurses, so this runs long before Python's
own recursion limit), values counted as aliases are expanded (an alias bomb, "billion
laughs", is small text with a huge expansion), an alias inside its own anchor refused (it
would never end), explicit tags and merge keys refused, keys single values (text, number,
true/false, null) and unique. Every refusal is a ``Refused`` with the YAML mark where it
happened; ``agent.text.yamlsource`` turns it into a located ``Problem``.

Public API: ``build_tree(text, expand_env) -> (data, lines)``, ``Refused``, the ``MAX_*``
limits.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

Loc = tuple[str | int, ...]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
MAX_VALUES = 20_000
"""Most values (scalars, mappings, sequences) in one document, counted as it is composed and
again as aliases are expanded: this stops an alias bomb ("billion laughs"), whose text is
small but whose expansion is not, and bounds the time a dense file takes (the shipped recipe
has 585 values, the shipped unit configuration 367)."""
_KEY_TYPES = (str, int, float, bool, type(None))


class Refused(Exception):
    """A limit or rule of Bedside YAML broken at ``mark``."""

    def __init__(self, mark: Any, message: str, hint: str = "", path: Loc = ()) -> None:
        self.mark = mark  # a yaml Mark, or None
        self.message = message
        self.hint = hint
        self.path = path
        super().__init__(message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer with Bedside's limits: nesting depth and alias count checked as
    each node is composed (the composer recurses, so this runs before Python's own limit),
    an alias inside its own anchor refused (it would be infinite), explicit tags refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._aliases = 0
        self._open: set[str] = set()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if event.anchor in self._open:
                raise Refused(
                    event.start_mark,
                    f"the alias *{event.anchor} is inside its own anchor &{event.anchor}",
                    "an alias repeats an earlier, complete value",
                )
            if self._aliases > MAX_ALIASES:
                raise Refused(event.start_mark, f"more than {MAX_ALIASES} aliases (*name)")
            # the anchor's node, marked where the alias is written, so that the alias's line
            # is reported for its value (and for an expansion that breaks the budget)
            node: Any = copy.copy(super().compose_node(parent, index))
            node.start_mark, node.end_mark = event.start_mark, event.end_mark
            node.alias = event.anchor
            return node
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise Refused(
                event.start_mark,
                f"the YAML tag {tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed",
                "Bedside files hold plain text, numbers, true/false, lists and mappings",
            )
        self._nodes += 1
        if self._nodes > MAX_VALUES:
            raise Refused(event.start_mark, f"the document has more than {MAX_VALUES} values")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise Refused(
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

    def __init__(self, expand_env: bool) -> None:
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
            what = (
                f"the alias *{self.alias.alias} expands the document to"
                if self.alias
                else "once its aliases are expanded, the document has"
            )
            raise Refused(
                where.start_mark,
                f"{what} more than {MAX_VALUES} values",
                "aliases (*name) repeat their anchor's whole value; is this an alias bomb?",
            )
        if depth > MAX_DEPTH:
            raise Refused(
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
                raise Refused(
                    key_node.start_mark,
                    f"duplicate key {key!r}",
                    "each key may appear once",
                    (*loc, key),
                )
            out[key] = self.build(value_node, (*loc, key), depth + 1)
        return out

    def key(self, node: yaml.Node) -> Any:
        if node.tag == "tag:yaml.org,2002:merge":
            raise Refused(
                node.start_mark, "merge keys (<<) are not supported", "write the keys out"
            )
        if not isinstance(node, yaml.ScalarNode):
            kind = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
            raise Refused(
                node.start_mark,
                f"a key must be a single value (text or a number), not {kind}",
            )
        key = self.scalar(node)
        if not isinstance(key, _KEY_TYPES):
            raise Refused(
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
            raise Refused(node.start_mark, message) from None


def build_tree(text: str, expand_env: bool) -> tuple[Any, dict[Loc, int]] | None:
    """The data of a single-document YAML text and the line of each path in it, or ``None``
    for an empty document. Raises ``Refused``, or PyYAML's errors for bad syntax."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is None:
        return None
    builder = _Builder(expand_env)
    return builder.build(root, ()), builder.lines
