"""What expressions and monitors see of a run: tags through roles, parameters, phase outputs.

``RunEnv.value(name)`` resolves a dotted name to an expression ``Value``; a tag with no good
reading raises ``Unknown`` (a monitor then neither trips nor clears, and a wait keeps waiting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.config import UnitConfig
from agent.expr.expression import Expr
from agent.expr.units import Quantity, Value, as_value
from agent.recipe.model import Recipe
from drivers.base import Quality, Sample


class Unknown(LookupError):
    """A name whose value is not known now (no reading, or a reading of bad quality)."""


class RunEnv:
    """Name resolution for one run."""

    def __init__(
        self,
        recipe: Recipe,
        config: UnitConfig,
        binding: dict[str, str],
        params: dict[str, Any],
        latest: Mapping[str, Sample],
        outputs: dict[str, dict[str, Any]],
        elapsed: Callable[[], float],
    ) -> None:
        self.recipe = recipe
        self.config = config
        self.binding = binding
        self.params = params
        self.latest = latest
        self.outputs = outputs
        self.elapsed = elapsed
        self.iterations: list[int] = []  # loop counters of the enclosing repeats, innermost last

    def tag(self, ref: str) -> str:
        """The configured tag name of ``role.tag`` (the recipe names tags of the bound device)."""
        role, tag = ref.split(".", 1)
        if role not in self.binding:
            raise KeyError(f"{ref}: role {role!r} is not bound to a device")
        return tag

    def device(self, role: str) -> str:
        return self.binding[role]

    def value(self, name: str) -> Value:
        head, _, rest = name.partition(".")
        if head == "param":
            spec = self.recipe.parameters[rest]
            return as_value(self.params[rest], spec.unit)
        if head == "run":
            if rest == "elapsed":
                return Quantity(self.elapsed(), "s")
            if rest == "iteration":
                return Quantity(self.iterations[-1] if self.iterations else 0)
            raise KeyError(name)
        if head == "phase":
            phase, _, field = rest.partition(".")
            if phase not in self.outputs or field not in self.outputs[phase]:
                raise Unknown(f"{name}: phase {phase!r} has not given {field!r} yet")
            raw = self.outputs[phase][field]
            unit = _output_unit(self.recipe, phase, field)
            return as_value(raw, unit)
        tag = self.tag(name)
        sample = self.latest.get(tag)
        if sample is None or sample.quality is Quality.BAD or sample.value is None:
            raise Unknown(f"{name}: no good reading of tag {tag!r}")
        _, definition = self.config.tag(tag)
        return as_value(sample.value, definition.unit)

    def used_tags(self) -> set[str]:
        """The configured tags the recipe's roles declare."""
        return {t for role in self.recipe.equipment.values() for t in role.tags}

    def test(self, expr: Expr) -> bool | None:
        """A condition's truth, or ``None`` when an input is unknown."""
        try:
            return expr.test(self.value)
        except Unknown:
            return None

    def plain(self, expr: Expr) -> bool | int | float | str:
        """An expression's value as a plain Python value (for writes and method arguments)."""
        v = expr.evaluate(self.value)
        return v.value if isinstance(v, Quantity) else v


def _output_unit(recipe: Recipe, phase_id: str, field: str) -> str:
    try:
        phase = recipe.phase(phase_id)
    except KeyError:
        return ""
    specs = getattr(phase, "inputs", None) or getattr(phase, "results", None) or {}
    spec = specs.get(field)
    return spec.unit if spec is not None else ""
