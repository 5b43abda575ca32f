"""Syntax of the recipe expression language: tokens, AST dataclasses and the parser.

Grammar (lowest precedence first; comparisons do not chain)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER [UNIT] | STRING | "true" | "false" | NAME
             | ("abs" | "min" | "max") "(" expr ("," expr)* ")" | "(" expr ")"

A NAME is dotted (``reactor.temperature``); a bare word is an error, so typos of names are
caught. A UNIT follows a number (``38.5 degC``, ``500 g``, ``1.5e6 cells/mL``, ``5 %``); the
duration units s, m, min, h, d turn the number into seconds with unit ``s``. Columns are 1-based.
Used through ``agent.expr.expression``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from agent.expr.units import DURATION_UNITS, normalize_unit

FUNCTIONS = {"abs": 1, "min": 2, "max": 2}
# Limits that keep parsing, checking and evaluation far from Python's recursion limit, whatever
# the text: recipes' expressions are one line and a few operators deep.
MAX_LENGTH = 1000
"""Longest expression, in characters."""
MAX_NESTING = 24
"""Most brackets, 'not', '-' and function calls nested inside each other."""
MAX_HEIGHT = 64
"""Deepest operator tree (a chain a + b + c ... is as deep as it is long)."""
MAX_NUMBER = 1e15
"""Largest number literal (after duration units: 1d is 86400)."""
KEYWORDS = {"and", "or", "not", "true", "false"}
COMPARE = {"<", "<=", ">", ">=", "==", "!="}


class ExprError(ValueError):
    """A syntax, name, type or unit problem in an expression, at a 1-based ``column``."""

    def __init__(self, message: str, column: int | None = None) -> None:
        self.message = message
        self.column = column
        super().__init__(f"{message} at column {column}" if column else message)


@dataclass(frozen=True, slots=True)
class Num:
    value: int | float
    unit: str
    col: int


@dataclass(frozen=True, slots=True)
class Str:
    value: str
    col: int


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool
    col: int


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    col: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: Literal["-", "not"]
    operand: Node
    col: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node
    col: int


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Node, ...]
    col: int


Node = Num | Str | Bool | Name | Unary | Binary | Call

# ------------------------------------------------------------------------- tokenizer

_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_UNIT = re.compile(
    r"[ \t]*((?:%[A-Za-z]*|[A-Za-zµ°][A-Za-z0-9µ°]*)(?:/[A-Za-zµ°%][A-Za-z0-9µ°]*)*)"
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_OPS = ("<=", ">=", "==", "!=", "<", ">", "+", "-", "*", "/", "(", ")", ",")


@dataclass(frozen=True, slots=True)
class Token:
    kind: Literal["num", "str", "word", "op", "end"]
    text: str
    col: int
    unit: str = ""


def tokenize(text: str) -> list[Token]:
    """Split expression text into tokens; a number swallows the unit written after it."""
    out: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        col = i + 1
        if m := _NUMBER.match(text, i):
            i = m.end()
            unit = ""
            u = _UNIT.match(text, i)
            if u and u.group(1) not in KEYWORDS and text[u.end() : u.end() + 1] not in (".", "("):
                unit, i = u.group(1), u.end()
            out.append(Token("num", m.group(), col, unit))
        elif ch == '"':
            value, i = _string(text, i)
            out.append(Token("str", value, col))
        elif m := _WORD.match(text, i):
            out.append(Token("word", m.group(), col))
            i = m.end()
        elif op := next((o for o in _OPS if text.startswith(o, i)), None):
            out.append(Token("op", op, col))
            i += len(op)
        else:
            hint = " (strings are in double quotes)" if ch == "'" else ""
            raise ExprError(f"unexpected character {ch!r}{hint}", col)
    out.append(Token("end", "", len(text) + 1))
    return out


def _string(text: str, start: int) -> tuple[str, int]:
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(chars), i + 1
        else:
            chars.append(ch)
            i += 1
    raise ExprError("unterminated string", start + 1)


# ---------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0
        self.nesting = 0

    def enter(self, col: int) -> None:
        """One level deeper (a bracket, 'not', '-' or a call); refused beyond MAX_NESTING."""
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise ExprError(
                f"the expression is nested too deeply (more than {MAX_NESTING} levels of "
                "brackets, 'not', '-' or function calls)",
                col,
            )

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (text is None or tok.text == text)

    def expect_op(self, text: str) -> Token:
        if not self.at("op", text):
            raise ExprError(f"expected {text!r}, found {_describe(self.peek())}", self.peek().col)
        return self.take()

    def parse(self) -> Node:
        if self.at("end"):
            raise ExprError("the expression is empty", 1)
        node = self.or_()
        if not self.at("end"):
            tok = self.peek()
            raise ExprError(f"unexpected {tok.text!r} after a complete expression", tok.col)
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.at("word", "or"):
            col = self.take().col
            node = Binary("or", node, self.and_(), col)
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.at("word", "and"):
            col = self.take().col
            node = Binary("and", node, self.not_(), col)
        return node

    def not_(self) -> Node:
        if self.at("word", "not"):
            col = self.take().col
            self.enter(col)
            node = Unary("not", self.not_(), col)
            self.nesting -= 1
            return node
        return self.compare()

    def compare(self) -> Node:
        node = self.sum_()
        if self.peek().kind == "op" and self.peek().text in COMPARE:
            tok = self.take()
            node = Binary(tok.text, node, self.sum_(), tok.col)
            nxt = self.peek()
            if nxt.kind == "op" and nxt.text in COMPARE:
                raise ExprError("comparisons do not chain; join them with 'and'", nxt.col)
        return node

    def sum_(self) -> Node:
        node = self.term()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            tok = self.take()
            node = Binary(tok.text, node, self.term(), tok.col)
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek().kind == "op" and self.peek().text in ("*", "/"):
            tok = self.take()
            node = Binary(tok.text, node, self.unary(), tok.col)
        return node

    def unary(self) -> Node:
        if self.at("op", "-"):
            col = self.take().col
            self.enter(col)
            node = Unary("-", self.unary(), col)
            self.nesting -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return _number(tok)
        if tok.kind == "str":
            return Str(tok.text, tok.col)
        if tok.kind == "op" and tok.text == "(":
            self.enter(tok.col)
            node = self.or_()
            self.expect_op(")")
            self.nesting -= 1
            return node
        if tok.kind == "word":
            if tok.text in ("true", "false"):
                return Bool(tok.text == "true", tok.col)
            if tok.text in FUNCTIONS and self.at("op", "("):
                return self.call(tok)
            if tok.text in KEYWORDS:
                raise ExprError(f"'{tok.text}' needs an operand before it", tok.col)
            if "." not in tok.text:
                raise ExprError(
                    f"unknown name {tok.text!r}: names are role.tag, param.NAME, "
                    "phase.ID.NAME or run.elapsed; strings go in double quotes",
                    tok.col,
                )
            return Name(tok.text, tok.col)
        if tok.kind == "end":
            raise ExprError("the expression ends too early", tok.col)
        raise ExprError(f"unexpected {tok.text!r}", tok.col)

    def call(self, tok: Token) -> Node:
        self.enter(tok.col)
        self.expect_op("(")
        args: list[Node] = []
        if not self.at("op", ")"):
            args.append(self.or_())
            while self.at("op", ","):
                self.take()
                args.append(self.or_())
        self.expect_op(")")
        self.nesting -= 1
        if len(args) != FUNCTIONS[tok.text]:
            raise ExprError(
                f"{tok.text}() takes {FUNCTIONS[tok.text]} argument(s), not {len(args)}", tok.col
            )
        return Call(tok.text, tuple(args), tok.col)


def _describe(tok: Token) -> str:
    return "the end of the expression" if tok.kind == "end" else repr(tok.text)


def _number(tok: Token) -> Num:
    raw = tok.text
    value: int | float = int(raw) if raw.isdigit() else float(raw)
    unit = normalize_unit(tok.unit)
    if unit in DURATION_UNITS:
        value, unit = value * DURATION_UNITS[unit], "s"
    check_number(value, tok.col)
    return Num(value, unit, tok.col)


def check_number(value: int | float, col: int = 1) -> None:
    """``ExprError`` unless ``value`` is a finite number of at most ``MAX_NUMBER``."""
    if value != value or abs(value) == float("inf"):
        raise ExprError(f"{value} is not a finite number", col)
    if abs(value) > MAX_NUMBER:
        # an int of 500 digits cannot become a float to be shown with :g
        shown = f"of {len(str(abs(value)))} digits" if isinstance(value, int) else f"{value:g}"
        raise ExprError(f"the number {shown} is too large (at most {MAX_NUMBER:g})", col)


def height(node: Node) -> int:
    """The depth of the operator tree (a literal or name is 1), without recursion."""
    best = 0
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        here, depth = stack.pop()
        best = max(best, depth)
        if isinstance(here, Unary):
            stack.append((here.operand, depth + 1))
        elif isinstance(here, Binary):
            stack += [(here.left, depth + 1), (here.right, depth + 1)]
        elif isinstance(here, Call):
            stack += [(arg, depth + 1) for arg in here.args]
    return best


def parse_node(text: str) -> Node:
    """Parse expression text into an AST; ``ExprError`` with the column on a syntax error or
    when the text breaks a limit (``MAX_LENGTH``, ``MAX_NESTING``, ``MAX_HEIGHT``,
    ``MAX_NUMBER``)."""
    if len(text) > MAX_LENGTH:
        raise ExprError(f"the expression has {len(text)} characters; at most {MAX_LENGTH}", 1)
    node = _Parser(text).parse()
    if height(node) > MAX_HEIGHT:
        raise ExprError(f"the expression is more than {MAX_HEIGHT} operators deep; split it up", 1)
    return node
