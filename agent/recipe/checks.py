"""Semantic checks of a recipe: what pydantic's per-field validation cannot see.

Unique ids; names in expressions refer to declared role tags, parameters, earlier phases'
inputs/results and ``run.*``; conditions are conditions and units agree; with a unit
configuration also: roles' devices, tags and methods exist, ``set``/``ramp``/``transfer``
targets are writable and literal values (and parameters' limits) lie inside the tag's limits
(a dry check against device limits, nothing is touched).

Works on ``Parts``: the pieces of a recipe that validated (``recipe_loader`` salvages them from a
broken document so that every problem is reported at once). ``check(parts, config, devices)``
returns ``Finding``s, each with the data path of the problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.config import TagBase, UnitConfig
from agent.expr.expression import ANY, BOOL, DURATION, Expr, ExprError, Quantity, Type, type_of
from agent.expr.units import explain_mismatch
from agent.recipe.fields import MAX_DURATION
from agent.recipe.model import (
    BranchPhase,
    CallAction,
    CallPhase,
    Input,
    Monitor,
    Parameter,
    Phase,
    PromptPhase,
    RampPhase,
    RepeatPhase,
    Role,
    SamplePhase,
    SetAction,
    SetPhase,
    TimerPhase,
    TransferPhase,
    WaitPhase,
)
from agent.text.yamlsource import Loc

_NAMES_HINT = "names are role.tag (tags listed under equipment), param.NAME, phase.ID.NAME, run.*"


@dataclass(frozen=True, slots=True)
class Finding:
    """A semantic problem at a data path."""

    loc: Loc
    message: str
    hint: str = ""


@dataclass
class PNode:
    """A phase in the tree: its model, or ``None`` when it did not validate (then ``id`` and
    the nested lists come from the raw data)."""

    loc: Loc
    phase: Phase | None
    id: str | None
    kids: list[tuple[str, list[PNode]]] = field(default_factory=list)


@dataclass
class Parts:
    """The pieces of a recipe that validated; names of broken ones are tolerated."""

    roles: dict[str, Role] = field(default_factory=dict)
    params: dict[str, Parameter] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # 'role', 'param.x', 'phase.x' that failed
    actions: list[tuple[Loc, SetAction | CallAction]] = field(default_factory=list)
    monitors: list[tuple[Loc, Monitor]] = field(default_factory=list)
    operations: list[tuple[Loc, str | None, list[tuple[Loc, Monitor]], list[PNode]]] = field(
        default_factory=list
    )


def check(parts: Parts, config: UnitConfig | None, devices: dict[str, str]) -> list[Finding]:
    """Every semantic problem; ``devices`` binds roles to configured devices."""
    return _Checker(parts, config, devices).run()


class _Checker:
    def __init__(self, parts: Parts, config: UnitConfig | None, devices: dict[str, str]) -> None:
        self.p = parts
        self.config = config
        self.devices = devices
        self.out: list[Finding] = []
        self.seen: dict[str, dict[str, Type]] = {}  # earlier phases -> their output names
        self.ids: dict[str, Loc] = {}

    def run(self) -> list[Finding]:
        self.roles()
        for loc, action in self.p.actions:
            self.action(loc, action)
        self.monitors(self.p.monitors, set())
        names: dict[str, Loc] = {}
        outer = {m.id for _, m in self.p.monitors}
        for loc, name, monitors, phases in self.p.operations:
            if name is not None and name in names:
                self.add((*loc, "operation"), f"operation {name!r} is already used", "")
            names.setdefault(name or "", loc)
            self.monitors(monitors, outer)
            for node in phases:
                self.node(node, False)
        return self.out

    def add(self, loc: Loc, message: str, hint: str = "") -> None:
        self.out.append(Finding(loc, message, hint))

    # ----------------------------------------------------------------- equipment

    def roles(self) -> None:
        if self.config is None:
            return
        for role, spec in self.p.roles.items():
            loc: Loc = ("equipment", role)
            dev_name = self.devices.get(role, spec.device)
            dev = self.config.devices.get(dev_name)
            if dev is None:
                known = ", ".join(sorted(self.config.devices))
                self.add(
                    (*loc, "device"),
                    f"role {role!r}: no device {dev_name!r} in the unit configuration",
                    f"configured devices: {known}",
                )
                continue
            for i, tag in enumerate(spec.tags):
                if tag not in dev.tags:
                    self.add(
                        (*loc, "tags", i),
                        f"role {role!r}: device {dev_name!r} has no tag {tag!r}",
                        f"its tags: {', '.join(sorted(dev.tags))}",
                    )
            methods = getattr(dev, "methods", {})
            for i, method in enumerate(spec.methods):
                if method not in methods:
                    self.add(
                        (*loc, "methods", i),
                        f"role {role!r}: device {dev_name!r} has no method {method!r}",
                        f"its methods: {', '.join(sorted(methods)) or 'none'}",
                    )

    def tag_def(self, ref: str) -> TagBase | None:
        role, _, tag = ref.partition(".")
        if self.config is None or role not in self.p.roles:
            return None
        dev = self.config.devices.get(self.devices.get(role, self.p.roles[role].device))
        return dev.tags.get(tag) if dev is not None else None

    def ref(self, loc: Loc, ref: str, kind: str = "tags") -> bool:
        """Is ``role.tag`` (or ``role.method``) declared? Reports it when not."""
        role, _, name = ref.partition(".")
        if role in self.p.broken:
            return False
        spec = self.p.roles.get(role)
        if spec is None:
            roles = ", ".join(sorted(self.p.roles)) or "none"
            self.add(loc, f"unknown role {role!r} in {ref!r}", f"equipment roles: {roles}")
            return False
        if name not in getattr(spec, kind):
            what = "tag" if kind == "tags" else "method"
            self.add(
                loc,
                f"role {role!r} does not list the {what} {name!r}",
                f"add it to equipment.{role}.{kind}",
            )
            return False
        return True

    # --------------------------------------------------------------- expressions

    def expr(
        self,
        loc: Loc,
        e: Expr | None,
        want: Type | None,
        *,
        repeat: bool = False,
        phases: bool = True,
    ) -> Type | None:
        """Check names and types of an expression; its type, or None when it is broken."""
        if e is None:
            return None
        ok = True
        for name, col in e.occurrences():
            problem = self.name_problem(name, repeat, phases)
            if problem:
                self.add(loc, f"{problem} at column {col} in {e.source!r}", _NAMES_HINT)
                ok = False
        if not ok:
            return None
        try:
            t = e.check(lambda n: self.name_type(n))
        except ExprError as exc:
            self.add(loc, f"{exc} in {e.source!r}")
            return None
        if want is not None and t.kind not in ("any", want.kind):
            self.add(loc, f"{e.source!r} is {t}, but {_want(want)} is needed here")
        elif want is not None and want.kind == "num" and t.kind == "num":
            why = explain_mismatch(t.unit, want.unit)
            if why:
                self.add(loc, f"{e.source!r}: {why}")
        return t

    def name_problem(self, name: str, repeat: bool, phases: bool) -> str | None:
        head, _, rest = name.partition(".")
        if head == "run":
            if rest == "elapsed" or (rest == "iteration" and repeat):
                return None
            if rest == "iteration":
                return "run.iteration is only known inside a repeat"
            return f"unknown name {name!r} (run.elapsed, run.iteration)"
        if head == "param":
            if rest in self.p.params or name in self.p.broken:
                return None
            return f"unknown parameter {name!r}"
        if head == "phase":
            pid, _, out = rest.partition(".")
            if not phases:
                return f"{name!r}: monitors and hold actions cannot read phase values"
            if f"phase.{pid}" in self.p.broken:
                return None
            if pid not in self.seen:
                return f"{name!r}: no earlier phase {pid!r}"
            if out not in self.seen[pid] and not (out.startswith("out") and "*" in self.seen[pid]):
                known = ", ".join(sorted(k for k in self.seen[pid] if k != "*")) or "none"
                return f"{name!r}: phase {pid!r} has no value {out!r} (it has: {known})"
            return None
        if head in self.p.broken:
            return None
        if head not in self.p.roles:
            return f"unknown name {name!r}"
        if "." in rest or rest not in self.p.roles[head].tags:
            return f"{name!r}: role {head!r} does not list the tag {rest!r}"
        return None

    def name_type(self, name: str) -> Type:
        head, _, rest = name.partition(".")
        if name == "run.elapsed":
            return DURATION
        if name == "run.iteration":
            return Type("num", "")
        if head == "param" and rest in self.p.params:
            return type_of(self.p.params[rest].type, self.p.params[rest].unit)
        if head == "phase":
            pid, _, out = rest.partition(".")
            return self.seen.get(pid, {}).get(out, ANY)
        tag = self.tag_def(name)
        return type_of(tag.type, tag.unit) if tag is not None else ANY

    # ------------------------------------------------------------------- writes

    def write(
        self,
        loc: Loc,
        ref: str,
        value: Expr | None,
        *,
        repeat: bool,
        phases: bool,
        need_bool: bool = False,
    ) -> None:
        """A value written to a tag: declared, writable, of the tag's type, inside its limits."""
        declared = self.ref(loc, ref)
        tag = self.tag_def(ref) if declared else None
        want = type_of(tag.type, tag.unit) if tag is not None else (BOOL if need_bool else None)
        self.expr(loc, value, want, repeat=repeat, phases=phases)
        if tag is None:
            return
        if not tag.writable:
            self.add(loc, f"{ref} is not writable in the unit configuration")
        if need_bool and tag.type != "bool":
            self.add(loc, f"{ref} is a {tag.type} tag; a pump's run tag is a bool")
        if value is None or tag.limits is None:
            return
        lo, hi = tag.limits
        const = value.constant()
        if isinstance(const, Quantity) and not lo <= const.value <= hi:
            self.add(
                loc,
                f"{const} is outside the limits [{lo:g}, {hi:g}] of {ref}",
                "a dry check against the device limits in the unit configuration",
            )
        names = value.names()
        if len(names) == 1 and value.source.strip() in names and value.source.startswith("param."):
            param = self.p.params.get(value.source.strip()[6:])
            if param is not None and param.limits is not None:
                plo, phi = param.limits
                if plo < lo or phi > hi:
                    self.add(
                        loc,
                        f"{value.source} may be [{plo:g}, {phi:g}], beyond the limits "
                        f"[{lo:g}, {hi:g}] of {ref}",
                        "narrow the parameter's limits",
                    )

    def action(self, loc: Loc, action: SetAction | CallAction) -> None:
        if isinstance(action, SetAction):
            self.write((*loc, "value"), action.set, action.value, repeat=False, phases=False)
        else:
            self.ref((*loc, "call"), action.call, "methods")
            for i, arg in enumerate(action.args):
                self.expr((*loc, "args", i), arg, None, phases=False)

    def monitors(self, monitors: list[tuple[Loc, Monitor]], outer: set[str]) -> None:
        seen = set(outer)
        for loc, m in monitors:
            if m.id in seen:
                self.add((*loc, "id"), f"monitor id {m.id!r} is already used in this scope")
            seen.add(m.id)
            self.expr((*loc, "when"), m.when, BOOL, phases=False)
            self.expr((*loc, "clear"), m.clear, BOOL, phases=False)
            lost = m.device_lost
            if lost is not None and lost not in self.p.roles and lost not in self.p.broken:
                self.add(
                    (*loc, "device_lost"),
                    f"unknown role {m.device_lost!r}",
                    f"equipment roles: {', '.join(sorted(self.p.roles)) or 'none'}",
                )

    # ------------------------------------------------------------------- phases

    def node(self, node: PNode, repeat: bool) -> None:
        if node.id is not None:
            if node.id in self.ids:
                self.add(
                    (*node.loc, "id"),
                    f"phase id {node.id!r} is already used",
                    "phase ids are unique in a recipe",
                )
            self.ids.setdefault(node.id, node.loc)
        ph = node.phase
        inside = repeat or isinstance(ph, RepeatPhase)
        if isinstance(ph, RepeatPhase):
            self.expr((*node.loc, "while"), ph.while_, BOOL, repeat=True)
        elif isinstance(ph, BranchPhase):
            self.expr((*node.loc, "if"), ph.if_, BOOL, repeat=repeat)
        elif ph is not None:
            self.phase(node.loc, ph, repeat)
        for _, kids in node.kids:
            for kid in kids:
                self.node(kid, inside)
        if isinstance(ph, RepeatPhase):
            self.expr((*node.loc, "until"), ph.until, BOOL, repeat=True)
        if node.id is not None:
            self.seen[node.id] = _outputs(ph)

    def phase(self, loc: Loc, ph: Phase, repeat: bool) -> None:
        r = repeat
        if isinstance(ph, SetPhase):
            for ref, value in ph.values.items():
                self.write((*loc, "values", ref), ref, value, repeat=r, phases=True)
        elif isinstance(ph, WaitPhase):
            self.expr((*loc, "until"), ph.until, BOOL, repeat=r)
        elif isinstance(ph, RampPhase):
            self.write((*loc, "to"), ph.tag, ph.to, repeat=r, phases=True)
        elif isinstance(ph, TimerPhase):
            self.expr((*loc, "duration"), ph.duration, DURATION, repeat=r)
            const = ph.duration.constant()
            if isinstance(const, Quantity) and const.value <= 0:
                self.add((*loc, "duration"), f"a duration must be positive, not {const}")
            elif isinstance(const, Quantity) and const.value > MAX_DURATION:
                self.add((*loc, "duration"), f"{const} is longer than a year (at most 366d)")
        elif isinstance(ph, PromptPhase):
            for name, inp in ph.inputs.items():
                self.expr((*loc, "inputs", name, "equals"), inp.equals, _input_type(inp), repeat=r)
        elif isinstance(ph, CallPhase):
            self.ref((*loc, "method"), ph.method, "methods")
            for i, arg in enumerate(ph.args):
                self.expr((*loc, "args", i), arg, None, repeat=r)
            self.expr((*loc, "until"), ph.until, BOOL, repeat=r)
            self.expr((*loc, "fail_if"), ph.fail_if, BOOL, repeat=r)
        elif isinstance(ph, TransferPhase):
            self.transfer(loc, ph, r)

    def transfer(self, loc: Loc, ph: TransferPhase, r: bool) -> None:
        if ph.pump not in self.p.roles and ph.pump not in self.p.broken:
            self.add(
                (*loc, "pump"),
                f"unknown role {ph.pump!r}",
                f"equipment roles: {', '.join(sorted(self.p.roles)) or 'none'}",
            )
            return
        self.write((*loc, "speed"), ph.speed_tag, ph.speed, repeat=r, phases=True)
        self.write((*loc, "run_tag"), ph.run_tag, None, repeat=r, phases=True, need_bool=True)
        self.expr((*loc, "until"), ph.until, BOOL, repeat=r)
        if ph.stall is not None and self.ref((*loc, "stall", "tag"), ph.stall.tag):
            tag = self.tag_def(ph.stall.tag)
            want = type_of(tag.type, tag.unit) if tag is not None else Type("num", None)
            self.expr((*loc, "stall", "min_change"), ph.stall.min_change, want, repeat=r)


def _want(t: Type) -> str:
    return {"bool": "a condition (true/false)", "str": "a string"}.get(t.kind, str(t))


def _input_type(inp: Input) -> Type:
    return type_of(inp.type, inp.unit)


def _outputs(ph: Phase | None) -> dict[str, Type]:
    if isinstance(ph, PromptPhase):
        return {k: _input_type(v) for k, v in ph.inputs.items()}
    if isinstance(ph, SamplePhase):
        return {k: _input_type(v) for k, v in ph.results.items()}
    if isinstance(ph, CallPhase):
        return {"*": ANY}
    return {}


def iter_nodes(nodes: list[PNode]) -> Iterator[PNode]:
    """Every node at every depth, in document order."""
    for node in nodes:
        yield node
        for _, kids in node.kids:
            yield from iter_nodes(kids)
