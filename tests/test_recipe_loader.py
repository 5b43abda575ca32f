"""Recipe loading, binding and parameters: reference recipes, located problems, dry checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.recipe import app
from agent.config import UnitConfig, default_config_path, load_config
from agent.expr.expression import Quantity
from agent.recipe.loader import (
    BindError,
    ParameterError,
    bind,
    check_parameters,
    load_recipe,
    parse_recipe,
)
from agent.recipe.model import (
    BranchPhase,
    CallPhase,
    PromptPhase,
    Recipe,
    RepeatPhase,
    SetAction,
    TimerPhase,
    TransferPhase,
)
from agent.recipe.schema import SCHEMA_PATH, schema_text
from agent.text.yamlsource import DocumentError

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CART = ROOT / "recipes" / "cart-expansion.yaml"
CART_PARAMS = {
    "coi_id": "COI-123456",
    "donation_id": "W123412345678",
    "patient_weight": "72.5",
    "target_dose": "2e8",
}


@pytest.fixture(scope="module")
def unit() -> UnitConfig:
    return load_config(default_config_path())


def problems(text: str, unit: UnitConfig | None = None) -> list[str]:
    with pytest.raises(DocumentError) as info:
        parse_recipe(text, "r.yaml", unit)
    return [str(p) for p in info.value.problems]


def test_reference_recipes_are_present() -> None:
    """The three reference recipes ship in recipes/."""
    assert {p.stem for p in RECIPES} >= {"cart-expansion", "tcell-selection-wash", "media-fill"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_reference_recipe_validates_against_the_simulated_unit(
    path: Path, unit: UnitConfig
) -> None:
    """Each reference recipe loads, checks against unit-sim.yaml and binds to its devices."""
    recipe = load_recipe(path, unit)
    assert recipe.id == path.stem
    assert recipe.source == str(path)
    binding = bind(recipe, unit)
    assert set(binding.devices) == set(recipe.equipment)


def test_cart_recipe_has_the_expected_shape(unit: UnitConfig) -> None:
    """The CAR-T recipe has its operations, a perfusion repeat with branches and a day-5 sample."""
    recipe = load_recipe(CART, unit)
    assert [op.operation for op in recipe.procedure] == [
        "receipt", "selection", "activation", "transduction", "expansion", "harvest",
        "wash_formulation", "fill",
    ]  # fmt: skip
    loop = recipe.phase("expand_to_harvest")
    assert isinstance(loop, RepeatPhase) and loop.until is not None and loop.while_ is None
    assert "run.elapsed" in loop.until.names()
    assert isinstance(loop.phases[0], BranchPhase)
    assert loop.phases[0].if_.source == "reactor.viable_cell_density >= 15e6 cells/mL"
    select = recipe.phase("run_selection")
    assert isinstance(select, CallPhase) and select.args[0].source == '"select"'
    assert isinstance(recipe.phase("harvest_transfer"), TransferPhase)
    fill = recipe.phase("fill_product")
    assert isinstance(fill, PromptPhase)
    assert fill.signatures == ["performed", "verified", "approved"]
    timer = recipe.phase("expansion_interval_b")
    assert isinstance(timer, TimerPhase) and timer.duration.seconds(lambda n: 0) == 6 * 3600
    assert {m.device_lost for m in recipe.monitors if m.device_lost} == set(recipe.equipment)
    assert isinstance(recipe.hold_actions[0], SetAction)


def test_every_problem_is_reported_at_once(unit: UnitConfig) -> None:
    """Structural and semantic mistakes in one file are all reported, each with line and path."""
    text = CART.read_text()
    text = text.replace("master_file: DMMF", "colour: red\nmaster_file: DMMF")
    text = text.replace("type: transfer\n        pump: feed", "type: transferr\n        pump: feed")
    text = text.replace("reactor.co2_sp: 5 %", "reactor.co2_sp: 50 %")
    text = text.replace(
        'fail_if: cell_processor.cp_state == "error"\n        timeout: 6h',
        'fail_if: cell_processor.cp_stat == "error"\n        timeout: 6h',
    )
    found = problems(text, unit)
    assert len(found) == 4, found
    assert any("r.yaml:9: colour: unknown key 'colour'" in p for p in found)
    assert any("unknown phase type 'transferr'" in p and ".type" in p for p in found)
    assert any("values.reactor.co2_sp: 50 % is outside the limits [0, 10]" in p for p in found)
    assert any("does not list the tag 'cp_stat'" in p and "fail_if" in p for p in found)


def test_a_broken_phase_does_not_cascade(unit: UnitConfig) -> None:
    """Names referring to a phase that failed validation are not reported again."""
    text = CART.read_text().replace(
        "volume: {type: float, unit: mL, label: Apheresis volume, limits: [50, 500]}",
        "volume: {type: float, unit: mL, label: Apheresis volume, limits: [500, 50]}",
    )
    found = problems(text, unit)
    assert len(found) == 1 and "limits low 500 is above high 50" in found[0], found


def test_without_a_config_tags_are_not_checked_against_devices() -> None:
    """Without a unit configuration, unknown device tags and limits are not judged."""
    text = CART.read_text().replace("reactor.rocking_sp: 10\n", "reactor.rocking_sp: 99\n")
    assert load_recipe(CART).id == "cart-expansion"
    assert parse_recipe(text, "r.yaml").id == "cart-expansion"


def test_roles_unknown_to_the_device_are_named(unit: UnitConfig) -> None:
    """A role whose device lacks a listed tag or method is refused with the device named."""
    text = CART.read_text().replace("tags: [bag_weight]", "tags: [bag_weight, tare]")
    found = problems(text, unit)
    assert any("device 'balance' has no tag 'tare'" in p for p in found), found


def test_bind_maps_role_tags_to_configured_tags(unit: UnitConfig) -> None:
    """A binding answers tag names, devices, methods and units for the engine."""
    recipe = load_recipe(CART, unit)
    binding = bind(recipe, unit)
    assert binding.tag("reactor.temperature") == "temperature"
    assert binding.device("balance") == "balance"
    assert binding.method("cell_processor.start_program") == ("cell_processor", "start_program")
    assert binding.value("reactor.temperature", 37.2) == Quantity(37.2, "degC")
    with pytest.raises(KeyError, match=r"does not declare the tag 'reactor\.heater_power'"):
        binding.tag("reactor.heater_power")


def test_bind_with_overrides_names_what_is_missing(unit: UnitConfig) -> None:
    """Binding a role to a device that lacks its tags names each missing tag and unknown role."""
    recipe = load_recipe(CART, unit)
    with pytest.raises(BindError) as info:
        bind(recipe, unit, {"harvest": "feed_pump", "scale": "balance"})
    text = "\n".join(info.value.problems)
    assert "device 'feed_pump' has no tag 'harvest_speed_sp'" in text
    assert "device 'feed_pump' has no tag 'harvest_run'" in text
    assert "unknown role 'scale'" in text
    with pytest.raises(BindError, match="no device 'fridge'"):
        bind(recipe, unit, {"reactor": "fridge"})


def test_check_parameters_types_values_and_fills_defaults(unit: UnitConfig) -> None:
    """Given text becomes typed values; defaults fill the gaps."""
    values = check_parameters(load_recipe(CART, unit), CART_PARAMS)
    assert values["patient_weight"] == 72.5
    assert values["target_dose"] == 2e8
    assert values["expansion_temperature"] == 37.0
    assert values["coi_id"] == "COI-123456"


def test_check_parameters_refuses_every_bad_value(unit: UnitConfig) -> None:
    """Missing, unknown, unparsable, out-of-limit and pattern-breaking values are all named."""
    given = {
        "coi_id": "123456",
        "patient_weight": "heavy",
        "target_dose": "1e12",
        "expansion_temperature": "nan",
        "colour": "red",
    }
    with pytest.raises(ParameterError) as info:
        check_parameters(load_recipe(CART, unit), given)
    text = "\n".join(info.value.problems)
    assert "unknown parameter 'colour'" in text
    assert "missing required parameter 'donation_id'" in text
    assert "'123456' does not match" in text
    assert "'heavy' is not a number" in text
    assert "1e+12 cells is outside the limits [1e+07, 1e+10] cells" in text
    assert "'nan' is not a finite number" in text
    assert len(info.value.problems) == 6


def test_int_and_bool_parameters() -> None:
    """int and bool parameters parse from text and refuse what they are not."""
    recipe = load_recipe(ROOT / "recipes" / "tcell-selection-wash.yaml")
    base = {"coi_id": "COI-000001", "donation_id": "W000000000001"}
    assert check_parameters(recipe, {**base, "wash_cycles": "3"})["wash_cycles"] == 3
    with pytest.raises(ParameterError, match=r"'2\.5' is not an int"):
        check_parameters(recipe, {**base, "wash_cycles": "2.5"})


def test_committed_schema_is_up_to_date() -> None:
    """docs/recipe.schema.json equals what the models produce (regenerate: python -m
    agent.recipe.schema)."""
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text()
    schema = json.loads(schema_text())
    assert "procedure" in schema["required"]
    assert "while" in schema["$defs"]["RepeatPhase"]["properties"]


def test_cli_validate_prints_a_summary() -> None:
    """`recipe validate` prints one JSON line for a valid recipe."""
    config = str(default_config_path())
    result = CliRunner().invoke(app, ["validate", str(CART), "--config", config])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["id"] == "cart-expansion" and summary["operations"] == 8
    assert "coi_id" in summary["parameters"] and summary["phases"] > 30


def test_cli_validate_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    """`recipe validate` prints each problem on its own line and exits 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(CART.read_text().replace("version: 1", "version: one\ncolour: red"))
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("bedside: error:")]
    assert len(lines) == 2 and all("bad.yaml:" in line for line in lines)


def test_cli_schema_prints_the_schema() -> None:
    """`recipe schema` prints the JSON Schema."""
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "Recipe"


def test_recipe_round_trips_through_json() -> None:
    """A recipe dumped to JSON (expressions as text, durations as '6h'-style text) loads equal."""
    recipe = load_recipe(CART)
    data = recipe.model_dump(mode="json", by_alias=True)
    again = Recipe.model_validate(data)
    assert again.model_dump(mode="json", by_alias=True) == data
    assert again.phase("expansion_interval_a") == recipe.phase("expansion_interval_a")
