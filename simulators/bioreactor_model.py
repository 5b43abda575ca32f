"""Physics of a rocking-bag T-cell expansion: cells, glucose, lactate, oxygen, pH, heat, volume.

Pure Python floats and no I/O, so a 12-day culture runs in a few wall seconds. DOMAIN.md §6 is
the reference; the parameters (and where they deviate from its table) are in
``simulators.bioreactor_params``.

State and balances (t in hours; D = perfusion rate / V, applied to solutes only, because the
bag's perfusion filter retains the cells)::

    mu    = mu_max·donor·lag · G/(K_G+G) · K_L/(K_L+L) · f(T) · f(pH) · C/(K_C+C)
    dXv   = (mu - k_d)·Xv                  k_d rises to k_d_starved when glucose runs out
    dXd   = k_d·Xv - k_lysis·Xd            dead cells lyse, so viability stays realistic
    dG    = -q_G·Xv·G/(K_G+G) + D(G_in - G)
    dL    = Y_LG·(glucose uptake) - D·L
    dHCO3 = -(lactic acid made) + D(HCO3_in - HCO3)           one HCO3- per lactic acid
    dC    = kLa(C* - C) - q_O2·Xv·C/(K_C+C) + D(C* - C)        kLa from the rocking speed
    dCO2  = kLa_CO2(0.03·pCO2_gas - CO2) + RQ·OUR + (HCO3 neutralised) + D(..)
    pH    = 6.1 + log10(HCO3 / CO2)        CO2 = 0.03·pCO2 (mmHg) dissolved, mM
    heat  : rho·cp·V·dT = Q - UA(T - T_amb) - rho·cp·F(T - T_amb); Q lags heater power P;
            P from a PI(D) controller on the temperature probe (0..heater_max_w)

Integration: ``advance(dt)`` splits dt into equal sub-steps of at most ``max_step_s``. Each
sub-step is unconditionally stable and keeps every concentration non-negative: first-order
lags and the heat balance use exact exponentials, consumption terms are linearised implicitly
(``x_new = (x + h·supply) / (1 + h·(D + uptake/x_old))``) and cell growth is an exponential.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from simulators.bioreactor_params import SENSORS, BioreactorParams, Controls, SensorSpec
from simulators.faults import FaultState

__all__ = [
    "SENSORS",
    "BioreactorModel",
    "BioreactorParams",
    "Controls",
    "SensorSpec",
    "benchmark_days_per_minute",
]


@dataclass(slots=True)
class _State:
    xv: float
    xd: float
    glucose: float
    lactate: float
    o2: float  # mM
    hco3: float  # mM
    co2: float  # mM dissolved
    temperature: float
    volume: float
    heat_w: float  # heat the pad delivers to the liquid
    heater_w: float  # electrical heater power
    integral_w: float  # PI integral term
    rpm: float
    gas_co2_pct: float
    age_s: float = 0.0
    lag: dict[str, float] = field(default_factory=dict)  # lagged sensor readings


class BioreactorModel:
    """A simulated rocking-bag bioreactor. Call ``advance(dt)`` to move simulated time.

    ``controls`` holds the set-points; ``measured`` the latest sensor readings (lag, noise,
    drift and stuck sensors applied); ``true_values()`` the state itself.
    """

    def __init__(
        self,
        params: BioreactorParams | None = None,
        *,
        seed: int = 0,
        faults: FaultState | None = None,
        controls: Controls | None = None,
    ) -> None:
        self.params = p = params or BioreactorParams()
        self.faults = faults if faults is not None else FaultState()
        self.controls = controls or Controls()
        self._rng = random.Random(seed)
        self._specs = dict(p.sensors)
        gas = self.controls.co2_sp if self.controls.co2_on else p.air_co2_pct
        t0 = p.temperature0
        self._s = _State(
            xv=p.vcd0,
            xd=p.vcd0 * (1.0 - p.viability0) / p.viability0,
            glucose=p.glucose_in,
            lactate=0.0,
            o2=p.c_star,
            hco3=p.hco3_in,
            co2=p.co2_solubility * gas / 100.0 * p.pressure_mmhg,
            temperature=t0,
            volume=p.volume0,
            heat_w=p.ua * (t0 - p.ambient),
            heater_w=p.ua * (t0 - p.ambient),
            integral_w=min(max(p.ua * (t0 - p.ambient), 0.0), p.heater_max_w),
            rpm=self.controls.rocking_sp if self.controls.rocking_on else 0.0,
            gas_co2_pct=gas,
        )
        self._s.lag = self._true_sensor_values()
        self._offsets: dict[str, float] = {}
        self._frozen: dict[str, float] = {}
        self.measured: dict[str, float] = dict(self._s.lag)

    # ----------------------------------------------------------------- readings
    @property
    def elapsed_s(self) -> float:
        """Simulated seconds since seeding."""
        return self._s.age_s

    @property
    def rocking_rpm(self) -> float:
        """Actual rocking speed (rpm)."""
        return self._s.rpm

    @property
    def perfusion_ml_day(self) -> float:
        """Actual perfusion rate (mL/day): the set-point while the pump runs, else 0."""
        c = self.controls
        return max(c.perfusion_sp, 0.0) if c.perfusion_on else 0.0

    @property
    def gas_co2_pct(self) -> float:
        """CO2 in the headspace gas (%)."""
        return self._s.gas_co2_pct

    def ph(self) -> float:
        """True pH from the bicarbonate balance."""
        s = self._s
        return self.params.pka + math.log10(max(s.hco3, 0.01) / max(s.co2, 1e-4))

    def _true_sensor_values(self) -> dict[str, float]:
        s = self._s
        total = s.xv + s.xd
        return {
            "temperature": s.temperature,
            "do": 100.0 * s.o2 / self.params.c_star,
            "ph": self.ph(),
            "vcd": s.xv,
            "viability": 100.0 * s.xv / total if total > 0 else 0.0,
            "glucose": s.glucose,
            "lactate": s.lactate,
            "volume": s.volume,
            "heater_power": s.heater_w,
        }

    def true_values(self) -> dict[str, float]:
        """The true state in sensor units, plus dead cells, bicarbonate, CO2 and culture age."""
        s = self._s
        values = self._true_sensor_values()
        values.update(
            dead_cells=s.xd,
            hco3=s.hco3,
            pco2_mmhg=s.co2 / self.params.co2_solubility,
            age_h=s.age_s / 3600.0,
        )
        return values

    # ----------------------------------------------------------------- actions
    def add_volume(self, ml: float, medium: bool = True) -> None:
        """Add ``ml`` of liquid at ambient temperature: fresh medium (glucose, bicarbonate,
        air-saturated O2) or, with ``medium=False``, a solution without nutrients or buffer
        (saline) that only dilutes. Raises ``ValueError`` beyond the bag's capacity."""
        if not ml >= 0:
            raise ValueError(f"bioreactor: cannot add {ml!r} mL")
        s, p = self._s, self.params
        if s.volume + ml > p.max_volume:
            raise ValueError(
                f"bioreactor: adding {ml:.1f} mL to {s.volume:.1f} mL exceeds the "
                f"{p.max_volume:.0f} mL bag"
            )
        v0, v1 = s.volume, s.volume + ml
        keep, new = v0 / v1, ml / v1
        gas_eq = p.co2_solubility * s.gas_co2_pct / 100.0 * p.pressure_mmhg
        s.xv *= keep
        s.xd *= keep
        s.lactate *= keep
        s.glucose = s.glucose * keep + (p.glucose_in * new if medium else 0.0)
        s.hco3 = s.hco3 * keep + (p.hco3_in * new if medium else 0.0)
        s.o2 = s.o2 * keep + p.c_star * new
        s.co2 = s.co2 * keep + gas_eq * new
        s.temperature = s.temperature * keep + p.ambient * new
        s.volume = v1

    def remove_volume(self, ml: float) -> dict[str, float]:
        """Remove ``ml`` of culture (a sample or a harvest) and return what was taken: the true
        composition (cells/mL, viability %, mM, pH) and the volume removed."""
        s = self._s
        if not 0 <= ml <= s.volume:
            raise ValueError(f"bioreactor: cannot remove {ml!r} mL from {s.volume:.1f} mL")
        taken = self._true_sensor_values()
        del taken["heater_power"], taken["temperature"]
        taken["volume"] = float(ml)
        s.volume -= ml
        return taken

    # ----------------------------------------------------------------- integration
    def advance(self, dt_s: float) -> None:
        """Move the culture ``dt_s`` simulated seconds forward, in sub-steps of at most
        ``params.max_step_s``; then refresh ``measured``."""
        if not dt_s >= 0 or math.isinf(dt_s):
            raise ValueError(f"bioreactor: cannot advance by {dt_s!r} s")
        if dt_s == 0:
            return
        p, s, c, f = self.params, self._s, self.controls, self.faults
        n = max(1, math.ceil(dt_s / p.max_step_s))
        h = dt_s / n  # s
        hh = h / 3600.0  # h
        exp = math.exp

        # constants of this call: inputs are held while it runs
        v = max(s.volume, 1.0)
        flow = self.perfusion_ml_day / 86400.0  # mL/s
        d = flow * 3600.0 / v  # 1/h
        cond = p.ua + p.rho_cp * flow  # W/K: bag walls plus cold medium flowing through
        a_temp = exp(-h * cond / (p.rho_cp * v))
        a_heat = exp(-h / p.heater_tau_s)
        a_rock = exp(-h / p.rocking_tau_s)
        a_gas = exp(-h / p.gas_tau_s)
        specs = self._specs
        a_sens = {name: exp(-h / max(spec.tau_s, 1e-9)) for name, spec in specs.items()}
        rpm_cmd = max(c.rocking_sp, 0.0) if c.rocking_on else 0.0
        gas_cmd = max(c.co2_sp, 0.0) if c.co2_on else p.air_co2_pct
        t_on, t_sp = c.temperature_on, c.temperature_sp
        kp, ki, kd_gain = p.kp, p.kp / p.ti_s, p.kp * p.td_s
        pmax, failed = p.heater_max_w, f.heater_failed
        drift_t = self._offsets.get("temperature", 0.0)
        frozen_t = self._frozen.get("temperature")
        mu0 = p.mu_max * p.donor_factor
        lag_end = p.lag_h * 3600.0
        qg = p.q_glc * 1e-6  # mM/h per (cells/mL)
        qo = p.q_o2 * 3.6e-9  # mM/h per (cells/mL)
        gs4 = p.g_starve**4
        co2_gas_k = p.co2_solubility * p.pressure_mmhg / 100.0  # mM dissolved per % CO2
        c_star, k_c, k_g, k_l = p.c_star, p.k_c, p.k_g, p.k_l
        g_in, hco3_in, y_lg = p.glucose_in, p.hco3_in, p.y_lac_glc
        lysis, kd0, kd_st = p.k_lysis, p.k_d, p.k_d_starved
        kla_of, log10 = p.kla, math.log10

        xv, xd, g, lac, o2 = s.xv, s.xd, s.glucose, s.lactate, s.o2
        hco3, co2, temp = s.hco3, s.co2, s.temperature
        heat, integ, rpm, gas, age = s.heat_w, s.integral_w, s.rpm, s.gas_co2_pct, s.age_s
        lag = s.lag
        l_t, l_do, l_ph, l_vcd = lag["temperature"], lag["do"], lag["ph"], lag["vcd"]
        l_via, l_g, l_l, l_p = lag["viability"], lag["glucose"], lag["lactate"], lag["heater_power"]
        a_t, a_do, a_ph, a_vcd = a_sens["temperature"], a_sens["do"], a_sens["ph"], a_sens["vcd"]
        a_via, a_g, a_l, a_p = (
            a_sens["viability"],
            a_sens["glucose"],
            a_sens["lactate"],
            (a_sens["heater_power"]),
        )
        power = s.heater_w
        prev_probe = l_t + drift_t if frozen_t is None else frozen_t

        for _ in range(n):
            # actuators
            rpm = rpm_cmd + (rpm - rpm_cmd) * a_rock
            gas = gas_cmd + (gas - gas_cmd) * a_gas
            # temperature control on the probe reading
            probe = l_t + drift_t if frozen_t is None else frozen_t
            if t_on:
                err = t_sp - probe
                u = kp * err + integ - kd_gain * (probe - prev_probe) / h
                # conditional integration: no wind-up while the output is saturated
                if (err > 0 and u < pmax) or (err < 0 and u > 0):
                    integ = min(max(integ + ki * err * h, 0.0), pmax)
                power = 0.0 if failed else min(max(u, 0.0), pmax)
            else:
                integ = 0.0
                power = 0.0
            prev_probe = probe
            heat = power + (heat - power) * a_heat
            t_eq = p.ambient + heat / cond
            temp = t_eq + (temp - t_eq) * a_temp
            # growth and death
            ph = p.pka + log10((hco3 if hco3 > 0.01 else 0.01) / (co2 if co2 > 1e-4 else 1e-4))
            if ph < p.ph_low:
                f_ph = exp(-0.5 * ((ph - p.ph_low) / p.ph_width) ** 2)
            elif ph > p.ph_high:
                f_ph = exp(-0.5 * ((ph - p.ph_high) / p.ph_width) ** 2)
            else:
                f_ph = 1.0
            f_t = exp(-0.5 * ((temp - p.t_opt) / p.t_width) ** 2)
            mu = mu0 * (1.0 if age >= lag_end else p.lag_factor)
            mu *= g / (k_g + g) * k_l / (k_l + lac) * f_t * f_ph * o2 / (k_c + o2)
            g4 = g * g * g * g
            kd = kd0 + (kd_st - kd0) * gs4 / (gs4 + g4)
            if temp > p.t_damage:
                kd += p.k_d_heat * (temp - p.t_damage)
            xd = (xd + kd * xv * hh) / (1.0 + lysis * hh)
            xv *= exp((mu - kd) * hh)
            # glucose, lactate, bicarbonate (implicit in the consumed species)
            up_g = qg * xv / (k_g + g)
            g = (g + hh * d * g_in) / (1.0 + hh * (d + up_g))
            lac_made = y_lg * up_g * g
            lac = (lac + hh * lac_made) / (1.0 + hh * d)
            up_b = lac_made / (hco3 + 0.1)
            hco3 = (hco3 + hh * d * hco3_in) / (1.0 + hh * (d + up_b))
            # oxygen and carbon dioxide
            kla = kla_of(rpm)
            up_o = qo * xv / (k_c + o2)
            o2 = (o2 + hh * (kla + d) * c_star) / (1.0 + hh * (kla + d + up_o))
            kla_c = kla * p.kla_co2_ratio
            co2_eq = co2_gas_k * gas
            made = p.rq * up_o * o2 + up_b * hco3
            co2 = (co2 + hh * ((kla_c + d) * co2_eq + made)) / (1.0 + hh * (kla_c + d))
            # sensor lags
            l_t = temp + (l_t - temp) * a_t
            l_do = 100.0 * o2 / c_star + (l_do - 100.0 * o2 / c_star) * a_do
            l_ph = ph + (l_ph - ph) * a_ph
            l_vcd = xv + (l_vcd - xv) * a_vcd
            via = 100.0 * xv / (xv + xd) if xv + xd > 0 else 0.0
            l_via = via + (l_via - via) * a_via
            l_g = g + (l_g - g) * a_g
            l_l = lac + (l_l - lac) * a_l
            l_p = power + (l_p - power) * a_p
            age += h

        s.xv, s.xd, s.glucose, s.lactate, s.o2 = xv, xd, g, lac, o2
        s.hco3, s.co2, s.temperature = hco3, co2, temp
        s.heat_w, s.heater_w, s.integral_w, s.rpm, s.gas_co2_pct, s.age_s = (
            heat,
            power,
            integ,
            rpm,
            gas,
            age,
        )
        if f.leak_ml_per_h > 0:
            s.volume = max(s.volume - f.leak_ml_per_h * dt_s / 3600.0, 0.0)
        vol_a = a_sens["volume"] ** n
        lag.update(
            temperature=l_t,
            do=l_do,
            ph=l_ph,
            vcd=l_vcd,
            viability=l_via,
            glucose=l_g,
            lactate=l_l,
            heater_power=l_p,
            volume=s.volume + (lag["volume"] - s.volume) * vol_a,
        )
        self._update_measured(dt_s)

    def _update_measured(self, dt_s: float) -> None:
        """Apply drift, noise and stuck sensors to the lagged readings."""
        f, gauss = self.faults, self._rng.gauss
        for name in list(self._offsets):
            if name not in f.drift:
                del self._offsets[name]  # drift fault cleared: the sensor is recalibrated
        for name, rate in f.drift.items():
            self._offsets[name] = self._offsets.get(name, 0.0) + rate * dt_s / 3600.0
        frozen_names = f.stuck_sensors | f.failed_sensors
        for name in list(self._frozen):
            if name not in frozen_names:
                del self._frozen[name]
        for name, spec in self._specs.items():
            if name in frozen_names:
                self._frozen.setdefault(name, self.measured[name])
                self.measured[name] = self._frozen[name]
                continue
            value = self._s.lag[name] + self._offsets.get(name, 0.0)
            if spec.noise_sd > 0:
                value += gauss(0.0, spec.noise_sd * (abs(value) if spec.relative else 1.0))
            if name != "temperature":
                value = max(value, 0.0)
            if name == "viability":
                value = min(value, 100.0)
            self.measured[name] = value


def benchmark_days_per_minute(seconds: float = 3.0) -> float:
    """Simulated days per wall-clock minute of the full model, measured for about ``seconds``
    on a dense, perfused culture (the expensive case)."""
    model = BioreactorModel(BioreactorParams(vcd0=5e6), seed=1)
    model.controls.perfusion_sp = 1000.0
    start = time.perf_counter()
    simulated = 0.0
    while (elapsed := time.perf_counter() - start) < seconds:
        model.advance(3600.0)
        simulated += 3600.0
    return simulated / 86400.0 / elapsed * 60.0
