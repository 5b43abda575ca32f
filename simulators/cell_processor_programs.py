"""The cell processor's programs as data, its state table and its process model (no I/O).

States and commands::

              start                    done
    idle ───────────> running ───────────────> complete ─┐
     ^                 │  │  abort                        │
     │                 │  └───────> aborted ──────────────┤ start (a new run)
     │                 │  fault                           │
     │                 └────────> error ──────────────────┤
     └────── (only at power-on) ──────────────────────────┘

Every other command in a state is refused (``BadInvalidState``). ``LoadInput`` is allowed in
every state but ``running``.

The process model follows the published CliniMACS Prodigy figures (DOMAIN.md §5): CD4/CD8
magnetic selection recovers about 55 % of the target cells at about 98 % purity; washing loses a
few percent of the cells per cycle; concentration and formulation change the volume and lose
little. A small seeded random variation makes runs differ the way real ones do.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

APHERESIS_CELLS_PER_ML = 5.0e7  # leukapheresis product when no input was loaded
APHERESIS_TARGET_PCT = 45.0  # CD4/CD8 T cells among the nucleated cells of that product
SELECT_ELUTION_ML = 100.0


class State(enum.StrEnum):
    """ProgramManager states (the ``State`` variable)."""

    IDLE = "idle"
    RUNNING = "running"
    COMPLETE = "complete"
    ABORTED = "aborted"
    ERROR = "error"


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "start"): State.RUNNING,
    (State.COMPLETE, "start"): State.RUNNING,
    (State.ABORTED, "start"): State.RUNNING,
    (State.ERROR, "start"): State.RUNNING,
    (State.RUNNING, "abort"): State.ABORTED,
    (State.RUNNING, "done"): State.COMPLETE,
    (State.RUNNING, "fault"): State.ERROR,
}


@dataclass(frozen=True, slots=True)
class Program:
    """A program: duration in simulated seconds (base plus per extra cycle) and argument limits."""

    name: str
    description: str
    base_s: float
    per_extra_cycle_s: float
    volume_ml: tuple[float, float]
    cycles: tuple[int, int]

    def duration_s(self, cycles: int) -> float:
        """Simulated run time for ``cycles``."""
        return self.base_s + self.per_extra_cycle_s * (cycles - 1)


PROGRAMS: dict[str, Program] = {
    p.name: p
    for p in (
        Program("select", "CD4/CD8 magnetic selection", 3 * 3600, 30 * 60, (10, 500), (1, 3)),
        Program("wash", "wash and resuspend", 15 * 60, 15 * 60, (10, 500), (1, 5)),
        Program("concentrate", "reduce to a target volume", 30 * 60, 0, (5, 250), (1, 1)),
        Program("formulate", "bring to the final volume", 20 * 60, 0, (10, 250), (1, 1)),
    )
}


@dataclass(frozen=True, slots=True)
class Bag:
    """The cells in the processing bag: total nucleated cells, volume, target-cell share."""

    cells: float = 0.0
    volume_ml: float = 0.0
    target_pct: float = 0.0

    @property
    def empty(self) -> bool:
        return self.cells <= 0 or self.volume_ml <= 0


class Refusal(Exception):
    """A method call refused: the OPC UA status name, the offending argument (index or
    ``None``) and a message for people."""

    def __init__(self, status: str, message: str, argument: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.argument = argument


def check_start(bag: Bag, name: str, volume_ml: float, cycles: int) -> Program:
    """The program to run, or ``Refusal`` for arguments that cannot work."""
    program = PROGRAMS.get(name)
    if program is None:
        known = ", ".join(sorted(PROGRAMS))
        raise Refusal("BadInvalidArgument", f"unknown program {name!r}; known: {known}", 0)
    low, high = program.volume_ml
    if not low <= volume_ml <= high:
        raise Refusal(
            "BadOutOfRange", f"{name}: volume_ml {volume_ml:g} outside {low:g}..{high:g} mL", 1
        )
    first, last = program.cycles
    if not first <= cycles <= last:
        raise Refusal("BadOutOfRange", f"{name}: cycles {cycles} outside {first}..{last}", 2)
    if name == "select":
        if not bag.empty and volume_ml > bag.volume_ml:
            raise Refusal(
                "BadOutOfRange",
                f"select: volume_ml {volume_ml:g} exceeds the loaded {bag.volume_ml:g} mL",
                1,
            )
        return program
    if bag.empty:
        raise Refusal("BadInvalidState", f"{name}: no cells loaded; run select or LoadInput first")
    if name == "concentrate" and volume_ml >= bag.volume_ml:
        raise Refusal(
            "BadOutOfRange",
            f"concentrate: target {volume_ml:g} mL must be below the {bag.volume_ml:g} mL held",
            1,
        )
    if name == "formulate" and volume_ml < bag.volume_ml:
        raise Refusal(
            "BadOutOfRange",
            f"formulate: final {volume_ml:g} mL must be at least the {bag.volume_ml:g} mL held",
            1,
        )
    return program


def input_for_select(bag: Bag, volume_ml: float) -> Bag:
    """What select processes: ``volume_ml`` of the loaded bag, or of a typical apheresis
    product when nothing was loaded."""
    if bag.empty:
        return Bag(volume_ml * APHERESIS_CELLS_PER_ML, volume_ml, APHERESIS_TARGET_PCT)
    share = volume_ml / bag.volume_ml
    return Bag(bag.cells * share, volume_ml, bag.target_pct)


def run_outcome(
    program: Program, bag: Bag, volume_ml: float, cycles: int, rng: random.Random
) -> tuple[Bag, dict[str, float | str]]:
    """The bag after ``program`` and the run's result record."""
    source = input_for_select(bag, volume_ml) if program.name == "select" else bag
    target_in = source.cells * source.target_pct / 100
    if program.name == "select":
        recovery = _vary(rng, 0.55, 0.02)
        purity = min(99.5, _vary(rng, 98.0, 0.4))
        target_out = target_in * recovery
        out = Bag(target_out / (purity / 100), SELECT_ELUTION_ML, purity)
    else:
        loss = {"wash": 0.03 * cycles, "concentrate": 0.05, "formulate": 0.01}[program.name]
        kept = max(0.0, 1 - _vary(rng, loss, loss / 10))
        out = Bag(source.cells * kept, volume_ml, source.target_pct)
    # the bag holds what the result reports (whole cells, 0.01 mL, 0.01 %)
    out = Bag(float(round(out.cells)), round(out.volume_ml, 2), round(out.target_pct, 2))
    target_out = out.cells * out.target_pct / 100
    result: dict[str, float | str] = {
        "program": program.name,
        "input_cells": round(source.cells),
        "input_volume_ml": round(source.volume_ml, 2),
        "output_cells": round(out.cells),
        "output_volume_ml": out.volume_ml,
        "cell_concentration_per_ml": round(out.cells / out.volume_ml),
        "recovery_pct": round(100 * target_out / target_in, 2) if target_in else 0.0,
        "purity_pct": out.target_pct,
    }
    return out, result


def _vary(rng: random.Random, mean: float, sd: float) -> float:
    return max(0.0, rng.gauss(mean, sd))
