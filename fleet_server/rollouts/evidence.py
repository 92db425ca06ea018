"""What the gates judge: per-device aggregates of a rollout turned into each gate's evidence.

The rules, over plain data (no database, no clock of its own):

1. The unit is the device. Waves are randomised by device (the bucket of
   :mod:`~fleet_server.rollouts.waves`), so every comparison treats a device's
   aggregate as one observation: two devices on different lines differ by more
   than their requests' noise, and a test that pooled requests would take that
   difference for an effect of the version.
2. Each comparison is an estimate of treatment against control with a
   cluster-robust standard error (device residuals). Where a device's own
   pre-rollout value exists it is subtracted first (a change score, the
   CUPED-style adjustment of Deng, Xu, Kohavi, Walker 2013), which removes
   most of the device-to-device spread and buys the power that makes the
   first, small wave decidable.
3. A variance estimated from few devices can come out below what the counts
   alone imply; rates and proportions are floored at their Poisson or
   binomial variance, which heterogeneity only adds to.
4. Evidence that cannot be estimated (too few devices in an arm, no events)
   is NaN, never zero: the gates read NaN as inconclusive.
5. Install failures are counted over every install of the rollout so far, so
   their evidence accumulates across waves; a device silent past the timeout
   after its install counts as failed, never as passing.
6. The shadow stage has no control group: each wave-1 device runs the new
   release as a shadow beside its active model, so the shadow is compared with
   the active model *on the same devices and hours* (:class:`ShadowDevice`):
   its error rate against the active model's, its log p95 against the active
   model's device by device (a paired mean), and its agreement with the answers
   served as a share of its requests. Devices remain the units.
7. In the shadow stage the install gate judges the shadow installs
   (:func:`shadow_install_tally`): a refusal is a failed install, and so is a
   shadow that never runs while its device serves; the sample-ratio test
   counts the devices whose shadow reports requests against the control's
   devices reporting windows (:func:`shadow_reporting`).

The array functions (:class:`RateSums`, :class:`MeanSums`, :func:`log_rate_ratio`,
:func:`arm_rates`, :func:`ratio_difference`, :func:`mean_difference`) work elementwise, so many
rollouts' sums can be judged in one call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

Arm = Literal["treatment", "control"]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

INSTALL_FAILURES = "install_failures"
FALLBACK_RATE = "fallback_rate"
LATENCY_P95 = "latency_p95"
ACCURACY_ESTIMATED = "accuracy_estimated"
ACCURACY_LABELLED = "accuracy_labelled"
CLASS_MIX = "class_mix"
SHADOW_ERRORS = "shadow_errors"
SHADOW_LATENCY_P95 = "shadow_latency_p95"
SHADOW_AGREEMENT = "shadow_agreement"
# The gates of the shadow stage; no other stage judges them, and they judge no other.
SHADOW_GATES = frozenset({SHADOW_ERRORS, SHADOW_LATENCY_P95, SHADOW_AGREEMENT})


@dataclass(frozen=True)
class DeviceAggregate:
    """One device's windows since it joined its arm, summed (kept up to date as windows arrive).

    ``expected_fallbacks`` is ``requests`` times the device's own fallback rate
    before the rollout: the exposure the fallback gate compares against. Give
    a device that never fell back a rate from a prior count (one fallback in
    its history plus the fleet's usual share), not zero: with no exposure it is
    left out. ``log_p95`` is the log of the p95 of its merged latency
    histogram; ``accuracy`` its CBPE estimate from its release's own
    calibration. ``pre_*`` are the device's values on the current version
    before the rollout; ``None`` where the device has none (it is then left
    out of that comparison). ``classes`` counts the requests per predicted class.
    """

    device_id: str
    arm: Arm
    requests: int = 0
    fallbacks: int = 0
    expected_fallbacks: float = 0.0
    log_p95: float | None = None
    pre_log_p95: float | None = None
    accuracy: float | None = None
    pre_accuracy: float | None = None
    labelled: int = 0
    correct: int = 0
    windows: int = 0
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """An effect of treatment over control and its standard error, devices as the units.

    ``estimate`` and ``se`` are NaN when the effect cannot be estimated.
    ``samples_*`` count what the gate's minimum is about: requests, or labels
    for the labelled accuracy gate. ``rates``: each arm's events per request,
    for a gate that has an absolute bound beside its ratio (the fallback gate);
    ``None`` for the others.
    """

    estimate: float
    se: float
    n_treatment: int
    n_control: int
    samples_treatment: int
    samples_control: int
    rates: ArmRates | None = None


class ArmRates(NamedTuple):
    """Each arm's events per request, adjusted to the treatment devices' own baseline, and the
    variance of each (:func:`arm_rates`); arrays or floats, NaN where there is no estimate."""

    treatment: npt.ArrayLike
    treatment_var: npt.ArrayLike
    control: npt.ArrayLike
    control_var: npt.ArrayLike


class InstallTally(NamedTuple):
    """Installs with an outcome so far and how many of them failed."""

    failures: int
    installs: int


@dataclass(frozen=True)
class InstallRecord:
    """One device's install of the rollout's release, as its events and heartbeats tell it.

    ``result`` is ``None`` while the install has no outcome; ``last_seen`` is
    the device's latest report of any kind after ``started_at`` (``None``: none).
    """

    device_id: str
    started_at: datetime
    result: Literal["committed", "failed"] | None = None
    last_seen: datetime | None = None


Evidence = Comparison | InstallTally


class RateSums(NamedTuple):
    """Per-arm sums of device counts ``x`` and exposures ``e``: what a rate ratio needs.

    Each field is an array; elementwise over whatever the leading axes hold
    (one rollout, or many side by side).
    """

    devices: FloatArray
    counts: FloatArray
    exposure: FloatArray
    counts_sq: FloatArray
    cross: FloatArray
    exposure_sq: FloatArray

    @classmethod
    def of(
        cls, counts: npt.ArrayLike, exposure: npt.ArrayLike, where: npt.ArrayLike | None = None
    ) -> RateSums:
        """The sums over the last axis, of the devices ``where`` is true (all by default)."""
        x = np.asarray(counts, dtype=np.float64)
        e = np.asarray(exposure, dtype=np.float64)
        m = np.ones(x.shape, dtype=bool) if where is None else np.asarray(where, dtype=bool)
        x, e = np.where(m, x, 0.0), np.where(m, e, 0.0)
        return cls(
            m.sum(-1, dtype=np.float64),
            x.sum(-1),
            e.sum(-1),
            (x * x).sum(-1),
            (x * e).sum(-1),
            (e * e).sum(-1),
        )


class MeanSums(NamedTuple):
    """Per-arm sums of one value per device: what a difference of means needs."""

    devices: FloatArray
    total: FloatArray
    total_sq: FloatArray

    @classmethod
    def of(cls, values: npt.ArrayLike, where: npt.ArrayLike | None = None) -> MeanSums:
        """The sums over the last axis, of the devices ``where`` is true (all by default)."""
        y = np.asarray(values, dtype=np.float64)
        m = np.ones(y.shape, dtype=bool) if where is None else np.asarray(where, dtype=bool)
        y = np.where(m, y, 0.0)
        return cls(m.sum(-1, dtype=np.float64), y.sum(-1), (y * y).sum(-1))


def _robust_ratio(arm: RateSums) -> tuple[FloatArray, FloatArray]:
    """The arm's ratio ``sum x / sum e`` and the cluster-robust variance of ``sum x``.

    Device residuals ``x_i - ratio e_i`` squared and summed, with the small-
    sample factor ``n / (n - 1)``: a sandwich variance, so devices that differ
    add their spread instead of passing for signal.
    """
    n = arm.devices
    ratio = arm.counts / arm.exposure
    residual = arm.counts_sq - 2.0 * ratio * arm.cross + ratio * ratio * arm.exposure_sq
    var = np.maximum(residual, 0.0) * n / (n - 1.0)
    return ratio, var


def log_rate_ratio(treatment: RateSums, control: RateSums) -> tuple[FloatArray, FloatArray]:
    """``log(rate_t / rate_c)`` and its standard error; NaN without two devices and events per arm.

    The rate of an arm is ``sum x / sum e``; the variance of its log, by the
    delta method, is the robust variance of ``sum x`` over ``(sum x)^2``,
    floored at the Poisson ``1 / sum x``. ``e`` is the requests, or each
    device's expected count from its own pre-rollout rate.
    """
    logs, variances = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for arm in (treatment, control):
            ratio, var = _robust_ratio(arm)
            ok = (arm.devices >= 2) & (arm.counts > 0) & (arm.exposure > 0)
            logs.append(np.where(ok, np.log(ratio), np.nan))
            variances.append(
                np.where(ok, np.maximum(var / arm.counts**2, 1.0 / arm.counts), np.nan)
            )
    return logs[0] - logs[1], np.sqrt(variances[0] + variances[1])


def arm_rates(treatment: RateSums, control: RateSums, requests: npt.ArrayLike) -> ArmRates:
    """Each arm's events per request at the treatment devices' own baseline, and its variance.

    With expected counts ``e`` as exposures, ``sum x / sum e`` is an arm's rate
    relative to its devices' own rates before; times the treatment's own rate
    before per request (``sum e_t / requests``) it is events per request, adjusted
    for each device's baseline as the ratio is, so the difference of the two arms
    is the treatment's extra share of requests. Each variance is the robust one,
    floored at the Poisson variance of the arm's count, an arm with no events
    counting half of one (all quiet is not certainty). NaN below two devices or
    with no exposure in an arm.
    """
    r = np.asarray(requests, dtype=np.float64)
    rates, variances = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        base = np.where(r > 0, treatment.exposure / r, np.nan)
        for arm in (treatment, control):
            ratio, var = _robust_ratio(arm)
            ok = (arm.devices >= 2) & (arm.exposure > 0)
            var = np.where(arm.counts > 0, var, 0.0)
            floor = np.maximum(arm.counts, 0.5) / arm.exposure**2
            rates.append(np.where(ok, base * ratio, np.nan))
            variances.append(
                np.where(ok, base**2 * np.maximum(var / arm.exposure**2, floor), np.nan)
            )
    return ArmRates(rates[0], variances[0], rates[1], variances[1])


def ratio_difference(treatment: RateSums, control: RateSums) -> tuple[FloatArray, FloatArray]:
    """``sum x / sum e`` of treatment minus control (a proportion: correct of labelled), and its se.

    Each arm's variance is the robust variance of ``sum x`` over ``(sum e)^2``,
    floored at the binomial ``p (1 - p) / sum e`` with ``p`` kept half a count
    from 0 and 1 (all correct is not certainty).
    """
    means, variances = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for arm in (treatment, control):
            ratio, var = _robust_ratio(arm)
            ok = (arm.devices >= 2) & (arm.exposure > 0)
            p = np.clip(ratio, 0.5 / arm.exposure, 1.0 - 0.5 / arm.exposure)
            floor = p * (1.0 - p) / arm.exposure
            means.append(np.where(ok, ratio, np.nan))
            variances.append(np.where(ok, np.maximum(var / arm.exposure**2, floor), np.nan))
    return means[0] - means[1], np.sqrt(variances[0] + variances[1])


def mean_difference(treatment: MeanSums, control: MeanSums) -> tuple[FloatArray, FloatArray]:
    """Difference of the arms' per-device means and its (Welch) se; NaN below two devices an arm."""
    means, variances = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for arm in (treatment, control):
            n = arm.devices
            mean = arm.total / n
            var = np.maximum(arm.total_sq - n * mean * mean, 0.0) / (n - 1.0)
            ok = n >= 2
            means.append(np.where(ok, mean, np.nan))
            variances.append(np.where(ok, var / n, np.nan))
    return means[0] - means[1], np.sqrt(variances[0] + variances[1])


def _comparison(
    effect: tuple[FloatArray, FloatArray], devices: tuple[int, int], samples: tuple[int, int]
) -> Comparison:
    estimate, se = float(effect[0]), float(effect[1])
    if not (math.isfinite(estimate) and math.isfinite(se) and se > 0):
        estimate = se = math.nan
    return Comparison(estimate, se, devices[0], devices[1], samples[0], samples[1])


def _split(devices: Iterable[DeviceAggregate]) -> tuple[list[DeviceAggregate], ...]:
    treatment = [d for d in devices if d.arm == "treatment"]
    control = [d for d in devices if d.arm == "control"]
    return treatment, control


def fallback_evidence(devices: Sequence[DeviceAggregate]) -> Comparison:
    """Fallback gate: log ratio of fallbacks over expected fallbacks, treatment to control,
    and each arm's fallbacks per request (:func:`arm_rates`).

    Each device's expected count (its requests at its own pre-rollout rate) is
    its exposure, so a device on a noisy line is compared with itself. The rates
    per request are what the gate's absolute bound judges, which decides where
    the control's rate is zero or tiny (no ratio over a control that never falls
    back). Devices with no requests or no expected fallbacks are left out.
    """
    arms = [
        [d for d in arm if d.requests > 0 and d.expected_fallbacks > 0] for arm in _split(devices)
    ]
    sums = [
        RateSums.of([d.fallbacks for d in arm], [d.expected_fallbacks for d in arm]) for arm in arms
    ]
    requests = tuple(sum(d.requests for d in arm) for arm in arms)
    ratio = _comparison(
        log_rate_ratio(sums[0], sums[1]), (len(arms[0]), len(arms[1])), (requests[0], requests[1])
    )
    rates = ArmRates(*(float(np.asarray(x)) for x in arm_rates(sums[0], sums[1], requests[0])))
    return dataclasses.replace(ratio, rates=rates)


def _change_evidence(devices: Sequence[DeviceAggregate], value: str, before: str) -> Comparison:
    arms = []
    for arm in _split(devices):
        kept = [
            d
            for d in arm
            if d.windows > 0
            and getattr(d, value) is not None
            and getattr(d, before) is not None
            and math.isfinite(getattr(d, value) - getattr(d, before))
        ]
        arms.append(kept)
    sums = [MeanSums.of([getattr(d, value) - getattr(d, before) for d in arm]) for arm in arms]
    requests = tuple(sum(d.requests for d in arm) for arm in arms)
    return _comparison(
        mean_difference(sums[0], sums[1]), (len(arms[0]), len(arms[1])), (requests[0], requests[1])
    )


def latency_evidence(devices: Sequence[DeviceAggregate]) -> Comparison:
    """Latency gate: difference of mean change in log p95 (since before the rollout), per device.

    A difference of 0.1 is about 10 % slower. Devices without a p95 now and
    before are left out.
    """
    return _change_evidence(devices, "log_p95", "pre_log_p95")


def accuracy_evidence(devices: Sequence[DeviceAggregate]) -> Comparison:
    """Estimated-accuracy gate: difference of mean change in CBPE accuracy, per device.

    CBPE is computed from each release's own calibration, so the treatment's
    value estimates the new version's accuracy and the control's the current one's.
    """
    return _change_evidence(devices, "accuracy", "pre_accuracy")


def labelled_accuracy_evidence(devices: Sequence[DeviceAggregate]) -> Comparison:
    """Labelled-accuracy gate: correct over labelled, treatment minus control."""
    arms = [[d for d in arm if d.labelled > 0] for arm in _split(devices)]
    sums = [RateSums.of([d.correct for d in arm], [d.labelled for d in arm]) for arm in arms]
    labels = tuple(sum(d.labelled for d in arm) for arm in arms)
    return _comparison(
        ratio_difference(sums[0], sums[1]), (len(arms[0]), len(arms[1])), (labels[0], labels[1])
    )


def class_mix_evidence(devices: Sequence[DeviceAggregate]) -> Comparison:
    """Class-mix gate: how far the predicted classes moved, as a total variation distance.

    Each device's class shares (its counts over its requests); the distance is
    half the sum of the absolute differences of the arms' mean shares. Its se
    is the delta method's: the distance is the difference of the arms' means of
    ``s . shares / 2`` with ``s`` the signs of the differences. The signs are
    read from the data, which biases the distance up near zero: this gate warns,
    it never stops.
    """
    arms = [[d for d in arm if sum(d.classes) > 0] for arm in _split(devices)]
    width = max((len(d.classes) for arm in arms for d in arm), default=0)
    requests = tuple(sum(d.requests for d in arm) for arm in arms)
    sizes = (len(arms[0]), len(arms[1]))
    if width == 0 or min(sizes) < 2:
        return Comparison(math.nan, math.nan, sizes[0], sizes[1], requests[0], requests[1])
    shares = []
    for arm in arms:
        counts = np.zeros((len(arm), width))
        for row, d in enumerate(arm):
            counts[row, : len(d.classes)] = d.classes
        shares.append(counts / counts.sum(1, keepdims=True))
    signs = np.sign(shares[0].mean(0) - shares[1].mean(0))
    projected = [MeanSums.of(0.5 * (s @ signs)) for s in shares]
    return _comparison(
        mean_difference(projected[0], projected[1]), sizes, (requests[0], requests[1])
    )


def install_tally(
    records: Iterable[InstallRecord], now: datetime, timeout: timedelta
) -> InstallTally:
    """Failures among the installs with an outcome at ``now``.

    Failed: the device reported a failure (a refusal, a failed self-test, a
    watchdog rollback), or it has been silent longer than ``timeout`` since its
    install or its last report, or ``timeout`` passed with no outcome. Succeeded:
    committed and still reporting. Anything else has no outcome yet.
    """
    failures = installs = 0
    for record in records:
        heard = max(record.started_at, record.last_seen or record.started_at)
        silent = now - heard > timeout
        overdue = record.result is None and now - record.started_at > timeout
        if record.result == "failed" or silent or overdue:
            failures += 1
            installs += 1
        elif record.result == "committed":
            installs += 1
    return InstallTally(failures, installs)


def reporting(devices: Iterable[DeviceAggregate]) -> tuple[int, int]:
    """Devices with at least one window, treatment then control: the counts for the SRM test."""
    treatment = control = 0
    for d in devices:
        if d.windows > 0:
            if d.arm == "treatment":
                treatment += 1
            else:
                control += 1
    return treatment, control


def gather(devices: Sequence[DeviceAggregate], installs: InstallTally) -> dict[str, Evidence]:
    """Every gate's evidence, by gate name."""
    return {
        INSTALL_FAILURES: installs,
        FALLBACK_RATE: fallback_evidence(devices),
        LATENCY_P95: latency_evidence(devices),
        ACCURACY_ESTIMATED: accuracy_evidence(devices),
        ACCURACY_LABELLED: labelled_accuracy_evidence(devices),
        CLASS_MIX: class_mix_evidence(devices),
    }


# --------------------------------------------------------------------------- the shadow stage


@dataclass(frozen=True)
class ShadowDevice:
    """One device's shadow stage so far: its windows' shadow sections summed, and the
    active model's windows of the same hours.

    ``requests`` the shadow ran on, of them ``agreements`` with the answer served
    and ``errors`` (the runtime raised, or an output was not finite); ``log_p95``
    the log of the shadow's p95 latency. ``active_*``: the active model's
    requests, errors and log p95 on the same device.
    """

    device_id: str
    requests: int = 0
    agreements: int = 0
    errors: int = 0
    log_p95: float | None = None
    active_requests: int = 0
    active_errors: int = 0
    active_log_p95: float | None = None


def shadow_errors_evidence(devices: Sequence[ShadowDevice]) -> Comparison:
    """Shadow-error gate: the shadow's error rate minus the active model's, on the same devices.

    Each arm's rate is errors over requests with the cluster-robust, binomial-
    floored variance of :func:`ratio_difference`; treating the two arms of one
    device as independent overstates the variance of their difference when
    they move together, which only makes the test slower, never wrong.
    """
    kept = [d for d in devices if d.requests > 0 and d.active_requests > 0]
    shadow = RateSums.of([d.errors for d in kept], [d.requests for d in kept])
    active = RateSums.of([d.active_errors for d in kept], [d.active_requests for d in kept])
    samples = (sum(d.requests for d in kept), sum(d.active_requests for d in kept))
    return _comparison(ratio_difference(shadow, active), (len(kept), len(kept)), samples)


def shadow_latency_evidence(devices: Sequence[ShadowDevice]) -> Comparison:
    """Shadow-latency gate: mean over devices of log p95 of the shadow minus the active
    model's (0.1 is about 10 % slower), with the se of a paired mean."""
    kept = [
        d
        for d in devices
        if d.log_p95 is not None
        and d.active_log_p95 is not None
        and math.isfinite(d.log_p95 - d.active_log_p95)
    ]
    y = np.array([float(d.log_p95 or 0.0) - float(d.active_log_p95 or 0.0) for d in kept])
    n = len(kept)
    samples = (sum(d.requests for d in kept), sum(d.active_requests for d in kept))
    if n < 2:
        return Comparison(math.nan, math.nan, n, n, samples[0], samples[1])
    se = np.sqrt(np.asarray(y.var(ddof=1) / n, dtype=np.float64))
    return _comparison((np.asarray(y.mean(), dtype=np.float64), se), (n, n), samples)


def shadow_agreement_evidence(devices: Sequence[ShadowDevice]) -> Comparison:
    """Agreement gate: the share of shadow requests whose answer agreed with the one served.

    One arm, judged against a minimum share (the gate's ``allowed_rate``): the
    ratio of sums over devices, its variance the cluster-robust one floored at
    the binomial (with the share kept half a count from 0 and 1).
    """
    kept = [d for d in devices if d.requests > 0]
    sums = RateSums.of([d.agreements for d in kept], [d.requests for d in kept])
    with np.errstate(divide="ignore", invalid="ignore"):
        share, var = _robust_ratio(sums)
        exposure = sums.exposure
        p = np.clip(share, 0.5 / exposure, 1.0 - 0.5 / exposure)
        se = np.sqrt(np.maximum(var / exposure**2, p * (1.0 - p) / exposure))
    requests = int(sums.exposure)
    if len(kept) < 2:
        return Comparison(math.nan, math.nan, len(kept), len(kept), requests, requests)
    return _comparison((share, se), (len(kept), len(kept)), (requests, requests))


def gather_shadow(devices: Sequence[ShadowDevice]) -> dict[str, Evidence]:
    """Every shadow gate's evidence, by gate name."""
    return {
        SHADOW_ERRORS: shadow_errors_evidence(devices),
        SHADOW_LATENCY_P95: shadow_latency_evidence(devices),
        SHADOW_AGREEMENT: shadow_agreement_evidence(devices),
    }


@dataclass(frozen=True)
class ShadowInstall:
    """One wave-1 device's shadow install, as its events, reports and windows tell it.

    ``started_at``: when the rollout gave it the shadow; ``result``: its latest
    ``shadow-installed`` or ``shadow-refused`` event since (``None``: neither
    yet), ``installed_at`` the time of a ``shadow-installed``; ``last_seen`` its
    latest report of any kind after ``started_at``. ``shadow_requests``: the
    requests its shadow ran on in the stage; ``active_requests``: those its
    active model answered in the same hours.
    """

    device_id: str
    started_at: datetime
    result: Literal["installed", "refused"] | None = None
    installed_at: datetime | None = None
    last_seen: datetime | None = None
    shadow_requests: int = 0
    active_requests: int = 0


def shadow_install_tally(
    installs: Iterable[ShadowInstall], now: datetime, timeout: timedelta
) -> InstallTally:
    """Failures among the shadow installs with an outcome at ``now``: the install gate of
    the shadow stage.

    Failed, as an install is (:func:`install_tally`): refused by the device
    (``shadow-refused``: its self-test failed, it is over the bundle's budget,
    its download or verification was refused), silent longer than ``timeout``,
    or no outcome within ``timeout``. Failed too: installed longer than
    ``timeout`` ago while its active model answered requests and the shadow ran
    on none of them — a shadow that never runs gives no evidence, and is
    neither passing nor silently absent. Succeeded: installed, and running or
    not yet due to.
    """
    records = []
    for s in installs:
        result: Literal["committed", "failed"] | None = None
        if s.result == "refused":
            result = "failed"
        elif s.result == "installed":
            since = s.installed_at or s.started_at
            idle = s.shadow_requests == 0 and s.active_requests > 0
            result = "failed" if idle and now - since > timeout else "committed"
        records.append(InstallRecord(s.device_id, s.started_at, result, s.last_seen))
    return install_tally(records, now, timeout)


def shadow_reporting(
    installed: Iterable[ShadowDevice], control: Iterable[DeviceAggregate]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The sample-ratio test's counts in the shadow stage: ``(reporting, assigned)``, each
    ``(shadow arm, control)``.

    The shadow arm: the wave-1 devices that installed the shadow, reporting
    when their shadow ran on some request; the control: the selected devices
    outside wave 1, reporting when they sent a window. A shadow that runs on far
    fewer of its devices than installed it (crashing, never drawn, its reports
    lost) shows as a mismatch; installs still under way are none.
    """
    shadow = list(installed)
    others = list(control)
    reporting = (sum(1 for d in shadow if d.requests > 0), sum(1 for d in others if d.windows > 0))
    return reporting, (len(shadow), len(others))
