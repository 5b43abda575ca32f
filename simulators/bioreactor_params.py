"""Parameters of the simulated bioreactor and the set-points of its four controllers.

``BioreactorParams`` holds every constant of the physics in ``simulators.bioreactor_model``
(units in comments, deviations from DOMAIN.md §6 in its docstring), including each sensor's lag
and noise (``SensorSpec``); ``Controls`` holds what the OPC UA server writes while the culture
runs. Both are plain dataclasses: no I/O, no behaviour beyond ``kla()``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

SENSORS = (
    "temperature",  # degC
    "do",  # % air saturation
    "ph",  # pH
    "vcd",  # viable cells/mL
    "viability",  # %
    "glucose",  # mM
    "lactate",  # mM
    "volume",  # mL
    "heater_power",  # W
)


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """A sensor's first-order lag and Gaussian noise (absolute, or relative to the value)."""

    tau_s: float  # s, first-order time constant of the measurement
    noise_sd: float  # sensor units (or fraction of the value when relative)
    relative: bool = False


@dataclass(frozen=True, slots=True)
class BioreactorParams:
    """Model parameters, units in comments.

    Deviations from DOMAIN.md §6, chosen so that the reference perfusion schedule
    (0/500/750/1000 mL/day at 2/10/15e6 cells/mL in 1 L) gives the ~30-fold 12-day expansion
    at pH 7.0-7.45 that real rocking-bag runs show:

    - ``q_glc`` 0.018 pmol/cell/h, not 0.28: at 0.28 pmol/cell/h a 1.5e7 cells/mL culture eats
      ~100 mM glucose a day and makes ~180 mM lactic acid, which 1 L/day of 25 mM medium can
      neither feed nor buffer (pH < 6). 0.018 pmol/cell/h (0.43 pmol/cell/day) is in the range
      reported for activated T cells.
    - ``k_g`` 1 mM, not 2.71 mg/mL (15 mM), which would halve growth in fresh medium.
    - ``mu_max`` 0.025 1/h (doubling 28 h, as activated T cells): with 0.020 1/h, k_d
      0.007 1/h and the lag phase even an uninhibited culture reaches only ~25-fold.
    - dead cells lyse (``k_lysis``), which DOMAIN.md leaves out; without it viability would
      sink below 70 % during a healthy expansion.
    """

    # growth and death
    mu_max: float = 0.025  # 1/h, maximum specific growth rate
    donor_factor: float = 1.0  # -, donor variability multiplier on mu (typically 0.7-1.3)
    lag_h: float = 24.0  # h, lag phase after seeding
    lag_factor: float = 0.2  # -, mu multiplier during the lag phase (mu_max/5)
    k_g: float = 1.0  # mM, glucose half-saturation (growth and uptake)
    k_l: float = 30.0  # mM, lactate inhibition constant
    k_c: float = 0.003  # mM, O2 half-saturation of growth and uptake (1.5 %DO)
    k_d: float = 0.007  # 1/h, death rate
    k_d_starved: float = 0.083  # 1/h, death rate when glucose runs out
    g_starve: float = 0.5  # mM, glucose at which the death rate is halfway to starved
    k_lysis: float = 0.05  # 1/h, lysis of dead cells
    t_opt: float = 37.0  # degC, optimal temperature
    t_width: float = 3.0  # K, width of the Gaussian f(T)
    t_damage: float = 39.5  # degC, above this heat kills cells
    k_d_heat: float = 0.02  # 1/h per K above t_damage
    ph_low: float = 6.95  # -, f(pH) = 1 between ph_low and ph_high
    ph_high: float = 7.55  # -
    ph_width: float = 0.2  # -, Gaussian fall-off outside the band
    # metabolism
    q_glc: float = 0.018  # pmol/cell/h, maximum glucose uptake
    y_lac_glc: float = 1.8  # mol lactate per mol glucose
    q_o2: float = 30.0  # amol/cell/s, maximum O2 uptake
    rq: float = 1.0  # mol CO2 made per mol O2 used
    # fresh medium
    glucose_in: float = 25.0  # mM, high-glucose serum-free T-cell medium (assumed)
    hco3_in: float = 26.0  # mM, sodium bicarbonate
    # gas transfer
    c_star: float = 0.20  # mM, O2 saturation at 37 degC under air
    kla_table: tuple[tuple[float, float], ...] = ((0.0, 3.5), (20.0, 3.5), (40.0, 65.0))  # rpm, 1/h
    kla_co2_ratio: float = 0.89  # -, kLa(CO2)/kLa(O2) (diffusivity ratio)
    co2_solubility: float = 0.03  # mM/mmHg
    pka: float = 6.1  # -, apparent pKa of CO2/HCO3-
    pressure_mmhg: float = 760.0  # mmHg, gas pressure
    air_co2_pct: float = 0.04  # %, CO2 in air (gas when the CO2 controller is off)
    gas_tau_s: float = 300.0  # s, headspace gas exchange time constant
    rocking_tau_s: float = 3.0  # s, rocker motor time constant
    # heat
    rho_cp: float = 4.18  # J/(mL·K), volumetric heat capacity of medium
    ua: float = 0.4976  # W/K, bag-to-room conductance: tau = 28 min at 200 mL, 140 min at 1 L
    ambient: float = 21.0  # degC, room (and fresh medium) temperature
    heater_max_w: float = 20.0  # W; holding 1 L at 37 degC needs ~8 W
    heater_tau_s: float = 60.0  # s, heating pad lag
    kp: float = 10.0  # W/K, proportional gain
    ti_s: float = 1200.0  # s, integral time
    td_s: float = 0.0  # s, derivative time (on the measurement)
    # the culture at seeding
    volume0: float = 1000.0  # mL
    max_volume: float = 2000.0  # mL, bag capacity
    vcd0: float = 0.5e6  # viable cells/mL
    viability0: float = 0.95  # -
    temperature0: float = 37.0  # degC
    # numerics
    max_step_s: float = 10.0  # s, longest sub-step
    sensors: tuple[tuple[str, SensorSpec], ...] = (
        ("temperature", SensorSpec(10.0, 0.02)),
        ("do", SensorSpec(30.0, 0.5)),
        ("ph", SensorSpec(20.0, 0.005)),
        ("vcd", SensorSpec(120.0, 0.01, relative=True)),
        ("viability", SensorSpec(120.0, 0.3)),
        ("glucose", SensorSpec(300.0, 0.1)),
        ("lactate", SensorSpec(300.0, 0.1)),
        ("volume", SensorSpec(5.0, 0.5)),
        ("heater_power", SensorSpec(1.0, 0.0)),
    )

    def kla(self, rpm: float) -> float:
        """Volumetric O2 transfer coefficient (1/h) at a rocking speed, interpolated linearly."""
        table = self.kla_table
        if rpm <= table[0][0]:
            return table[0][1]
        for (r0, k0), (r1, k1) in itertools.pairwise(table):
            if rpm <= r1:
                return k0 + (k1 - k0) * (rpm - r0) / (r1 - r0)
        return table[-1][1]


@dataclass(slots=True)
class Controls:
    """The set-points and on/off state of the four controllers (written by the server)."""

    temperature_sp: float = 37.0  # degC
    temperature_on: bool = True
    rocking_sp: float = 15.0  # rpm
    rocking_on: bool = True
    perfusion_sp: float = 0.0  # mL/day
    perfusion_on: bool = True
    co2_sp: float = 5.0  # % CO2 in the gas
    co2_on: bool = True
