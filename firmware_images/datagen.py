"""Synthetic sensor data for predictive maintenance of a rotating machine.

One row is one measurement window of a motor-driven machine (a pump or a fan):
speed, electrical load, temperatures, tri-axial vibration with its spectral
bands, and sound level. Each row belongs to one of four conditions
(:data:`CLASSES`), and each fault leaves the signature an analyst would look
for:

* ``imbalance`` — a once-per-revolution force: ``band_1x`` and the radial RMS
  grow with the square of the speed, and the waveform becomes more sinusoidal
  (kurtosis and crest factor fall).
* ``bearing_wear`` — impacts from a damaged race: kurtosis, crest factor,
  ``band_bpfo`` (the outer-race defect frequency) and ``band_hf`` rise, the
  bearing runs a little warmer and louder.
* ``overheating`` — failed cooling: bearing and motor temperatures rise above
  what ambient temperature and load explain.

Fault severity varies from row to row, so mild faults hide among healthy rows
and the classes overlap; signatures scale with speed and load, so a model that
can form ratios (an MLP) does better than a linear one.

Most of what separates a mild fault from a healthy row is an interaction of
features: how strongly the housing transmits vibration varies widely from
machine to machine (so a vibration band means something only against the
machine's own level), the frame resonance makes the healthy running-speed
vibration a sharp function of speed, and a motor's temperature is explained
by copper losses (current squared) over a cooling that depends on speed.
The sensors that carry those signatures are quiet, so a model large enough
to learn these functions (the cloud model) separates far more mild faults
than a small one (the device model): the gap hybrid inference closes.

:func:`generate` with the default :data:`TRAINING_CONDITIONS` draws from the
training distribution; :class:`FieldConditions` describes how the field
differs from it (covariate shift, class mix, idle machines, sensor noise).
Every value is rounded to its sensor's resolution, which also keeps the data
identical on machines whose math libraries differ in the last bit.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CLASSES",
    "FEATURES",
    "RESOLUTION_DECIMALS",
    "TRAINING_CONDITIONS",
    "Feature",
    "FieldConditions",
    "generate",
]

CLASSES: tuple[str, ...] = ("normal", "imbalance", "bearing_wear", "overheating")


@dataclass(frozen=True)
class Feature:
    """One input feature: its name, unit and the physically valid range.

    The range is what a sensor can report, not what training saw: drifted but
    genuine field data stays inside it, so leaving it means a broken sensor or
    a broken pipeline.
    """

    name: str
    unit: str
    valid_min: float
    valid_max: float


FEATURES: tuple[Feature, ...] = (
    Feature("shaft_rpm", "rpm", 0.0, 6000.0),
    Feature("motor_current_a", "A", 0.0, 100.0),
    Feature("ambient_temp_c", "degC", -40.0, 85.0),
    Feature("bearing_temp_c", "degC", -40.0, 200.0),
    Feature("motor_temp_c", "degC", -40.0, 200.0),
    Feature("vib_rms_x", "mm/s", 0.0, 100.0),
    Feature("vib_rms_y", "mm/s", 0.0, 100.0),
    Feature("vib_rms_z", "mm/s", 0.0, 100.0),
    Feature("vib_peak_mm_s", "mm/s", 0.0, 500.0),
    Feature("crest_factor", "ratio", 1.0, 30.0),
    Feature("kurtosis", "ratio", 1.0, 100.0),
    Feature("band_1x", "mm/s", 0.0, 100.0),
    Feature("band_2x", "mm/s", 0.0, 100.0),
    Feature("band_bpfo", "mm/s", 0.0, 100.0),
    Feature("band_hf", "g", 0.0, 50.0),
    Feature("acoustic_db", "dB(A)", 0.0, 140.0),
)

_INDEX: dict[str, int] = {f.name: i for i, f in enumerate(FEATURES)}

# Decimal places each sensor reports; also the fixed format of baseline.csv.
RESOLUTION_DECIMALS: tuple[int, ...] = (1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 1)

_TRAINING_CLASS_MIX: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)


@dataclass(frozen=True)
class FieldConditions:
    """How field data differs from training data; the defaults mean "no difference".

    ``covariate_shift`` maps a feature name to a shift of that feature's mean,
    in standard deviations of the feature in the training distribution (applied
    to running rows, then clipped to the valid range). ``class_mix`` gives the
    probability of each class in :data:`CLASSES` order (``None``: the training
    mix). ``idle_share`` is the share of rows taken while the machine stands
    still: ``shaft_rpm`` is exactly 0 and current and vibration are near 0;
    training data never contains such rows. ``noise_scale`` multiplies the
    measurement noise of every sensor.
    """

    covariate_shift: Mapping[str, float] = field(default_factory=dict)
    class_mix: tuple[float, ...] | None = None
    idle_share: float = 0.0
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.covariate_shift) - set(_INDEX))
        if unknown:
            raise ValueError(
                f"covariate_shift names unknown features {unknown}; "
                f"known: {[f.name for f in FEATURES]}"
            )
        # A read-only copy, so a caller's dict cannot change a frozen value later.
        object.__setattr__(
            self, "covariate_shift", types.MappingProxyType(dict(self.covariate_shift))
        )
        if self.class_mix is not None:
            mix = tuple(float(p) for p in self.class_mix)
            if len(mix) != len(CLASSES) or min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6:
                raise ValueError(
                    f"class_mix must be {len(CLASSES)} non-negative "
                    f"probabilities summing to 1, got {self.class_mix}"
                )
            object.__setattr__(self, "class_mix", mix)
        if not 0.0 <= self.idle_share <= 1.0:
            raise ValueError(f"idle_share must lie in [0, 1], got {self.idle_share}")
        if self.noise_scale < 0.0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")


TRAINING_CONDITIONS = FieldConditions()


def generate(
    n: int,
    seed: int | np.random.Generator,
    conditions: FieldConditions = TRAINING_CONDITIONS,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Draw ``n`` labelled rows under ``conditions``.

    Returns ``(X, y)``: ``X`` is float32 ``[n, 16]`` in :data:`FEATURES` order,
    every value inside its feature's valid range and rounded to its sensor's
    resolution; ``y`` is int64 ``[n]``, an index into :data:`CLASSES`. The same
    integer seed always gives the same rows. Idle rows keep the class of the
    machine (a worn bearing stays worn when the machine stops) but show no
    fault signature.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mix = conditions.class_mix if conditions.class_mix is not None else _TRAINING_CLASS_MIX
    y = rng.choice(len(CLASSES), size=n, p=np.asarray(mix, dtype=np.float64)).astype(np.int64)
    X = _running_rows(y, rng, conditions.noise_scale)

    if conditions.covariate_shift:
        std = _training_std()
        for name, sigmas in conditions.covariate_shift.items():
            j = _INDEX[name]
            X[:, j] += sigmas * std[j]

    # Idle rows replace running rows in place: for one seed, the rows that stay
    # running are the same whatever the idle share.
    idle = rng.random(n) < conditions.idle_share
    idle_rows = _idle_rows(int(idle.sum()), rng, conditions.noise_scale)
    X[idle] = idle_rows

    lo = np.array([f.valid_min for f in FEATURES])
    hi = np.array([f.valid_max for f in FEATURES])
    np.clip(X, lo, hi, out=X)
    for j, decimals in enumerate(RESOLUTION_DECIMALS):
        X[:, j] = np.round(X[:, j], decimals)
    return X.astype(np.float32), y


def _running_rows(
    y: NDArray[np.int64], rng: np.random.Generator, noise: float
) -> NDArray[np.float64]:
    """Rows of a machine at work, float64, before clipping and rounding."""
    n = y.shape[0]
    imb = (y == 1).astype(np.float64)
    brg = (y == 2).astype(np.float64)
    hot = (y == 3).astype(np.float64)
    # Severity from barely visible to pronounced: mild faults overlap healthy rows.
    severity = rng.beta(1.5, 1.5, n)
    s_imb, s_brg, s_hot = imb * severity, brg * severity, hot * severity

    rpm = rng.uniform(900.0, 3600.0, n)
    r = rpm / 3000.0
    load = rng.beta(2.5, 2.0, n)
    ambient = 24.0 + 6.0 * rng.standard_normal(n)
    # How strongly the housing transmits vibration differs from machine to
    # machine (mounting, foundation), so absolute levels alone mislead.
    mount = rng.lognormal(0.0, 1.0, n)

    def jitter(sd: float) -> NDArray[np.float64]:
        return noise * sd * rng.standard_normal(n)

    def gain(sd: float) -> NDArray[np.float64]:
        factor: NDArray[np.float64] = np.exp(noise * sd * rng.standard_normal(n))
        return factor

    current = 2.5 + 20.0 * load * (0.4 + 0.6 * r) + 1.0 * s_hot + jitter(0.6)
    # Copper losses grow with the square of the current, and a shaft-mounted
    # fan cools less at low speed, so the same load runs hotter when slow.
    cooling = 0.35 + 0.65 * r
    motor_temp = (
        ambient + 6.0 + 0.09 * current**2 / cooling + 18.0 * s_hot + 2.0 * s_brg + jitter(0.7)
    )
    bearing_temp = (
        ambient
        + 5.0
        + 10.0 * r**2
        + 8.0 * load / cooling
        + 4.0 * s_brg
        + 12.0 * s_hot
        + jitter(0.7)
    )

    # Vibration velocity components (mm/s RMS); a force at 1x revolution grows with speed².
    # The frame has a structural resonance near 2250 rpm that amplifies
    # running-speed vibration of healthy and faulty machines alike.
    f = r / 0.75
    resonance = 1.0 / np.sqrt((1.0 - f**2) ** 2 + (2.0 * 0.04 * f) ** 2)
    base = (0.6 + 1.2 * r**2 * (0.8 + 0.4 * load)) * mount
    band_1x = mount * resonance * r**2 * (0.5 * rng.lognormal(0.0, 0.08, n) + 2.0 * s_imb)
    band_2x = mount * r * (0.3 * rng.lognormal(0.0, 0.4, n) + 0.5 * s_imb * r)
    band_bpfo = mount * r * (0.15 * rng.lognormal(0.0, 0.15, n) + 1.2 * s_brg)
    band_hf = 0.03 + mount * (
        0.05 * r * rng.lognormal(0.0, 0.15, n) + 0.6 * s_brg * (0.5 + 0.5 * r)
    )
    radial = np.sqrt(base**2 + band_1x**2 + band_2x**2 + band_bpfo**2)
    axial = np.sqrt(0.5 * base**2 + (0.3 * band_1x) ** 2 + band_2x**2 + (0.5 * band_bpfo) ** 2)

    # A pure sine has kurtosis 1.5 and crest factor 1.41; impacts push both up.
    kurtosis = (3.0 + 0.5 * np.abs(rng.standard_normal(n)) + 3.0 * s_brg**1.5 - 0.6 * s_imb) * gain(
        0.1
    )
    crest = 3.0 + 1.6 * s_brg - 0.5 * s_imb + jitter(0.3)

    X = np.empty((n, len(FEATURES)), dtype=np.float64)
    X[:, _INDEX["shaft_rpm"]] = rpm + jitter(5.0)
    X[:, _INDEX["motor_current_a"]] = current
    X[:, _INDEX["ambient_temp_c"]] = ambient + jitter(0.3)
    X[:, _INDEX["bearing_temp_c"]] = bearing_temp
    X[:, _INDEX["motor_temp_c"]] = motor_temp
    X[:, _INDEX["vib_rms_x"]] = radial * gain(0.08)
    X[:, _INDEX["vib_rms_y"]] = 0.9 * radial * gain(0.08)
    X[:, _INDEX["vib_rms_z"]] = axial * gain(0.08)
    X[:, _INDEX["vib_peak_mm_s"]] = crest * X[:, _INDEX["vib_rms_x"]]
    X[:, _INDEX["crest_factor"]] = crest
    X[:, _INDEX["kurtosis"]] = kurtosis
    X[:, _INDEX["band_1x"]] = band_1x * gain(0.04)
    X[:, _INDEX["band_2x"]] = band_2x * gain(0.1)
    X[:, _INDEX["band_bpfo"]] = band_bpfo * gain(0.04)
    X[:, _INDEX["band_hf"]] = band_hf * gain(0.04)
    X[:, _INDEX["acoustic_db"]] = (
        58.0 + 10.0 * np.log10(1.0 + 2.0 * r) + 6.0 * np.log10(radial) + 3.0 * s_brg + jitter(1.5)
    )
    return X


def _idle_rows(n: int, rng: np.random.Generator, noise: float) -> NDArray[np.float64]:
    """Rows of a machine standing still: no speed, standby current, vibration floor."""
    ambient = 24.0 + 6.0 * rng.standard_normal(n)
    floor = 0.03 * rng.lognormal(0.0, 0.3 * noise, n)

    def small(scale: float) -> NDArray[np.float64]:
        return scale * rng.lognormal(0.0, 0.3 * noise, n)

    X = np.empty((n, len(FEATURES)), dtype=np.float64)
    X[:, _INDEX["shaft_rpm"]] = 0.0
    X[:, _INDEX["motor_current_a"]] = small(0.05)
    X[:, _INDEX["ambient_temp_c"]] = ambient
    # A stopped machine has cooled down to a little above ambient.
    X[:, _INDEX["bearing_temp_c"]] = ambient + small(1.0)
    X[:, _INDEX["motor_temp_c"]] = ambient + small(2.0)
    X[:, _INDEX["vib_rms_x"]] = floor
    X[:, _INDEX["vib_rms_y"]] = 0.9 * floor
    X[:, _INDEX["vib_rms_z"]] = 0.7 * floor
    crest = 3.0 + 0.25 * rng.standard_normal(n)
    X[:, _INDEX["vib_peak_mm_s"]] = crest * floor
    X[:, _INDEX["crest_factor"]] = crest
    X[:, _INDEX["kurtosis"]] = 3.0 + 0.35 * np.abs(rng.standard_normal(n))
    X[:, _INDEX["band_1x"]] = small(0.005)
    X[:, _INDEX["band_2x"]] = small(0.005)
    X[:, _INDEX["band_bpfo"]] = small(0.005)
    X[:, _INDEX["band_hf"]] = small(0.01)
    X[:, _INDEX["acoustic_db"]] = 38.0 + 2.0 * rng.standard_normal(n)
    return X


@functools.lru_cache(maxsize=1)
def _training_std() -> NDArray[np.float64]:
    """Per-feature standard deviation of the training distribution.

    Estimated once from a large fixed sample and rounded to 4 significant
    digits, so a requested shift is the same on every machine.
    """
    X, _ = generate(200_000, seed=0x5EED, conditions=TRAINING_CONDITIONS)
    std = X.astype(np.float64).std(axis=0)
    return np.array([float(f"{s:.4g}") for s in std])


def tilted(
    tilt: Mapping[str, float], n: int, seed: int, pool_size: int = 200_000
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``n`` labelled rows under pure covariate shift: ``P(label | input)`` stays as it was.

    Rows of the training distribution are resampled without replacement with
    weight ``exp(Σ β · z)`` (``z`` the standardised feature, clipped to ±4): an
    exponential tilt that moves each named feature's mean by about ``β``
    standard deviations while every row keeps its true label. (The
    ``covariate_shift`` of :class:`FieldConditions` instead moves the values
    themselves, which changes what an input means: concept drift as well.)
    """
    unknown = sorted(set(tilt) - set(_INDEX))
    if unknown:
        raise ValueError(f"tilt names unknown features {unknown}")
    if not 0 <= n <= pool_size:
        raise ValueError(f"n must lie in [0, {pool_size}], got {n}")
    pool, labels = generate(pool_size, seed)
    z = (pool - pool.mean(axis=0)) / pool.std(axis=0)
    log_w = np.zeros(pool_size)
    for name, beta in tilt.items():
        log_w += beta * np.clip(z[:, _INDEX[name]], -4, 4)
    w = np.exp(log_w - log_w.max())
    pick = np.random.default_rng(seed).choice(pool_size, size=n, replace=False, p=w / w.sum())
    return pool[pick], labels[pick]
