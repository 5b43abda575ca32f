"""Loading recipes: YAML -> ``Recipe`` with every problem located; binding; parameters.

Public API::

    load_recipe(path, config: UnitConfig | None = None) -> Recipe
    parse_recipe(text, file="<string>", config=None) -> Recipe
        raise agent.text.yamlsource.DocumentError listing EVERY problem (file, line, path, message,
        hint): YAML syntax, unknown keys, wrong types, expression syntax (with column), and the
        semantic checks of ``agent.recipe.checks`` (with ``config``: against the unit's devices,
        roles bound to their default devices).
    bind(recipe, config, overrides: {role: device} | None = None) -> Binding
        raise BindError(problems: list[str]) naming every missing device, tag or method.
    Binding(recipe_id, devices: {role: device}, tags: {'role.tag': configured tag},
            methods: {'role.method': (device, method)}, units: {'role.tag': unit})
        .tag('reactor.temperature') -> 'temperature'    .device('reactor') -> 'bioreactor'
        .method('cell_processor.start_program') -> ('cell_processor', 'start_program')
        .value('reactor.temperature', 37.2) -> Quantity(37.2, 'degC')   (for expression envs)
    check_parameters(recipe, given: {name: text}) -> {name: str | int | float | bool}
        raise ParameterError(problems: list[str]): missing required, unknown, unparsable,
        outside limits or pattern; defaults fill the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from agent.config import UnitConfig
from agent.expr.expression import Value, as_value
from agent.recipe.checks import Finding, Parts, PNode, check
from agent.recipe.model import (
    PHASE_TYPES,
    BranchPhase,
    HoldAction,
    Monitor,
    Parameter,
    Phase,
    Recipe,
    RepeatPhase,
    Role,
)
from agent.text.patterns import PatternError, full_match
from agent.text.yamlsource import DocumentError, Loc, Located, Problem, parse_yaml, read_source

_PHASE: TypeAdapter[Phase] = TypeAdapter(Phase)
_ACTION: TypeAdapter[Any] = TypeAdapter(HoldAction)
_TYPES = ", ".join(PHASE_TYPES)
_HINTS = {
    "string_pattern_mismatch": "names are lower_snake_case, references role.tag or role.method, "
    "the recipe id lower-kebab-case",
    "too_short": "this list may not be empty",
    "literal_error": "see docs/recipes.md for the allowed values",
    "union_tag_not_found": f"phase types: {_TYPES}",
    "int_type": 'write a whole number such as 3 (not true, 1.5 or "3")',
    "float_type": 'write a number such as 37.5 (not true or "37.5")',
    "bool_type": "write true or false",
    "finite_number": "NaN and infinity (.nan, .inf, 1e400) are not numbers here",
}


class BindError(ValueError):
    """A recipe that cannot be bound to a unit's devices; ``problems`` names each gap."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ParameterError(ValueError):
    """Run parameters that cannot be used; ``problems`` says why for each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, config: UnitConfig | None = None) -> Recipe:
    """Load and check a recipe file; ``DocumentError`` lists every problem at once."""
    p = Path(path)
    try:
        text = read_source(p)
    except DocumentError as exc:
        raise DocumentError(
            [dataclasses.replace(e, line=e.line or 1) for e in exc.problems]
        ) from None
    return parse_recipe(text, str(p), config)


def parse_recipe(text: str, file: str = "<string>", config: UnitConfig | None = None) -> Recipe:
    """Check a recipe given as YAML text (see ``load_recipe``)."""
    located = _parse(text, file)
    data = located.data
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({data!r:.40})"
        raise DocumentError(
            [
                Problem(
                    file,
                    1,
                    "",
                    f"a recipe is a mapping of keys, not {kind}",
                    "start with format: 1, id, version, title, equipment, procedure",
                )
            ]
        )
    problems: list[Problem] = []
    recipe: Recipe | None = None
    if "source" in data:
        problems.append(
            Problem(
                file,
                located.line_of(("source",)),
                "source",
                "unknown key 'source'",
                "check the spelling; unknown keys are errors",
            )
        )
    try:
        recipe = Recipe.model_validate({**data, "source": file})
    except ValidationError as exc:
        problems += _pydantic_problems(located, exc)
    parts = parts_of(recipe) if recipe is not None else _salvage(data)
    devices = {role: r.device for role, r in parts.roles.items()}
    problems += [_locate(located, f) for f in check(parts, config, devices)]
    if problems or recipe is None:
        problems.sort(key=lambda p: p.line or 0)
        raise DocumentError(problems)
    return recipe


def _parse(text: str, file: str) -> Located:
    # a recipe means the same wherever it runs: no ${VAR} from the agent's environment
    try:
        return parse_yaml(text, file, expand_env=False)
    except DocumentError as exc:
        raise DocumentError(
            [dataclasses.replace(p, line=p.line or 1) for p in exc.problems]
        ) from None


def _pydantic_problems(located: Located, exc: ValidationError) -> list[Problem]:
    out = []
    for err, problem in zip(exc.errors(), located.problems_from(exc, _HINTS), strict=True):
        if err["type"] == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag", "?")
            path = f"{problem.path}.type"
            problem = dataclasses.replace(
                problem,
                path=path,
                message=f"unknown phase type {tag!r}",
                hint=f"phase types: {_TYPES}",
            )
        elif err["type"] == "union_tag_not_found":
            problem = dataclasses.replace(problem, message="a phase needs a type")
        out.append(dataclasses.replace(problem, line=problem.line or 1))
    return out


def _locate(located: Located, f: Finding) -> Problem:
    return Problem(
        located.file, located.line_of(f.loc) or 1, ".".join(map(str, f.loc)), f.message, f.hint
    )


# --------------------------------------------------------------------------- parts


def parts_of(recipe: Recipe) -> Parts:
    """The checkable parts of a valid recipe."""
    parts = Parts(roles=dict(recipe.equipment), params=dict(recipe.parameters))
    parts.actions = [(("hold_actions", i), a) for i, a in enumerate(recipe.hold_actions)]
    parts.monitors = [(("monitors", i), m) for i, m in enumerate(recipe.monitors)]
    for i, op in enumerate(recipe.procedure):
        loc: Loc = ("procedure", i)
        monitors = [((*loc, "monitors", j), m) for j, m in enumerate(op.monitors)]
        phases = [_node(p, (*loc, "phases", j)) for j, p in enumerate(op.phases)]
        parts.operations.append((loc, op.operation, monitors, phases))
    return parts


def _node(phase: Phase, loc: Loc) -> PNode:
    kids: list[tuple[str, list[Phase]]] = []
    if isinstance(phase, RepeatPhase):
        kids = [("phases", phase.phases)]
    elif isinstance(phase, BranchPhase):
        kids = [("then", phase.then), ("else", phase.else_)]
    return PNode(
        loc,
        phase,
        phase.id,
        [(k, [_node(p, (*loc, k, j)) for j, p in enumerate(ps)]) for k, ps in kids],
    )


def _items(raw: Any) -> list[tuple[Any, Any]]:
    return list(raw.items()) if isinstance(raw, dict) else []


def _enum(raw: Any) -> list[tuple[int, Any]]:
    return list(enumerate(raw)) if isinstance(raw, list) else []


def _salvage(data: dict[str, Any]) -> Parts:
    """The parts of a broken recipe that validate on their own; names of broken roles,
    parameters and phases are tolerated so that one mistake is not reported many times."""
    parts = Parts()
    for role, raw in _items(data.get("equipment")):
        try:
            parts.roles[role] = Role.model_validate(raw)
        except ValidationError:
            parts.broken.add(str(role))
    for name, raw in _items(data.get("parameters")):
        try:
            parts.params[name] = Parameter.model_validate(raw)
        except ValidationError:
            parts.broken.add(f"param.{name}")
    for i, raw in _enum(data.get("hold_actions")):
        with contextlib.suppress(ValidationError):
            parts.actions.append((("hold_actions", i), _ACTION.validate_python(raw)))
    parts.monitors = _monitors(data.get("monitors"), ("monitors",))
    for i, op in _enum(data.get("procedure")):
        if isinstance(op, dict):
            loc: Loc = ("procedure", i)
            name = op.get("operation")
            parts.operations.append(
                (
                    loc,
                    name if isinstance(name, str) else None,
                    _monitors(op.get("monitors"), (*loc, "monitors")),
                    _raw_nodes(op.get("phases"), (*loc, "phases"), parts),
                )
            )
    return parts


def _monitors(raw: Any, loc: Loc) -> list[tuple[Loc, Monitor]]:
    out = []
    for i, m in _enum(raw):
        with contextlib.suppress(ValidationError):
            out.append(((*loc, i), Monitor.model_validate(m)))
    return out


def _raw_nodes(raw: Any, loc: Loc, parts: Parts) -> list[PNode]:
    nodes = []
    for j, item in _enum(raw):
        here: Loc = (*loc, j)
        try:
            nodes.append(_node(_PHASE.validate_python(item), here))
            continue
        except ValidationError:
            pass
        if not isinstance(item, dict):
            continue
        pid = item.get("id") if isinstance(item.get("id"), str) else None
        if pid is not None:
            parts.broken.add(f"phase.{pid}")
        kids = [(k, _raw_nodes(item.get(k), (*here, k), parts)) for k in ("phases", "then", "else")]
        nodes.append(PNode(here, None, pid, kids))
    return nodes


# --------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class Binding:
    """A recipe's roles bound to a unit's devices."""

    recipe_id: str
    devices: Mapping[str, str]
    tags: Mapping[str, str]
    methods: Mapping[str, tuple[str, str]]
    units: Mapping[str, str]

    def device(self, role: str) -> str:
        """The configured device bound to ``role``."""
        return self.devices[role]

    def tag(self, ref: str) -> str:
        """The configured tag name for ``role.tag``; ``KeyError`` naming it when unknown."""
        try:
            return self.tags[ref]
        except KeyError:
            raise KeyError(f"recipe {self.recipe_id!r} does not declare the tag {ref!r}") from None

    def method(self, ref: str) -> tuple[str, str]:
        """``(device, method)`` for ``role.method``."""
        try:
            return self.methods[ref]
        except KeyError:
            raise KeyError(
                f"recipe {self.recipe_id!r} does not declare the method {ref!r}"
            ) from None

    def value(self, ref: str, raw: bool | int | float | str) -> Value:
        """A tag's raw value as an expression value, with the tag's unit."""
        return as_value(raw, self.units.get(ref, ""))


def bind(recipe: Recipe, config: UnitConfig, overrides: Mapping[str, str] | None = None) -> Binding:
    """Bind roles to devices (defaults from the recipe, ``overrides`` by role) and check the
    recipe against them; ``BindError`` names everything missing or out of limits."""
    overrides = dict(overrides or {})
    problems = [
        f"unknown role {role!r} in the device choice; recipe roles: "
        f"{', '.join(sorted(recipe.equipment)) or 'none'}"
        for role in overrides
        if role not in recipe.equipment
    ]
    devices = {role: overrides.get(role, r.device) for role, r in recipe.equipment.items()}
    for f in check(parts_of(recipe), config, devices):
        where = ".".join(map(str, f.loc))
        problems.append(f"{where}: {f.message}" + (f" (hint: {f.hint})" if f.hint else ""))
    if problems:
        raise BindError(problems)
    tags, methods, units = {}, {}, {}
    for role, r in recipe.equipment.items():
        dev = config.devices[devices[role]]
        for t in r.tags:
            tags[f"{role}.{t}"] = t
            units[f"{role}.{t}"] = dev.tags[t].unit
        for m in r.methods:
            methods[f"{role}.{m}"] = (devices[role], m)
    return Binding(recipe.id, devices, tags, methods, units)


# ------------------------------------------------------------------------ parameters

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def check_parameters(
    recipe: Recipe, given: Mapping[str, Any]
) -> dict[str, str | int | float | bool]:
    """Typed run parameters from text (defaults fill the gaps); ``ParameterError`` lists every
    missing, unknown, unparsable or out-of-limits value."""
    problems = [
        f"unknown parameter {name!r}; parameters: {', '.join(sorted(recipe.parameters)) or 'none'}"
        for name in given
        if name not in recipe.parameters
    ]
    out: dict[str, str | int | float | bool] = {}
    for name, p in recipe.parameters.items():
        if name not in given:
            if p.required:
                about = f" ({p.description})" if p.description else ""
                problems.append(f"missing required parameter {name!r}{about}")
            elif p.default is not None:
                out[name] = p.default
            continue
        try:
            out[name] = _typed(name, p, given[name])
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ParameterError(problems)
    return out


def _typed(name: str, p: Parameter, raw: Any) -> str | int | float | bool:
    text = str(raw).strip()
    value: str | int | float | bool
    if p.type == "str":
        value = str(raw)
        try:
            matches = not p.pattern or full_match(p.pattern, value)
        except PatternError as exc:
            raise ValueError(f"parameter {name!r}: {exc}") from None
        if not matches:
            raise ValueError(f"parameter {name!r}: {value!r} does not match {p.pattern!r}")
        return value
    if p.type == "bool":
        if isinstance(raw, bool) or text.lower() in _TRUE | _FALSE:
            return raw if isinstance(raw, bool) else text.lower() in _TRUE
        raise ValueError(f"parameter {name!r}: {text!r} is not true or false")
    try:
        value = int(text) if p.type == "int" else float(text)
    except ValueError:
        raise ValueError(
            f"parameter {name!r}: {text!r} is not {'an int' if p.type == 'int' else 'a number'}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"parameter {name!r}: {text!r} is not a finite number")
    if p.limits and not p.limits[0] <= value <= p.limits[1]:
        unit = f" {p.unit}" if p.unit else ""
        raise ValueError(
            f"parameter {name!r}: {value:g}{unit} is outside the limits "
            f"[{p.limits[0]:g}, {p.limits[1]:g}]{unit}"
        )
    return value
