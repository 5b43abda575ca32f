"""What a run remembers, rebuilt from the journal: the basis of crash recovery.

The engine journals an ``event`` record for every step it takes (``run_started``, ``run_state``,
``phase_started``, ``phase_progress``, ``phase_step``, ``phase_completed``, ``loop_iteration``,
``branch_taken``, ``sample_taken``, ``sample_results``). ``RunMemory.apply`` folds those bodies
into the state the engine needs to carry on: the completed phases (by their key: the path of
indices through operations, phases, loop iterations), loop counters, branch decisions, the
progress (elapsed seconds) of the phase that was running and the steps done inside it (a call
made, a sample taken), phase outputs, sample results still to be entered, parameters and
binding. The same fold runs live (the engine
keeps its memory this way) and after a crash (``load_run``), so recovery cannot disagree with
what the engine did.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.record.format import JournalStorageError

Key = str  # "0.2.5.1": operation 0, phase 2, iteration 5, inner phase 1

FINAL_STATES = frozenset({"Complete", "Stopped", "Aborted"})


@dataclass
class RunMemory:
    """The progress of one run."""

    run: str
    recipe: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    binding: dict[str, str] = field(default_factory=dict)
    started_by: str = ""
    state: str = "Idle"
    completed: set[Key] = field(default_factory=set)
    loops: dict[Key, int] = field(default_factory=dict)
    branches: dict[Key, str] = field(default_factory=dict)
    progress: dict[Key, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: Key | None = None
    elapsed_run: float = 0.0  # run time (s) at the last journaled step
    steps: dict[Key, list[str]] = field(default_factory=dict)  # actions done inside a phase
    # samples taken whose results are still to be entered (phase id -> key)
    pending_results: dict[str, Key] = field(default_factory=dict)

    def apply(self, body: dict[str, Any]) -> None:
        """Fold one journaled event body into the memory."""
        event = body.get("event")
        key: str = body.get("key") or ""
        if "run_elapsed" in body:
            self.elapsed_run = float(body["run_elapsed"])
        if event == "run_started":
            # updated in place: the engine's expression environment holds these dicts
            self.recipe.update(body["recipe"])
            self.params.update(body["params"])
            self.binding.update(body["binding"])
            self.started_by = body.get("who", "")
        elif event == "run_state":
            self.state = body["new"]
        elif event == "phase_started":
            self.current = key
        elif event == "phase_progress":
            self.progress[key] = float(body["elapsed"])
        elif event == "phase_step":
            self.steps.setdefault(key, []).append(body["step"])
        elif event == "phase_completed":
            self.completed.add(key)
            self.progress.pop(key, None)
            self.steps.pop(key, None)
            if body.get("outputs"):
                self.outputs[body["phase"]] = dict(body["outputs"])
            if self.current == key:
                self.current = None
        elif event == "loop_iteration":
            self.loops[key] = int(body["iteration"])
        elif event == "branch_taken":
            self.branches[key] = body["branch"]
        elif event == "sample_taken" and not body.get("wait_for_results", False):
            self.pending_results[body["phase"]] = key
        elif event == "sample_results":
            self.outputs[body["phase"]] = dict(body["results"])
            self.pending_results.pop(body["phase"], None)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES or (self.state == "Idle" and bool(self.recipe))


def _rows(path: Path, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise JournalStorageError(f"cannot read journal {path}: {exc}") from exc


def last_run(path: str | Path) -> str | None:
    """The id of the newest run named in the journal, if any."""
    rows = _rows(
        Path(path),
        "SELECT run FROM records WHERE kind = 'event' AND run IS NOT NULL "
        "ORDER BY seq DESC LIMIT 1",
        (),
    )
    return rows[0][0] if rows else None


def load_run(path: str | Path, run: str) -> RunMemory:
    """Rebuild a run's memory from its journaled events."""
    memory = RunMemory(run)
    for (data,) in _rows(
        Path(path), "SELECT data FROM records WHERE run = ? AND kind = 'event' ORDER BY seq", (run,)
    ):
        memory.apply(json.loads(data)["body"])
    return memory
