"""The bodies the local API accepts, checked before anything reaches the engine or the journal.

``parse(raw, Model)`` turns the raw bytes of a request into a frozen model or raises
``BodyInvalid`` whose ``problems`` each name the field and what is wrong
(``params.coi_id: at most 256 characters``). It refuses, before any handler sees them:

- bodies over ``MAX_BODY`` bytes, bytes that are not UTF-8, text that is not JSON, JSON nested
  deeper than ``MAX_DEPTH``, keys given twice, and a document that is not an object;
- ``NaN``, ``Infinity`` and numbers too large for a double, in whichever field they are;
- unknown fields, missing fields, wrong types (no coercion: ``"5"`` is not a number, ``true``
  is not an integer), identifiers that are not identifiers;
- free text (``why``, ``reason``) over ``MAX_TEXT`` characters and values (parameters, prompt
  inputs) over ``MAX_VALUE``, and any text holding control, format (bidi overrides,
  zero-width) or surrogate characters, since all of them end up in the journal.

Problems never quote the body: a field is named by its path (attacker-chosen keys shortened
and escaped), and what is wrong is said in our words.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.functional_validators import AfterValidator, PlainValidator

from agent.recipe.store import RecipeNameInvalid, check_name, shown
from agent.text.safe import plain_text_problem

MAX_BODY = 64 * 1024
MAX_DEPTH = 8
MAX_TEXT = 500
MAX_VALUE = 256
MAX_ITEMS = 64
MAX_PASSWORD = 1024
_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_USER = r"^[A-Za-z][A-Za-z0-9._-]{1,31}$"
COMMANDS = ("hold", "restart", "pause", "resume", "stop", "abort", "reset")


class BodyInvalid(Exception):
    """A request body that cannot be accepted; ``problems`` names every field and why."""

    def __init__(self, problems: list[str], status: int = 400) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.status = status


def clean_text(value: str) -> str:
    """``value`` if it holds no control, format, surrogate or unassigned character."""
    problem = plain_text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _scalar(value: Any) -> str | int | float | bool:
    """A parameter or input value: a short clean string, a bool, or a finite number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise ValueError("the integer is too large (at most 2^53)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the number must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            raise ValueError(f"{len(value)} characters; at most {MAX_VALUE}")
        return clean_text(value)
    raise ValueError(f"must be a string, number or boolean, not {_json_type(value)}")


Text = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(clean_text)]
Reason = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_TEXT), AfterValidator(clean_text)
]
Key = Annotated[str, StringConstraints(pattern=_ID)]
Scalar = Annotated[str | int | float | bool, PlainValidator(_scalar)]


def _recipe_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string (a recipe name), not {_json_type(value)}")
    try:
        return check_name(value)
    except RecipeNameInvalid as exc:
        raise ValueError(str(exc)) from None


RecipeName = Annotated[str, PlainValidator(_recipe_name)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StartBody(_Body):
    """``POST /api/v1/run/start``: a recipe of the unit's store, by name."""

    recipe: RecipeName
    params: dict[Key, Scalar] = Field(default_factory=dict, max_length=MAX_ITEMS)
    bind: dict[Key, Key] = Field(default_factory=dict, max_length=MAX_ITEMS)
    why: Text = ""


class CommandBody(_Body):
    """``POST /api/v1/run/command``."""

    command: Literal["hold", "restart", "pause", "resume", "stop", "abort", "reset"]
    why: Text = ""


class SignatureBody(_Body):
    """One signature of an answer: the signer and their password, again."""

    meaning: Literal["performed", "verified", "reviewed", "approved"]
    user: Annotated[str, StringConstraints(pattern=_USER)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD)]


class AnswerBody(_Body):
    """``POST /api/v1/run/answer``."""

    phase: Key
    inputs: dict[Key, Scalar] = Field(default_factory=dict, max_length=MAX_ITEMS)
    signatures: list[SignatureBody] = Field(default_factory=list, max_length=4)


class AckBody(_Body):
    """``POST /api/v1/alarms/ack``."""

    alarm: Key
    reason: Reason


class ShelveBody(_Body):
    """``POST /api/v1/alarms/shelve``: minutes are checked against the alarm's maximum too."""

    alarm: Key
    reason: Reason
    minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60, allow_inf_nan=False)] = 60.0


M = TypeVar("M", bound=_Body)


def parse(raw: bytes, model: type[M]) -> M:
    """The body ``raw`` as ``model``; ``BodyInvalid`` naming every field and why."""
    return validate(decode(raw), model)


def decode(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw`` (see the module docstring for what is refused)."""
    if len(raw) > MAX_BODY:
        raise BodyInvalid([f"body: {len(raw)} bytes; at most {MAX_BODY}"], 413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyInvalid([f"body: not UTF-8 (byte {exc.start + 1})"]) from None
    if not text.strip():
        raise BodyInvalid(["body: empty; send a JSON object"])
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise BodyInvalid([f"body: JSON nested {depth} deep; at most {MAX_DEPTH}"])
    try:
        # NaN, Infinity and 1e999 become non-finite floats that every field refuses by name
        data = json.loads(text, object_pairs_hook=_unique)
    except BodyInvalid:
        raise
    except json.JSONDecodeError as exc:
        raise BodyInvalid(
            [f"body: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
        ) from None
    except (ValueError, RecursionError):  # e.g. an integer of more than 4300 digits
        raise BodyInvalid(["body: not JSON this API accepts (a number too long?)"]) from None
    if not isinstance(data, dict):
        raise BodyInvalid([f"body: must be a JSON object, not {_json_type(data)}"])
    return data


def validate(data: dict[str, Any], model: type[M]) -> M:
    """``data`` checked as ``model``; ``BodyInvalid`` naming every field and why."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            where = _where(error["loc"]) or "body"
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "required"
            elif error["type"] == "extra_forbidden":
                message = f"not a field of this request (fields: {', '.join(model.model_fields)})"
            problems.append(f"{where}: {message}")
        raise BodyInvalid(problems) from None


def _where(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part == "[key]":
            parts.append("(key)")
        else:
            text = str(part)
            safe = text.isascii() and text.replace("_", "a").isalnum() and len(text) <= 64
            parts.append(("." if parts else "") + (text if safe else shown(text, 32)))
    return "".join(parts)


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyInvalid([f"body: key {shown(key, 32)} given twice"])
        out[key] = value
    return out


def _depth(text: str) -> int:
    """How deeply arrays and objects nest (brackets inside strings do not count)."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
