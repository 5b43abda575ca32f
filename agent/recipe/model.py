"""Typed recipe models (format 1; see docs/recipes.md and the contract in the module below).

Frozen pydantic v2 models, unknown keys forbidden. Expressions are parsed while validating and
stored as
``agent.expr.expression.Expr`` objects (``.evaluate(env)``, ``.test(env)``, ``.names()``...);
they serialize back to their source text. Durations are stored as float seconds.

Public API (what the engine reads)::

    Recipe(format, id, version, title, product, master_file, equipment: {role: Role},
           parameters: {name: Parameter}, hold_actions: [SetAction | CallAction],
           monitors: [Monitor], procedure: [Operation], source)
      .all_phases() -> list[Phase]            every phase at every depth, document order
      .phase(id) -> Phase                      KeyError when unknown
    Role(device, tags: [str], methods: [str])
    Parameter(type: 'str'|'float'|'int'|'bool', unit, required, default, limits, pattern,
              description)
    Input(type, label, unit, limits, pattern, equals: Expr | None, required)   prompt / sample
    Monitor(id, when: Expr | None, device_lost: role | None, clear: Expr | None,
            on_delay: s, off_delay: s, priority, action, message)
    SetAction(set: 'role.tag', value: Expr)      CallAction(call: 'role.method', args: [Expr])
    Operation(operation, title, monitors: [Monitor], phases: [Phase])
    Phase = SetPhase | WaitPhase | RampPhase | TimerPhase | PromptPhase | CallPhase
          | TransferPhase | SamplePhase | RepeatPhase | BranchPhase     (discriminator ``type``)
      every phase: id, title, type
      SetPhase(values: {'role.tag': Expr}, tolerance)
      WaitPhase(until: Expr, hold_for: s | None, timeout: s | None, on_timeout)
      RampPhase(tag: 'role.tag', to: Expr, over: s, step: s | None)
      TimerPhase(duration: Expr)                      -> expr.seconds(env)
      PromptPhase(text, inputs: {name: Input}, signatures: [meaning])
      CallPhase(method: 'role.method', args: [Expr], until, fail_if, timeout, on_timeout)
      TransferPhase(pump: role, speed_tag, run_tag, speed: Expr, until: Expr,
                    stall: Stall(tag, min_change: Expr, within: s) | None, timeout, on_timeout)
      SamplePhase(results: {name: Input}, volume_ml, wait_for_results)
      RepeatPhase(until: Expr | None, while_: Expr | None  [YAML key ``while``],
                  max_iterations, phases)
      BranchPhase(if_: Expr [YAML ``if``], then: [Phase], else_: [Phase] [YAML ``else``])
    children(phase) -> list[Phase]                   nested phases of a repeat or branch
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from agent.recipe.fields import (
    Delay,
    Duration,
    ExprField,
    Flag,
    Float,
    Input,
    Int,
    Meaning,
    MethodRef,
    Name,
    OnTimeout,
    Parameter,
    Strict,
    TagRef,
    Typed,
    ValueField,
)

__all__ = [
    "PHASE_TYPES",
    "BranchPhase",
    "CallAction",
    "CallPhase",
    "Delay",
    "Duration",
    "ExprField",
    "HoldAction",
    "Input",
    "Monitor",
    "Operation",
    "Parameter",
    "Phase",
    "PromptPhase",
    "RampPhase",
    "Recipe",
    "RepeatPhase",
    "Role",
    "SamplePhase",
    "SetAction",
    "SetPhase",
    "Stall",
    "TagRef",
    "TimerPhase",
    "TransferPhase",
    "Typed",
    "ValueField",
    "WaitPhase",
    "children",
    "walk_phases",
]


class Role(Strict):
    """An equipment role: the configured device it binds to by default, the tags it reads or
    writes and the methods it calls (all checked at bind)."""

    device: Name
    tags: list[Name] = Field(default_factory=list)
    methods: list[Name] = Field(default_factory=list)


class Monitor(Strict):
    """A condition watched while its scope runs: trips after ``on_delay``, clears after
    ``off_delay`` of ``clear`` (default: not ``when``); or ``device_lost`` of a role."""

    id: Name
    when: ExprField | None = None
    device_lost: Name | None = None
    clear: ExprField | None = None
    on_delay: Delay = 0.0
    off_delay: Delay = 0.0
    priority: Literal["low", "medium", "high", "critical"] = "medium"
    action: Literal["alarm", "pause", "hold", "abort"] = "alarm"
    message: str = ""

    @model_validator(mode="after")
    def _one_trigger(self) -> Monitor:
        if (self.when is None) == (self.device_lost is None):
            raise ValueError("give exactly one of when and device_lost")
        if self.clear is not None and self.when is None:
            raise ValueError("clear goes with when, not with device_lost")
        return self


class SetAction(Strict):
    """Hold action: write a tag."""

    set: TagRef
    value: ValueField


class CallAction(Strict):
    """Hold action: call a device method."""

    call: MethodRef
    args: list[ValueField] = Field(default_factory=list)


def _action_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return "set" if "set" in v else "call" if "call" in v else None
    return "set" if isinstance(v, SetAction) else "call" if isinstance(v, CallAction) else None


HoldAction = Annotated[
    Annotated[SetAction, Tag("set")] | Annotated[CallAction, Tag("call")],
    Discriminator(
        _action_kind,
        custom_error_type="hold_action",
        custom_error_message="a hold action is {set: role.tag, value: V} or "
        "{call: role.method, args: [...]}",
    ),
]


class PhaseBase(Strict):
    id: Name
    title: str = ""


class SetPhase(PhaseBase):
    """Write tags, then confirm each by read-back within ``tolerance`` (relative)."""

    type: Literal["set"]
    values: dict[TagRef, ValueField] = Field(min_length=1)
    tolerance: Float = Field(1e-6, ge=0)


class WaitPhase(PhaseBase):
    """Wait until a condition holds (for ``hold_for``), at most ``timeout``."""

    type: Literal["wait"]
    until: ExprField
    hold_for: Duration | None = None
    timeout: Duration | None = None
    on_timeout: OnTimeout = "hold"


class RampPhase(PhaseBase):
    """Move a set point linearly from its current value to ``to`` over ``over``."""

    type: Literal["ramp"]
    tag: TagRef
    to: ValueField
    over: Duration
    step: Duration | None = None


class TimerPhase(PhaseBase):
    """Wait a duration (an expression of time; a negative result counts as zero)."""

    type: Literal["timer"]
    duration: ExprField


class PromptPhase(PhaseBase):
    """Ask the operator: instructions, entered values, electronic signatures."""

    type: Literal["prompt"]
    text: str
    inputs: dict[Name, Input] = Field(default_factory=dict)
    signatures: list[Meaning] = Field(default_factory=list)

    @field_validator("signatures")
    @classmethod
    def _meanings(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each signature meaning may appear once")
        if "verified" in v and "performed" not in v:
            raise ValueError("verified needs performed (a second person checks the first)")
        return v


class CallPhase(PhaseBase):
    """Call a device method; optionally wait for a result condition."""

    type: Literal["call"]
    method: MethodRef
    args: list[ValueField] = Field(default_factory=list)
    until: ExprField | None = None
    fail_if: ExprField | None = None
    timeout: Duration | None = None
    on_timeout: OnTimeout = "hold"


class Stall(Strict):
    """A transfer is stalled when ``tag`` moves less than ``min_change`` within ``within``."""

    tag: TagRef
    min_change: ValueField
    within: Duration


class TransferPhase(PhaseBase):
    """Run a pump at ``speed`` until a condition; the pump is stopped at the end."""

    type: Literal["transfer"]
    pump: Name
    speed_tag: TagRef
    run_tag: TagRef
    speed: ValueField
    until: ExprField
    stall: Stall | None = None
    timeout: Duration | None = None
    on_timeout: OnTimeout = "hold"

    @model_validator(mode="after")
    def _tags_of_pump(self) -> TransferPhase:
        for key in ("speed_tag", "run_tag"):
            ref = getattr(self, key)
            if ref.split(".")[0] != self.pump:
                raise ValueError(f"{key} {ref!r} is not a tag of the pump role {self.pump!r}")
        return self


class SamplePhase(PhaseBase):
    """Record an in-process sample taken now; results are entered later."""

    type: Literal["sample"]
    results: dict[Name, Input] = Field(min_length=1)
    volume_ml: Float = Field(gt=0)
    wait_for_results: Flag = False


class RepeatPhase(PhaseBase):
    """Run ``phases`` again and again: until a condition (checked after each pass) or while
    one (checked before each pass), at most ``max_iterations`` times."""

    type: Literal["repeat"]
    until: ExprField | None = None
    while_: ExprField | None = Field(None, alias="while")
    max_iterations: Int = Field(100, ge=1, le=100_000)
    phases: list[Phase] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_condition(self) -> RepeatPhase:
        if (self.until is None) == (self.while_ is None):
            raise ValueError("give exactly one of until and while")
        return self


class BranchPhase(PhaseBase):
    """Run ``then`` when ``if`` holds, else ``else``."""

    type: Literal["branch"]
    if_: ExprField = Field(alias="if")
    then: list[Phase] = Field(min_length=1)
    else_: list[Phase] = Field([], alias="else")


Phase = Annotated[
    SetPhase
    | WaitPhase
    | RampPhase
    | TimerPhase
    | PromptPhase
    | CallPhase
    | TransferPhase
    | SamplePhase
    | RepeatPhase
    | BranchPhase,
    Field(discriminator="type"),
]
PHASE_TYPES = (
    "set",
    "wait",
    "ramp",
    "timer",
    "prompt",
    "call",
    "transfer",
    "sample",
    "repeat",
    "branch",
)


def children(phase: Phase) -> list[Phase]:
    """The phases nested in a repeat or branch (then before else); ``[]`` for others."""
    if isinstance(phase, RepeatPhase):
        return list(phase.phases)
    if isinstance(phase, BranchPhase):
        return [*phase.then, *phase.else_]
    return []


def walk_phases(phases: list[Phase]) -> Iterator[Phase]:
    """Every phase at every depth, in document order."""
    for phase in phases:
        yield phase
        yield from walk_phases(children(phase))


class Operation(Strict):
    """An ISA-88 operation: an ordered list of phases and monitors active while it runs."""

    operation: Name
    title: str = ""
    monitors: list[Monitor] = Field(default_factory=list)
    phases: list[Phase] = Field(min_length=1)


class Recipe(Strict):
    """A master recipe, format 1."""

    format: Literal[1]
    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")]
    version: Int = Field(ge=1, description="a whole number, 1 or more")
    title: str
    product: str = ""
    master_file: str = ""
    equipment: dict[Name, Role] = Field(default_factory=dict)
    parameters: dict[Name, Parameter] = Field(default_factory=dict)
    hold_actions: list[HoldAction] = Field(default_factory=list)
    monitors: list[Monitor] = Field(default_factory=list)
    procedure: list[Operation] = Field(min_length=1)
    source: SkipJsonSchema[str] = Field("", exclude=True, description="the file it came from")

    @field_validator("format", mode="before")
    @classmethod
    def _format_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):  # Literal[1] would take true and 1.0
            raise ValueError(f"format is the number 1, not {v!r:.40}")
        return v

    @field_validator("equipment")
    @classmethod
    def _reserved_roles(cls, v: dict[str, Role]) -> dict[str, Role]:
        for role in v:
            if role in ("param", "phase", "run"):
                raise ValueError(f"{role!r} is reserved in expressions; choose another role name")
        return v

    def all_phases(self) -> list[Phase]:
        """Every phase at every depth, in document order."""
        return [p for op in self.procedure for p in walk_phases(op.phases)]

    def phase(self, phase_id: str) -> Phase:
        """The phase with this id; ``KeyError`` naming it when unknown."""
        for p in self.all_phases():
            if p.id == phase_id:
                return p
        raise KeyError(f"recipe {self.id!r} has no phase {phase_id!r}")


RepeatPhase.model_rebuild()
BranchPhase.model_rebuild()
Operation.model_rebuild()
Recipe.model_rebuild()
