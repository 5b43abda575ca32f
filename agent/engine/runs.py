"""One run per unit at a time: starting, recovering and reaching the running engine.

``RunManager.start`` loads the recipe against the unit configuration, binds its roles,
checks the parameters, refuses when a run is active or the journal's disk is nearly full, and
journals ``run_started`` (recipe id, version, store name, file and SHA-256, parameters,
binding, who) before the engine takes the first transition. Requests from people (the local
API) give a ``StoredRecipe`` read by name from the unit's recipe store
(``agent.recipe.store``); a path is accepted only from trusted code (the simulator, tests).
``recover`` finds the newest run in the journal and, if it had not ended, brings it back Held.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.config import UnitConfig
from agent.devices.hub import DeviceHub
from agent.engine.engine import Engine
from agent.engine.memory import RunMemory, last_run, load_run
from agent.engine.states import RunState
from agent.journal.journal import Journal
from agent.recipe.loader import bind, check_parameters, parse_recipe
from agent.recipe.store import StoredRecipe
from agent.text.yamlsource import DocumentError, Problem
from drivers.clock import Clock

log = structlog.get_logger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class RunRefused(Exception):
    """A run that cannot start now; the message says why."""


class RunManager:
    """Owns the unit's current run."""

    def __init__(
        self,
        config: UnitConfig,
        hub: DeviceHub,
        journal: Journal,
        clock: Clock,
        spawn: Spawn,
        *,
        authenticator: Any = None,
        low_disk: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.hub = hub
        self.journal = journal
        self.clock = clock
        self.spawn = spawn
        self.authenticator = authenticator
        self.low_disk = low_disk
        self.engine: Engine | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """A run exists and has not been reset to Idle."""
        return self.engine is not None and not self.engine.finished.is_set()

    async def start(
        self,
        recipe_file: StoredRecipe | str | Path,
        params: Mapping[str, Any],
        *,
        who: str,
        why: str = "",
        overrides: Mapping[str, str] | None = None,
    ) -> Engine:
        """Start a run; ``RunRefused``, ``DocumentError``, ``BindError`` or ``ParameterError``
        (each naming every problem) when it cannot."""
        if self.active:
            assert self.engine is not None
            raise RunRefused(
                f"run {self.engine.run} is {self.engine.sm.state.value}; one run per "
                "unit: finish it and reset it first"
            )
        if self.low_disk():
            raise RunRefused(
                "the journal's disk is nearly full: no run starts until space is freed"
            )
        if isinstance(recipe_file, StoredRecipe):
            name: str | None = recipe_file.name
            path, data = recipe_file.path, recipe_file.data
        else:
            name = None
            path, data = await asyncio.to_thread(_read, Path(recipe_file))
        # parsed from the very bytes that are hashed into the record
        recipe = parse_recipe(data.decode("utf-8", "replace"), str(path), self.config)
        binding = bind(recipe, self.config, overrides)
        typed = check_parameters(recipe, params)
        run_id = f"{recipe.id}-{self.clock.now():%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"
        memory = RunMemory(run_id)
        engine = self._engine(recipe, memory)
        await engine.event(
            {
                "event": "run_started",
                "who": who,
                "why": why,
                "recipe": {
                    "id": recipe.id,
                    "version": recipe.version,
                    "title": recipe.title,
                    "name": name,
                    "path": str(path),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "master_file": recipe.master_file,
                    "product": recipe.product,
                },
                "params": typed,
                "binding": dict(binding.devices),
                "unit": self.config.unit.id,
                "site": self.config.unit.site,
            }
        )
        self._launch(engine)
        return engine

    def _engine(self, recipe: Any, memory: RunMemory, recovered: bool = False) -> Engine:
        return Engine(
            recipe=recipe,
            config=self.config,
            memory=memory,
            hub=self.hub,
            journal=self.journal,
            clock=self.clock,
            recovered=recovered,
            authenticator=self.authenticator,
        )

    def _launch(self, engine: Engine) -> None:
        self.engine = engine
        self._task = self.spawn(engine.serve())

    async def recover(self) -> Engine | None:
        """Bring back the newest unfinished run from the journal, Held."""
        run = last_run(self.journal.path)
        if run is None:
            return None
        memory = load_run(self.journal.path, run)
        if not memory.recipe or memory.state == RunState.IDLE.value:
            return None
        path = Path(memory.recipe["path"])
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            log.error("recovery_recipe_missing", run=run, path=str(path), error=str(exc))
            raise RunRefused(f"run {run} cannot be recovered: recipe {path} is unreadable") from exc
        if hashlib.sha256(data).hexdigest() != memory.recipe["sha256"]:
            raise RunRefused(
                f"run {run} cannot be recovered: recipe {path} changed since the run started"
            )
        recipe = parse_recipe(data.decode("utf-8", "replace"), str(path), self.config)
        final = memory.state in ("Complete", "Stopped", "Aborted")
        engine = self._engine(recipe, memory, recovered=not final)
        self._launch(engine)
        log.info("run_recovered", run=run, state=memory.state)
        return engine


def _read(given: Path) -> tuple[Path, bytes]:
    path = given.resolve()
    try:
        return path, path.read_bytes()
    except OSError as exc:
        raise DocumentError(
            [Problem(str(path), None, "", f"cannot read the recipe: {exc.strerror}")]
        ) from exc
