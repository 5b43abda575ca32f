"""System tests of every phase type: recipes run by the engine on the simulated unit.

The unit (bioreactor and cell processor on OPC UA, pumps on Modbus, balance on MT-SICS) runs at
1000x in a thread shared by the module; each test gets a fresh agent (journal, users, hub, run
manager) and a unit reset to its defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.engine.prompts import PromptRejected
from agent.engine.states import RunState
from tests.engine_rig import (
    Rig,
    SimThread,
    agent_rig,
    recipe_text,
    reset_unit,
    sim_env,
    wait_for,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimThread]:
    """One simulated unit for the module's tests."""
    with SimThread(sim_env(tmp_path_factory.mktemp("sim"))) as sim:
        yield sim


@pytest.fixture
async def rig(
    sim: SimThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    """A fresh agent (journal, users, hub, run manager) on the shared unit, reset."""
    for name, value in sim.env.items():
        monkeypatch.setenv(name, value)
    async with agent_rig(tmp_path) as rig:
        await reset_unit(sim, rig)
        yield rig


def one_operation(phases: str, head: str = "") -> str:
    """A procedure of one operation holding ``phases`` (YAML list items, indented 6)."""
    return f"{head}\nprocedure:\n  - operation: main\n    phases:\n{phases}"


# ------------------------------------------------------------------ set


async def test_set_writes_and_confirms_by_read_back(rig: Rig) -> None:
    """A set phase writes each value, confirms it by read-back and journals both."""
    text = recipe_text(
        "set-test",
        one_operation("""
      - {id: set_points, type: set, values: {reactor.temperature_sp: 36.5, reactor.rocking_sp: 12}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    assert await rig.value("temperature_sp") == pytest.approx(36.5)
    assert await rig.value("rocking_sp") == pytest.approx(12)
    writes = rig.audits("write", engine.run)
    confirmed = rig.audits("write_confirmed", engine.run)
    assert {w["tag"] for w in writes} == {"temperature_sp", "rocking_sp"}
    assert {c["tag"] for c in confirmed} == {"temperature_sp", "rocking_sp"}
    assert all(w["phase"] == "set_points" and w["who"] == "engine" for w in writes)
    done = rig.events(engine.run, "phase_completed")
    assert done[0]["outputs"] == {"reactor.temperature_sp": 36.5, "reactor.rocking_sp": 12.0}


# ------------------------------------------------------------------ wait


async def test_wait_completes_once_the_condition_held_long_enough(rig: Rig) -> None:
    """A wait phase ends once its condition has stayed true for hold_for."""
    text = recipe_text(
        "wait-test",
        one_operation("""
      - {id: warm, type: wait, until: reactor.temperature > 30 degC, hold_for: 5m, timeout: 1h}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    outputs = rig.events(engine.run, "phase_completed")[0]["outputs"]
    assert outputs["waited_s"] >= 300


@pytest.mark.parametrize(
    ("on_timeout", "final"),
    [("hold", RunState.HELD), ("abort", RunState.ABORTED), ("continue", RunState.COMPLETE)],
)
async def test_wait_timeout_does_what_on_timeout_says(
    rig: Rig, on_timeout: str, final: RunState
) -> None:
    """A wait that times out holds, aborts, or raises an alarm and carries on."""
    text = recipe_text(
        "wait-timeout",
        one_operation(f"""
      - {{id: never, type: wait, until: reactor.temperature > 39.9 degC, timeout: 10m,
          on_timeout: {on_timeout}}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, final)
    if on_timeout == "continue":
        outputs = rig.events(engine.run, "phase_completed")[0]["outputs"]
        assert outputs == {"timed_out": True}
        alarms = [a for a in rig.records("alarm", engine.run) if a["alarm"] == "timeout_never"]
        assert alarms and alarms[0]["state"] == "unack"
    else:
        states = [e["new"] for e in rig.events(engine.run, "run_state")]
        assert states[-2:] == (
            ["Holding", "Held"] if final is RunState.HELD else ["Aborting", "Aborted"]
        )
        assert "never" in rig.events(engine.run, "run_state")[-2]["why"]
        assert not rig.events(engine.run, "phase_completed")


async def test_wait_timeout_alarm_raises_and_keeps_waiting(rig: Rig) -> None:
    """on_timeout alarm raises an alarm at the timeout and the wait goes on to its condition."""
    text = recipe_text(
        "wait-alarm",
        one_operation("""
      - {id: rock, type: wait, until: reactor.rocking_sp >= 20 rpm, timeout: 5m,
         on_timeout: alarm}
"""),
    )
    engine = await rig.start(text)
    await wait_for(
        lambda: any(a.id == "timeout_rock" and a.active for a in engine.alarms.views()),
        "timeout alarm",
        20,
    )
    assert engine.sm.state is RunState.RUNNING
    await rig.hub.write("rocking_sp", 22.0)
    await rig.wait_state(engine, RunState.COMPLETE)
    assert rig.events(engine.run, "phase_completed")[0]["outputs"] == {"timed_out": True}


# ------------------------------------------------------------------ ramp and timer


async def test_ramp_moves_the_set_point_in_steps_to_the_target(rig: Rig) -> None:
    """A ramp writes intermediate set-points from the current value and ends at the target."""
    text = recipe_text(
        "ramp-test",
        one_operation("""
      - {id: cool, type: ramp, tag: reactor.temperature_sp, to: 35 degC, over: 20m, step: 4m}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    values = [w["value"] for w in rig.audits("write", engine.run) if w["tag"] == "temperature_sp"]
    assert len(values) >= 4
    assert values[0] == pytest.approx(37.0)
    assert values[-1] == 35.0
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert any(35.0 < v < 37.0 for v in values)
    assert await rig.value("temperature_sp") == pytest.approx(35.0)
    assert rig.events(engine.run, "phase_completed")[0]["outputs"] == {"from": 37.0, "to": 35.0}


async def test_timer_waits_its_duration(rig: Rig) -> None:
    """A timer's duration is an expression of time; the phase reports it."""
    text = recipe_text(
        "timer-test",
        one_operation("""
      - id: settle
        type: timer
        duration: max(10m - run.elapsed, 0s)
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    outputs = rig.events(engine.run, "phase_completed")[0]["outputs"]
    assert 0 < outputs["duration_s"] <= 600
    assert engine.elapsed() >= outputs["duration_s"]


# ------------------------------------------------------------------ prompt

PROMPT = one_operation(
    """
      - id: scan_bag
        type: prompt
        text: Scan the bag and weigh it.
        inputs:
          bag_id: {type: str, label: Bag ID, pattern: "^COI-[0-9]{6}$", equals: param.coi_id}
          volume: {type: float, unit: mL, label: Volume, limits: [50, 500]}
        signatures: [performed, verified]
""",
    head="""parameters:
  coi_id: {type: str, required: true, pattern: "^COI-[0-9]{6}$"}
""",
)


async def test_prompt_refuses_a_wrong_answer_with_every_reason(rig: Rig) -> None:
    """Wrong pattern, out-of-limits and chain-of-identity mismatch are all named, audited, and
    the prompt stays open."""
    engine = await rig.start(recipe_text("prompt-test", PROMPT), {"coi_id": "COI-123456"})
    await rig.wait_prompt(engine, "scan_bag")
    sigs = [rig.signature("performed", "olive"), rig.signature("verified", "sam")]
    with pytest.raises(PromptRejected) as refused:
        await engine.prompts.answer("scan_bag", {"bag_id": "COI-12", "volume": 900}, sigs, "olive")
    problems = refused.value.problems
    assert any("bag_id" in p and "does not match ^COI" in p for p in problems)
    assert any("volume" in p and "outside" in p for p in problems)
    with pytest.raises(PromptRejected) as mismatch:
        await engine.prompts.answer(
            "scan_bag", {"bag_id": "COI-654321", "volume": 100}, sigs, "olive"
        )
    assert any("chain of identity" in p for p in mismatch.value.problems)
    audits = rig.audits("prompt_rejected", engine.run)
    assert [len(a["problems"]) for a in audits] == [2, 1]
    assert "scan_bag" in engine.prompts.open
    assert engine.sm.state is RunState.RUNNING
    assert not rig.records("signature", engine.run)


async def test_prompt_refuses_one_person_signing_performed_and_verified(rig: Rig) -> None:
    """The two-person rule: the same user cannot sign performed and verified."""
    engine = await rig.start(recipe_text("prompt-test", PROMPT), {"coi_id": "COI-123456"})
    await rig.wait_prompt(engine, "scan_bag")
    sigs = [rig.signature("performed", "sam"), rig.signature("verified", "sam")]
    with pytest.raises(PromptRejected) as refused:
        await engine.prompts.answer(
            "scan_bag", {"bag_id": "COI-123456", "volume": 100}, sigs, "sam"
        )
    assert "two-person rule" in str(refused.value)
    assert rig.audits("signature_refused", engine.run)
    assert "scan_bag" in engine.prompts.open
    assert not rig.records("signature", engine.run)


async def test_prompt_refuses_a_wrong_password_and_a_missing_signature(rig: Rig) -> None:
    """A signature needs the signer's password again; every meaning asked for must be given."""
    engine = await rig.start(recipe_text("prompt-test", PROMPT), {"coi_id": "COI-123456"})
    await rig.wait_prompt(engine, "scan_bag")
    answer = {"bag_id": "COI-123456", "volume": 100}
    with pytest.raises(PromptRejected) as missing:
        await engine.prompts.answer(
            "scan_bag", answer, [rig.signature("performed", "olive")], "olive"
        )
    assert missing.value.problems == ["signature 'verified' is needed"]
    sigs = [rig.signature("performed", "olive", "Wrong-Pass-1"), rig.signature("verified", "sam")]
    with pytest.raises(PromptRejected):
        await engine.prompts.answer("scan_bag", answer, sigs, "olive")
    assert "scan_bag" in engine.prompts.open


async def test_prompt_accepts_a_right_answer_signed_by_two_people(rig: Rig) -> None:
    """A right answer signed performed + verified by two users is accepted and journaled."""
    engine = await rig.start(recipe_text("prompt-test", PROMPT), {"coi_id": "COI-123456"})
    await rig.wait_prompt(engine, "scan_bag")
    sigs = [rig.signature("performed", "olive"), rig.signature("verified", "sam")]
    typed = await engine.prompts.answer(
        "scan_bag", {"bag_id": "COI-123456", "volume": "120"}, sigs, "olive"
    )
    assert typed == {"bag_id": "COI-123456", "volume": 120.0}
    await rig.wait_state(engine, RunState.COMPLETE)
    signatures = rig.records("signature", engine.run)
    assert [(s["meaning"], s["user"]) for s in signatures] == [
        ("performed", "olive"),
        ("verified", "sam"),
    ]
    assert all(s["record"]["inputs"] == typed and s["phase"] == "scan_bag" for s in signatures)
    assert rig.audits("prompt_answered", engine.run)[0]["inputs"] == typed
    assert rig.events(engine.run, "phase_completed")[0]["outputs"] == typed
    with pytest.raises(PromptRejected):  # answered once: nothing is open any more
        await engine.prompts.answer("scan_bag", typed, sigs, "olive")


# ------------------------------------------------------------------ call

CALL = one_operation("""
      - {id: wash_1, type: call, method: processor.start_program, args: [wash, 100, 1],
         until: processor.cp_state == "complete", fail_if: processor.cp_state == "error",
         timeout: 2h}
      - {id: wash_2, type: call, method: processor.start_program, args: [wash, 80, 1],
         until: processor.cp_state == "complete", fail_if: processor.cp_state == "error",
         timeout: 2h}
""")


async def test_call_starts_the_program_once_and_waits_until_it_completes(rig: Rig) -> None:
    """Each call phase calls its method once and ends only when its own program completed."""
    engine = await rig.start(recipe_text("call-test", CALL))
    await rig.wait_state(engine, RunState.COMPLETE, within=30)
    # the second program must have finished too, not just the first one's "complete" seen again
    assert await rig.value("cp_state") == "complete"
    calls = rig.audits("call", engine.run)
    assert [(c["method"], c["args"], c["phase"]) for c in calls] == [
        ("start_program", ["wash", 100, 1], "wash_1"),
        ("start_program", ["wash", 80, 1], "wash_2"),
    ]
    results = rig.audits("call_result", engine.run)
    assert len(results) == 2 and all(r["outputs"] for r in results)
    outputs = [e["outputs"] for e in rig.events(engine.run, "phase_completed")]
    assert all(o["out0"] for o in outputs)


async def test_call_fail_if_holds_the_run(rig: Rig, sim: SimThread) -> None:
    """A program that goes to error trips fail_if: the run is held."""
    await sim.fault("cell_processor", "fail_program", "wash")
    await sim.fault("cell_processor", "fail_at_progress", 20.0)
    engine = await rig.start(recipe_text("call-fail", CALL))
    await rig.wait_state(engine, RunState.HELD, within=30)
    hold = next(e for e in rig.events(engine.run, "run_state") if e["new"] == "Holding")
    assert "cp_state" in hold["why"] and "error" in hold["why"]
    assert len(rig.audits("call", engine.run)) == 1


async def test_a_refused_call_holds_and_is_made_again_on_restart(rig: Rig, sim: SimThread) -> None:
    """A call the device refuses (a program already running) holds the run; after restart the
    call is made again (a refused call took no effect) and the run completes."""
    await rig.hub.call("cell_processor", "start_program", "wash", 100.0, 1)
    engine = await rig.start(recipe_text("call-refused", CALL))
    await rig.wait_state(engine, RunState.HELD, within=30)
    assert rig.audits("call_failed", engine.run)
    await wait_for(lambda: _state(rig) == "complete", "the manual program to end", 30)
    await engine.command("restart", who="sam", why="processor free")
    await rig.wait_state(engine, RunState.COMPLETE, within=30)
    phases = [c["phase"] for c in rig.audits("call", engine.run)]
    assert phases == ["wash_1", "wash_1", "wash_2"]


def _state(rig: Rig) -> object:
    sample = rig.hub.snapshot.get("cp_state")
    return sample.value if sample else None


# ------------------------------------------------------------------ transfer


def transfer_recipe(stall: str = "") -> str:
    return recipe_text(
        "transfer-test",
        one_operation(
            f"""
      - id: feed_medium
        type: transfer
        pump: feed
        speed_tag: feed.feed_speed_sp
        run_tag: feed.feed_run
        speed: 60 mL/min
        until: reactor.volume >= param.target
        timeout: 2h
{stall}
""",
            head="parameters:\n  target: {type: float, unit: mL, required: true}\n",
        ),
    )


async def test_transfer_pumps_until_the_volume_and_stops_the_pump(rig: Rig) -> None:
    """A transfer runs the feed pump until the bioreactor holds the target volume, then stops."""
    start = await rig.value("volume")
    engine = await rig.start(transfer_recipe(), {"target": start + 100})
    await rig.wait_state(engine, RunState.COMPLETE, within=30)
    assert await rig.value("volume") >= start + 90
    assert await rig.value("feed_run") is False
    run_writes = [w["value"] for w in rig.audits("write", engine.run) if w["tag"] == "feed_run"]
    assert run_writes == [True, False]


# Timing-sensitive on a loaded 2-core machine: run by `make test-slow`, not by `make test`.
@pytest.mark.slow
async def test_transfer_stall_holds_the_run_with_the_pump_stopped(rig: Rig, sim: SimThread) -> None:
    """A pump whose dispensed volume stops moving is a stall: the run is held, pump stopped."""
    await sim.fault("pumps", "stalled", {1})
    start = await rig.value("volume")
    stall = "        stall: {tag: feed.feed_dispensed, min_change: 1 mL, within: 5m}"
    engine = await rig.start(transfer_recipe(stall), {"target": start + 100})
    await rig.wait_state(engine, RunState.HELD, within=30)
    hold = next(e for e in rig.events(engine.run, "run_state") if e["new"] == "Holding")
    assert "feed_dispensed" in hold["why"]
    assert await rig.value("feed_run") is False


# ------------------------------------------------------------------ sample

SAMPLE = one_operation("""
      - {id: day5, type: sample, volume_ml: 2, results: {viability: {type: float, unit: "%",
         limits: [0, 100]}}}
      - {id: results_in, type: wait, until: phase.day5.viability >= 50 %, timeout: 1d}
""")


async def test_sample_results_are_entered_later_through_prompts(rig: Rig) -> None:
    """A sample is taken at once; its results, entered later, let a later phase go on."""
    engine = await rig.start(recipe_text("sample-test", SAMPLE))
    await rig.wait_prompt(engine, "day5")
    await rig.wait_phase(engine, "results_in")
    assert rig.events(engine.run, "sample_taken")[0]["volume_ml"] == 2
    with pytest.raises(PromptRejected):
        await engine.prompts.answer("day5", {"viability": 140}, [], "olive")
    await engine.prompts.answer("day5", {"viability": 92.5}, [], "olive")
    await rig.wait_state(engine, RunState.COMPLETE)
    assert rig.events(engine.run, "sample_results")[0]["results"] == {"viability": 92.5}
    assert engine.memory.outputs["day5"] == {"viability": 92.5}


async def test_sample_waiting_for_results_holds_the_procedure_until_entered(rig: Rig) -> None:
    """wait_for_results keeps the phase open until the results are entered."""
    text = recipe_text(
        "sample-wait",
        one_operation("""
      - {id: qc, type: sample, volume_ml: 1, wait_for_results: true,
         results: {sterile: {type: bool}}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_prompt(engine, "qc")
    assert engine.sm.state is RunState.RUNNING
    with pytest.raises(PromptRejected, match="is not a bool"):
        await engine.prompts.answer("qc", {"sterile": "perhaps"}, [], "olive")
    await engine.prompts.answer("qc", {"sterile": True}, [], "olive")
    await rig.wait_state(engine, RunState.COMPLETE)
    assert rig.events(engine.run, "phase_completed")[0]["outputs"] == {"sterile": True}


# ------------------------------------------------------------------ repeat and branch


async def test_repeat_until_counts_iterations(rig: Rig) -> None:
    """repeat/until runs its phases pass after pass, run.iteration counting them."""
    text = recipe_text(
        "repeat-until",
        one_operation("""
      - id: rock
        type: repeat
        until: run.iteration >= 3
        phases:
          - {id: set_rock, type: set, values: {reactor.rocking_sp: run.iteration * 2}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    values = [w["value"] for w in rig.audits("write", engine.run) if w["tag"] == "rocking_sp"]
    assert values == [2, 4, 6]
    assert [e["iteration"] for e in rig.events(engine.run, "loop_iteration")] == [1, 2, 3]
    assert rig.events(engine.run, "phase_completed")[-1]["outputs"] == {"iterations": 3}


async def test_repeat_while_checks_before_each_pass(rig: Rig) -> None:
    """repeat/while checks its condition before each pass (run.iteration: the pass to come)."""
    text = recipe_text(
        "repeat-while",
        one_operation("""
      - id: rock
        type: repeat
        while: run.iteration <= 2
        phases:
          - {id: set_rock, type: set, values: {reactor.rocking_sp: run.iteration + 10}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    values = [w["value"] for w in rig.audits("write", engine.run) if w["tag"] == "rocking_sp"]
    assert values == [11, 12]


async def test_repeat_stops_at_max_iterations(rig: Rig) -> None:
    """A repeat whose condition never holds stops at max_iterations and journals the limit."""
    text = recipe_text(
        "repeat-max",
        one_operation("""
      - id: rock
        type: repeat
        until: reactor.rocking_sp > 39 rpm
        max_iterations: 3
        phases:
          - {id: nudge, type: set, values: {reactor.rocking_sp: 10 + run.iteration}}
"""),
    )
    engine = await rig.start(text)
    await rig.wait_state(engine, RunState.COMPLETE)
    assert rig.events(engine.run, "loop_limit")[0]["iterations"] == 3
    assert len(rig.events(engine.run, "loop_iteration")) == 3


BRANCH = one_operation(
    """
      - id: choose
        type: branch
        if: param.warm
        then:
          - {id: warm_up, type: set, values: {reactor.temperature_sp: 37.5}}
        else:
          - {id: cool_down, type: set, values: {reactor.temperature_sp: 36}}
""",
    head="parameters:\n  warm: {type: bool, required: true}\n",
)


async def test_branch_takes_then_or_else_and_journals_the_decision(rig: Rig) -> None:
    """A branch runs then when its condition holds, else otherwise; each decision journaled."""
    for warm, branch, target in (("true", "then", 37.5), ("false", "else", 36.0)):
        engine = await rig.start(recipe_text("branch-test", BRANCH), {"warm": warm})
        await rig.wait_state(engine, RunState.COMPLETE)
        assert rig.events(engine.run, "branch_taken")[0]["branch"] == branch
        assert await rig.value("temperature_sp") == pytest.approx(target)
        await engine.command("reset", who="sam", why="next run")
        await wait_for(engine.finished.is_set, "engine finished")
