"""Child process of the crash-recovery test: an agent that starts a run and is then killed.

Usage: ``python tests/engine_child.py WORK_DIR SPEED`` with the ``BEDSIDE_SIM_*`` and
``BEDSIDE_RUN_DIR`` variables pointing at a simulated unit its parent serves. It builds the
engine rig (journal, unit key and users already in WORK_DIR), starts a run of
``WORK_DIR/recipe.yaml``, prints ``run <id>`` and runs until the parent kills it (SIGKILL).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from tests.engine_rig import agent_rig


async def main(work: Path, speed: float) -> None:
    # stdout carries the protocol with the parent; logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    async with agent_rig(work, speed, new_users=False) as rig:
        engine = await rig.runs.start(work / "recipe.yaml", {}, who="olive", why="crash test")
        sys.stdout.write(f"run {engine.run}\n")
        sys.stdout.flush()
        await engine.finished.wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2])))
