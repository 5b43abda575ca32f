"""Unit tests of the bioreactor physics (no I/O): expansion, oxygen, pH, heat, numerics, faults."""

from __future__ import annotations

import json
import math

import pytest

from simulators.bioreactor_model import (
    SENSORS,
    BioreactorModel,
    BioreactorParams,
    benchmark_days_per_minute,
)
from simulators.faults import FaultState

HOUR = 3600.0
DAY = 24 * HOUR


def perfusion_for(vcd: float) -> float:
    """The reference schedule: 0/500/750/1000 mL/day as density passes 2/10/15e6 cells/mL."""
    if vcd < 2e6:
        return 0.0
    if vcd < 10e6:
        return 500.0
    return 750.0 if vcd < 15e6 else 1000.0


def dense_culture(**params: float) -> BioreactorModel:
    """A culture past its lag phase at 1e7 cells/mL, perfused at 1 L/day."""
    model = BioreactorModel(BioreactorParams(vcd0=1e7, lag_h=0.0, **params), seed=3)
    model.controls.perfusion_sp = 1000.0
    return model


def test_twelve_day_expansion_is_about_thirty_fold_at_a_healthy_ph() -> None:
    """The perfusion schedule (rocking raised when DO falls) expands cells 20-40x in 12 days."""
    model = BioreactorModel(seed=1)
    model.controls.rocking_sp = 10.0
    ph_seen = []
    for _ in range(12 * 24):
        truth = model.true_values()
        model.controls.perfusion_sp = perfusion_for(truth["vcd"])
        if truth["do"] < 30.0:
            model.controls.rocking_sp = 25.0
        model.advance(HOUR)
        ph_seen.append(model.true_values()["ph"])
    fold = model.true_values()["vcd"] / model.params.vcd0
    assert 20.0 <= fold <= 40.0
    assert min(ph_seen) >= 6.8 and max(ph_seen) <= 7.5
    assert model.true_values()["viability"] > 80.0


def test_dissolved_oxygen_falls_at_high_density_and_slow_rocking_then_recovers() -> None:
    """At 1e7 cells/mL DO drops below 40 % at 10 rpm and climbs back at 30 rpm."""
    model = dense_culture()
    model.controls.rocking_sp = 10.0
    model.advance(3 * HOUR)
    low = model.true_values()["do"]
    model.controls.rocking_sp = 30.0
    model.advance(HOUR)
    high = model.true_values()["do"]
    assert low < 40.0
    assert high > 60.0 and high > low + 30.0


def test_ph_of_fresh_medium_under_five_percent_co2_is_about_seven_point_four() -> None:
    """26 mM bicarbonate under 5 % CO2 gives pH ~7.4 (DOMAIN.md §6)."""
    model = BioreactorModel()
    assert model.true_values()["ph"] == pytest.approx(7.45, abs=0.05)


def test_temperature_holds_a_37_degC_setpoint_within_0_3_degC() -> None:
    """From room temperature the PI heater brings 1 L to 37 °C and holds it within 0.3 °C."""
    model = BioreactorModel(BioreactorParams(temperature0=21.0))
    model.advance(6 * HOUR)
    samples = []
    for _ in range(120):
        model.advance(60.0)
        samples.append(model.true_values()["temperature"])
    assert max(abs(t - 37.0) for t in samples) < 0.3
    assert 0.0 < model.measured["heater_power"] < model.params.heater_max_w


def test_heater_failure_cools_the_culture_and_reads_zero_power() -> None:
    """A failed heater delivers no power: the bag cools towards ambient."""
    faults = FaultState()
    model = BioreactorModel(faults=faults)
    model.advance(HOUR)
    faults.heater_failed = True
    model.advance(2 * HOUR)
    assert model.measured["heater_power"] == 0.0
    assert model.true_values()["temperature"] < 33.0


def test_huge_steps_stay_finite_and_non_negative() -> None:
    """advance(3600) and one advance of 30 days keep every quantity finite and >= 0."""
    for step in (HOUR, 30 * DAY):
        model = dense_culture()
        model.controls.perfusion_sp = 0.0  # glucose and bicarbonate run out
        model.controls.co2_on = False
        elapsed = 0.0
        while elapsed < 30 * DAY:
            model.advance(step)
            elapsed += step
            for name, value in model.true_values().items():
                assert math.isfinite(value) and value >= 0.0, name
        assert model.true_values()["glucose"] < 0.5


def test_step_size_does_not_change_the_trajectory() -> None:
    """One call of a day and 8640 calls of 10 s give the same state."""
    coarse, fine = dense_culture(), dense_culture()
    coarse.advance(DAY)
    for _ in range(8640):
        fine.advance(10.0)
    for name, value in coarse.true_values().items():
        assert fine.true_values()[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_same_seed_gives_the_same_readings() -> None:
    """Noise comes from a seeded generator: equal seeds repeat, other seeds differ."""

    def readings(seed: int) -> list[float]:
        model = BioreactorModel(seed=seed)
        model.advance(HOUR)
        return [model.measured[name] for name in SENSORS]

    assert readings(7) == readings(7)
    assert readings(7) != readings(8)


def test_perfusion_exchanges_solutes_but_retains_cells() -> None:
    """Perfusion lowers lactate and raises glucose, while the filter keeps the cells in."""
    still, perfused = dense_culture(), dense_culture()
    still.controls.perfusion_sp = 0.0
    perfused.controls.perfusion_sp = 2000.0
    for model in (still, perfused):
        model.advance(DAY)
    assert perfused.true_values()["lactate"] < still.true_values()["lactate"]
    assert perfused.true_values()["glucose"] > still.true_values()["glucose"]
    assert perfused.true_values()["vcd"] >= still.true_values()["vcd"]


def test_donor_factor_scales_growth() -> None:
    """A slow donor (mu x 0.7) ends with fewer cells than a fast one (x 1.3)."""
    final = {}
    for factor in (0.7, 1.3):
        model = BioreactorModel(BioreactorParams(donor_factor=factor, lag_h=0.0))
        model.advance(4 * DAY)
        final[factor] = model.true_values()["vcd"]
    assert final[0.7] < final[1.3]


def test_adding_medium_dilutes_cells_and_removing_culture_keeps_concentrations() -> None:
    """add_volume dilutes cells and feeds glucose; remove_volume returns the composition taken."""
    model = dense_culture()
    model.controls.perfusion_sp = 0.0
    model.advance(DAY)
    before = model.true_values()
    model.add_volume(500.0)
    after = model.true_values()
    assert after["volume"] == pytest.approx(1500.0)
    assert after["vcd"] == pytest.approx(before["vcd"] * 1000.0 / 1500.0)
    assert after["glucose"] > before["glucose"]
    taken = model.remove_volume(5.0)
    assert taken["volume"] == 5.0 and taken["vcd"] == pytest.approx(after["vcd"])
    assert model.true_values()["volume"] == pytest.approx(1495.0)


def test_impossible_volume_changes_and_negative_time_are_refused() -> None:
    """Overfilling the bag, removing more than it holds and negative dt raise ValueError."""
    model = BioreactorModel()
    with pytest.raises(ValueError, match="exceeds"):
        model.add_volume(5000.0)
    with pytest.raises(ValueError, match="cannot remove"):
        model.remove_volume(model.true_values()["volume"] + 1.0)
    with pytest.raises(ValueError, match="cannot advance"):
        model.advance(-1.0)


def test_stuck_sensor_freezes_and_drift_grows_then_resets() -> None:
    """A stuck sensor repeats its value; drift adds rate x time and clears on removal."""
    faults = FaultState(stuck_sensors={"glucose"}, drift={"ph": 0.1})
    model = BioreactorModel(faults=faults, seed=2)
    model.advance(1.0)
    frozen = model.measured["glucose"]
    model.controls.perfusion_sp = 0.0
    model.advance(5 * HOUR)
    assert model.measured["glucose"] == frozen
    assert model.measured["ph"] - model.true_values()["ph"] == pytest.approx(0.5, abs=0.03)
    faults.clear()
    model.advance(60.0)
    assert model.measured["ph"] == pytest.approx(model.true_values()["ph"], abs=0.03)
    assert model.measured["glucose"] != frozen


def test_leak_loses_volume() -> None:
    """A leak of 10 mL/h empties 100 mL in 10 hours."""
    model = BioreactorModel(faults=FaultState(leak_ml_per_h=10.0))
    model.advance(10 * HOUR)
    assert model.true_values()["volume"] == pytest.approx(900.0)


def test_faults_describe_is_json_ready() -> None:
    """FaultState.describe() serialises with the stdlib json module."""
    faults = FaultState(stuck_sensors={"ph", "do"}, drift={"temperature": 0.2})
    described = json.loads(json.dumps(faults.describe()))
    assert described["stuck_sensors"] == ["do", "ph"]
    assert faults.active
    faults.clear()
    assert not faults.active


def test_benchmark_reports_days_per_minute() -> None:
    """The benchmark helper runs and reports a positive rate (the figure is for `make bench`)."""
    assert benchmark_days_per_minute(0.05) > 0.0
