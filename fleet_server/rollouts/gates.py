"""Anytime-valid rollout gates: each gate's evidence to a verdict that stays valid at every tick.

The rules, over plain numbers (no I/O, no clock):

1. Every test returns a log e-value: a number whose exponential is an
   e-process under the test's null, so ``P(sup_t E_t >= 1/alpha) <= alpha``
   (Ville's inequality) however often the controller looks.
2. A gate runs two one-sided tests on one effect ``theta``: *harm*, null
   ``theta`` no worse than ``harm_at`` — rejected means harm is shown, the
   gate fails; *non-inferiority*, null ``theta`` worse than the non-inferiority
   bound — rejected means the new version is within its margin, the gate
   passes. Harm is checked first, so a shown harm always wins; neither
   rejected is *inconclusive*, never a pass. Each side errs only when the
   truth is on its own null's side, so each has its own level: ``alpha``
   (false stops) and ``beta`` (false passes).
3. ``alpha`` and ``beta`` are split over the stop-gates by weighted
   Bonferroni (:func:`split`); warn-gates take no share of them: they never
   stop, and judge at the whole level on their own.
4. A gate short of its minimum of devices (in either arm) or of requests
   (labels for the labelled accuracy gate) is inconclusive and says what it
   lacks, whatever its evidence: an underpowered comparison never passes, and
   a metric with no data is never a pass.
5. Install failures have no control: they are judged against an allowed rate
   with evidence that accumulates across waves, and their pass is required
   only from the promotion into the last wave on (a thousand devices cannot
   show a rate below 2 %; five thousand can). The comparison gates' passes are
   required at every promotion, the shadow's included. :func:`required` alone
   decides which passes a promotion needs; the controller asks it.
6. The comparison gates are functions of the current aggregates, with the
   information ``1/se^2`` as their clock: a replayed tick gives the same
   verdict. That clock must not run backwards much, so the control must not
   shrink to a handful: keep the last wave's holdback at a few hundred devices.
7. The shadow stage (a rollout with ``shadow``) has gates of its own
   (:data:`SHADOW_DEFAULTS`): the shadow's error rate and p95 latency against
   the active model's on the same devices (stop), and its agreement with the
   answers served (a warning by default: a better model may rightly disagree;
   an operator's ``min_agreement`` makes it a stop). Only the shadow stage
   judges them, and only they judge it; a rollout with a shadow stage splits
   ``alpha`` and ``beta`` over its shadow gates and the others together, so
   its whole life stays within the budget.

The formulas and where they come from:

- Normal mixture (comparison gates). In information time ``I = 1/se^2`` the
  score ``(estimate - bound) I`` is asymptotically a Brownian motion with drift
  ``theta - bound``; a half-normal(``tau``) mixture over the alternative's
  drifts gives the closed form of :func:`normal_mixture_log_e` (Robbins 1970;
  Howard, Ramdas, McAuliffe, Sekhon 2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", the one-sided normal mixture
  boundary). With a plug-in ``se`` it is the asymptotic e-process of
  Waudby-Smith, Arbour, Sinha, Kennedy, Ramdas 2021, "Time-uniform central
  limit theory and asymptotic confidence sequences"; rollout regressions
  judged so follow Lindon, Sanden, Shirikian, KDD 2022, "Rapid regression
  detection in software deployments through sequential testing".
- Beta-binomial mixture (install failures): :func:`bernoulli_log_e` (Robbins
  1970; Howard et al. 2021), divided by the null's best fit, which keeps it an
  e-process for the whole composite null (Ramdas, Grünwald, Vovk, Shafer
  2023, "Game-theoretic statistics and safe anytime-valid inference").
- Dirichlet-multinomial mixture (sample-ratio mismatch): :func:`srm_log_e`
  (Lindon & Malek 2022, "Anytime-valid inference for multinomial count data").
- Each gate's confidence sequence inverts its own two tests, so the interval
  shown and the decision always agree: harm is shown exactly when the interval
  lies beyond ``harm_at``, non-inferiority exactly when it lies within the
  non-inferiority bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from fleet_server.errors import Unprocessable
from fleet_server.rollouts.evidence import (
    ACCURACY_ESTIMATED,
    ACCURACY_LABELLED,
    CLASS_MIX,
    FALLBACK_RATE,
    INSTALL_FAILURES,
    LATENCY_P95,
    SHADOW_AGREEMENT,
    SHADOW_ERRORS,
    SHADOW_GATES,
    SHADOW_LATENCY_P95,
    ArmRates,
    Comparison,
    Evidence,
    InstallTally,
)
from fleet_server.rollouts.verdicts import Decision, GateEvaluation, Severity
from protocol.api.rollouts import GateOverride

FloatArray = npt.NDArray[np.float64]
Side = Literal["above", "below"]  # above: null theta <= bound; below: null theta >= bound
Direction = Literal["higher_is_worse", "lower_is_worse"]
Scale = Literal["rate", "ratio", "difference"]

ALPHA = 0.05  # the false-stop budget of a rollout, over all its stop-gates and ticks
BETA = 0.05  # the false-pass budget, split the same way
# Beta prior of the install gate's mixtures, in pseudo-installs.
INSTALL_PRIOR_SIZE = 300.0
SRM_PRIOR_SIZE = 100.0


class UnknownGateError(Unprocessable, ValueError):
    """A rollout names a gate that does not exist, or sets a field a gate does not have."""


@dataclass(frozen=True)
class GateSpec:
    """One gate: what it compares, which way is worse, how much is allowed, what it does.

    ``margin`` is the harm allowed in the operator's unit: a share for
    ``scale="rate"`` (points of install failures above ``allowed_rate``), a
    relative increase for ``"ratio"`` (0.1: 10 % more fallbacks, or a 10 %
    slower p95) and a difference for ``"difference"`` (0.01: one point of
    accuracy). The tests work on the estimate's scale, :attr:`bounds`.
    ``required_from`` is the first wave (an index into the spec's waves;
    negative counts from the end) whose promotion into needs this gate's pass
    (0: every promotion, the shadow's into wave 1 included; -1: from the
    promotion into the last wave on); ``None``: never needed (it can only stop).
    ``tau``: the effect size, on the estimate's scale, the mixture is tuned to find.
    ``weight``: its share of ``alpha`` and ``beta`` among the stop-gates.
    ``allowed_extra``: an absolute bound beside a ratio's margin (the fallback
    gate: extra fallbacks per request allowed), for where the control's rate is
    zero or tiny and a ratio says little; see :func:`comparison_log_e`.
    """

    name: str
    direction: Direction
    scale: Scale
    margin: float
    tau: float
    severity: Severity = "stop"
    min_devices: int = 20
    min_requests: int = 0
    required_from: int | None = 0
    weight: float = 1.0
    allowed_rate: float | None = None
    unit: Literal["requests", "labels"] = "requests"
    allowed_extra: float | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        """``(harm_at, non-inferiority bound)`` on the estimate's scale.

        A comparison gate has one bound for both: harm is shown beyond the
        margin, a pass within it. The install gate's harm is shown above
        ``allowed_rate`` and its pass below ``allowed_rate + margin``.
        """
        if self.scale == "rate" and self.direction == "lower_is_worse":
            # A share that must stay high (shadow agreement): harm below the minimum.
            allowed = self.allowed_rate or 0.0
            return allowed, max(allowed - self.margin, 0.0)
        if self.scale == "rate":
            allowed = self.allowed_rate or 0.0
            return allowed, min(allowed + self.margin, 1.0)
        bound = math.log1p(self.margin) if self.scale == "ratio" else self.margin
        bound = bound if self.direction == "higher_is_worse" else -bound
        return bound, bound


DEFAULT_GATES: tuple[GateSpec, ...] = (
    # No control: judged against the current version's rate. It has the least power at the
    # half-fleet decision, so it takes the largest share of alpha.
    GateSpec(
        INSTALL_FAILURES,
        "higher_is_worse",
        "rate",
        margin=0.01,
        tau=0.0,
        min_devices=1,
        required_from=-1,
        weight=5.0,
        allowed_rate=0.01,
    ),
    # Harm: 10 % more fallbacks AND 0.1 points more of the requests. The absolute bound is
    # below the ratio's at the 2 % base rate the gates are tuned for (10 % of 2 % is 0.2
    # points), so it decides only under a 1 % control rate, where 10 % of it is less than one
    # request in a thousand, and over a control that never falls back, where no ratio holds.
    GateSpec(
        FALLBACK_RATE,
        "higher_is_worse",
        "ratio",
        margin=0.10,
        tau=0.2,
        min_requests=1000,
        allowed_extra=0.001,
    ),
    GateSpec(LATENCY_P95, "higher_is_worse", "ratio", margin=0.10, tau=0.1, min_requests=1000),
    GateSpec(
        ACCURACY_ESTIMATED, "lower_is_worse", "difference", margin=0.01, tau=0.02, min_requests=1000
    ),
    # Labels may never arrive: its pass is never required, but a shown drop stops.
    GateSpec(
        ACCURACY_LABELLED,
        "lower_is_worse",
        "difference",
        margin=0.02,
        tau=0.03,
        min_requests=200,
        required_from=None,
        unit="labels",
    ),
    # A better model may rightly predict differently: a warning by default.
    GateSpec(
        CLASS_MIX,
        "higher_is_worse",
        "difference",
        margin=0.10,
        tau=0.05,
        severity="warn",
        required_from=None,
        min_requests=1000,
    ),
)


# The shadow stage's gates: the shadow against the active model on the same wave-1 devices.
SHADOW_DEFAULTS: tuple[GateSpec, ...] = (
    # NaN or failed outputs: half a point more than the active model's rate is harm.
    GateSpec(
        SHADOW_ERRORS, "higher_is_worse", "difference", margin=0.005, tau=0.02,
        min_devices=10, min_requests=1000,
    ),
    GateSpec(
        SHADOW_LATENCY_P95, "higher_is_worse", "ratio", margin=0.10, tau=0.1,
        min_devices=10, min_requests=1000,
    ),
    # A better model may rightly disagree: a warning below 90 % agreement by default;
    # an operator's min_agreement makes it a stop.
    GateSpec(
        SHADOW_AGREEMENT, "lower_is_worse", "rate", margin=0.05, tau=0.05, severity="warn",
        min_devices=10, min_requests=1000, required_from=None, allowed_rate=0.90,
    ),
)  # fmt: skip


def gate_specs(
    overrides: Mapping[str, GateOverride] | None = None,
    defaults: Sequence[GateSpec] = DEFAULT_GATES,
    *,
    shadow: bool = False,
) -> tuple[GateSpec, ...]:
    """The defaults with a rollout's overrides (``RolloutSpec.gates``) applied.

    ``shadow``: the rollout has a shadow stage, so the :data:`SHADOW_DEFAULTS`
    are its gates too. Raises :class:`UnknownGateError` for a gate name that is
    not a gate (a shadow gate of a rollout without a shadow stage), an
    ``allowed_rate`` for a gate that is not judged against a rate, or a
    ``min_agreement`` for another gate than the shadow's agreement.
    """
    by_name = {spec.name: spec for spec in (*defaults, *(SHADOW_DEFAULTS if shadow else ()))}
    for name, override in (overrides or {}).items():
        if name in SHADOW_GATES and name not in by_name:
            raise UnknownGateError(
                f"{name} judges the shadow stage; this rollout has none (give shadow, such as 1h)"
            )
        if name not in by_name:
            raise UnknownGateError(f"no gate {name!r}; the gates are {', '.join(by_name)}")
        changes = override.model_dump(exclude_none=True)
        if "min_agreement" in changes:
            if name != SHADOW_AGREEMENT:
                raise UnknownGateError(
                    f"min_agreement applies to {SHADOW_AGREEMENT}, not to {name}"
                )
            # A minimum the operator sets is one the shadow must meet: a stop unless told.
            changes["allowed_rate"] = changes.pop("min_agreement")
            changes.setdefault("severity", "stop")
            changes.setdefault("required_from", 0)
        if "allowed_rate" in changes and by_name[name].scale != "rate":
            raise UnknownGateError(
                f"allowed_rate applies to gates judged against a rate ({INSTALL_FAILURES}), "
                f"not to {name}"
            )
        if "allowed_extra" in changes and not _absolute(by_name[name]):
            absolute = [s.name for s in by_name.values() if s.allowed_extra is not None]
            raise UnknownGateError(
                f"allowed_extra applies to gates with an absolute bound ({', '.join(absolute)}), "
                f"not to {name}"
            )
        by_name[name] = dataclasses.replace(by_name[name], **changes)
    return tuple(by_name.values())


def split(total: float, specs: Iterable[GateSpec]) -> dict[str, float]:
    """Weighted Bonferroni: stop-gate ``g`` gets ``total * w_g / sum(w)``; warn-gates ``total``.

    A union bound over e-processes keeps the chance of any false stop, over
    every stop-gate and every tick, under ``total``. Warn-gates draw nothing
    from it; each judges at ``total`` on its own, since a warning stops nothing.
    """
    specs = list(specs)
    stops = [s for s in specs if s.severity == "stop"]
    weights = sum(s.weight for s in stops)
    return {s.name: (total * s.weight / weights if s.severity == "stop" else total) for s in specs}


def required(specs: Iterable[GateSpec], next_wave: int, waves: int) -> list[str]:
    """The stop-gates whose pass promoting into wave ``next_wave`` (an index, of ``waves``)
    needs, in the order of ``specs``: the one rule of which gate is required when.

    ``next_wave`` 0 is the shadow stage's promotion into wave 1: it needs the
    shadow's stop-gates (:data:`SHADOW_GATES`) and only them, and no later
    promotion needs them. One past the last (releasing the holdback) needs what
    the last wave did. Warn-gates are never needed.
    """
    needed = []
    for spec in specs:
        if spec.severity != "stop" or spec.required_from is None:
            continue
        if (spec.name in SHADOW_GATES) != (next_wave == 0):
            continue  # the shadow's gates decide its promotion, and only they do
        if next_wave == 0:
            needed.append(spec.name)
            continue
        first = spec.required_from if spec.required_from >= 0 else waves + spec.required_from
        if min(next_wave, waves - 1) >= first:
            needed.append(spec.name)
    return needed


def decide(log_e_harm: float, log_e_ni: float, alpha: float, beta: float) -> Decision:
    """Two one-sided tests to a verdict: harm first, so a shown harm always fails."""
    if log_e_harm >= math.log(1.0 / alpha):
        return "fail"
    if log_e_ni >= math.log(1.0 / beta):
        return "pass"
    return "inconclusive"


# --------------------------------------------------------------------------- normal mixture

_erfc = np.frompyfunc(math.erfc, 1, 1)


def _half_square_plus_log_cdf(x: FloatArray) -> FloatArray:
    """``x^2/2 + log Phi(x)``, kept finite far in the lower tail where ``Phi`` underflows."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cdf = 0.5 * np.asarray(_erfc(-x / math.sqrt(2.0)), dtype=np.float64)
        direct = 0.5 * x * x + np.log(cdf)
        # Mills ratio: Phi(x) ~ phi(x) / (-x) (1 - 1/x^2 + 3/x^4) as x -> -inf.
        tail = -0.5 * math.log(2.0 * math.pi) - np.log(-x) + np.log1p(-1.0 / x**2 + 3.0 / x**4)
    out: FloatArray = np.where(x > -30.0, direct, tail)
    return out


def normal_mixture_log_e(
    estimate: npt.ArrayLike, se: npt.ArrayLike, bound: npt.ArrayLike, side: Side, tau: float
) -> FloatArray:
    """Log e-value of an asymptotically normal estimate against a one-sided bound (elementwise).

    With ``I = 1/se^2``, ``z = (estimate - bound)/se`` (sign flipped for
    ``side="below"``) and ``v = tau^2 I``, the half-normal(``tau``) mixture of
    ``exp(mu S - mu^2 I / 2)`` over drifts ``mu > 0`` is
    ``2 Phi(z sqrt(v/(1+v))) exp(z^2 v / 2(1+v)) / sqrt(1+v)``
    (Robbins 1970; Howard et al. 2021, the one-sided normal mixture; with a
    plug-in ``se`` the asymptotic e-process of Waudby-Smith et al. 2021). Each
    mixed factor is a supermartingale for every drift on the null's side, so
    the mixture is an e-process for the composite null. Where the estimate or
    its se is not finite, or the se not positive, the value is 0: no evidence.
    """
    est = np.asarray(estimate, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    b = np.asarray(bound, dtype=np.float64)
    ok = np.isfinite(est) & np.isfinite(s) & (s > 0) & np.isfinite(b)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = (est - b) / s if side == "above" else (b - est) / s
        v = tau * tau / (s * s)
        arg = np.where(ok, z * np.sqrt(v / (1.0 + v)), 0.0)
        log_e = math.log(2.0) + _half_square_plus_log_cdf(arg) - 0.5 * np.log1p(v)
    out: FloatArray = np.where(ok, log_e, 0.0)
    return out


def normal_mixture_reach(se: float, level: float, tau: float) -> float:
    """How far from the estimate a bound must lie for :func:`normal_mixture_log_e` to reject it.

    The ``d`` with ``log e = log(1/level)`` at ``|estimate - bound| = d``: the
    one-sided confidence sequence's half-width (Howard et al. 2021), by
    bisection on the monotone boundary. ``nan`` when ``se`` is not usable.
    """
    if not (math.isfinite(se) and se > 0 and 0 < level < 1 and tau > 0):
        return math.nan
    v = tau * tau / (se * se)
    target = math.log(1.0 / level) + 0.5 * math.log1p(v) - math.log(2.0)

    def excess(arg: float) -> float:
        return float(_half_square_plus_log_cdf(np.asarray(arg))) - target

    low, high = 0.0, math.sqrt(2.0 * max(target, 0.0)) + 2.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) < 0 else (low, middle)
    return high * math.sqrt((1.0 + v) / v) * se


def comparison_log_e(
    spec: GateSpec, estimate: npt.ArrayLike, se: npt.ArrayLike, rates: ArmRates | None = None
) -> tuple[FloatArray, FloatArray]:
    """``(log e harm, log e non-inferiority)`` of a comparison gate (elementwise over estimates).

    A ratio gate with ``allowed_extra``, given each arm's ``rates`` per request,
    counts as harm only an increase beyond both its margin and ``allowed_extra``:
    ``rate_t > (1 + margin) rate_c`` and ``rate_t - rate_c > allowed_extra``, each a
    linear contrast of the arms' rates (defined when the control never has an event,
    where no ratio is). The null "no harm" is the union of the two nulls, so harm is
    shown when both tests reject (an intersection-union test: the smaller e-value is
    an e-process under either null, at the gate's whole ``alpha``). Non-inferiority
    is shown by the ratio's test or the absolute bound's: the null, beyond both, lies
    in each test's null, so the mean of their e-values is an e-process for it. Where
    the rates have no estimate the ratio alone judges, as for a gate without the bound.
    """
    harm_at, ni_at = spec.bounds
    worse: Side = "above" if spec.direction == "higher_is_worse" else "below"
    better: Side = "below" if worse == "above" else "above"
    harm = normal_mixture_log_e(estimate, se, harm_at, worse, spec.tau)
    ni = normal_mixture_log_e(estimate, se, ni_at, better, spec.tau)
    if not _absolute(spec) or rates is None or spec.allowed_extra is None:
        return harm, ni
    r_t, v_t, r_c, v_c = (np.asarray(x, dtype=np.float64) for x in rates)
    k = 1.0 + spec.margin
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(r_t + v_t + r_c + v_c) & (v_t + v_c > 0)
        se_relative = np.sqrt(v_t + k * k * v_c)
        se_absolute = np.sqrt(v_t + v_c)
    tau = max(2.0 * spec.allowed_extra, 1e-3)  # tuned to twice the bound, on rates per request
    relative = normal_mixture_log_e(r_t - k * r_c, se_relative, 0.0, "above", tau)
    absolute = normal_mixture_log_e(r_t - r_c, se_absolute, spec.allowed_extra, "above", tau)
    within = normal_mixture_log_e(r_t - r_c, se_absolute, spec.allowed_extra, "below", tau)
    both: FloatArray = np.where(usable, np.minimum(relative, absolute), harm)
    either: FloatArray = np.where(usable, np.logaddexp(ni, within) - math.log(2.0), ni)
    return both, either


def _absolute(spec: GateSpec) -> bool:
    """Whether the gate has an absolute bound beside its ratio (more is worse)."""
    return (
        spec.allowed_extra is not None
        and spec.scale == "ratio"
        and spec.direction == "higher_is_worse"
    )


# --------------------------------------------------------------------------- beta-binomial


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _bernoulli_log_likelihood(k: int, n: int, p: float) -> float:
    out = 0.0
    if k:
        out += k * math.log(p) if p > 0 else -math.inf
    if n - k:
        out += (n - k) * math.log1p(-p) if p < 1 else -math.inf
    return out


def bernoulli_log_e(k: int, n: int, bound: float, side: Side, a: float, b: float) -> float:
    """Log e-value for a Bernoulli rate against a one-sided bound, from ``k`` failures of ``n``.

    ``log B(a + k, b + n - k) - log B(a, b) - log sup_{q in null} q^k (1-q)^(n-k)``:
    the beta-binomial mixture (Robbins 1970; Howard et al. 2021) over the
    null's best fit, ``q = min(k/n, bound)`` for ``side="above"`` (null
    ``p <= bound``) and ``max(k/n, bound)`` for ``"below"``. Every null rate's
    own mixture martingale dominates it, so it is an e-process for the
    composite null (Ramdas, Grünwald, Vovk, Shafer 2023). It depends on
    ``(k, n)`` only, so installs accumulate across waves in two counters.
    """
    if n == 0:
        return 0.0
    mixture = _log_beta(a + k, b + n - k) - _log_beta(a, b)
    q = min(k / n, bound) if side == "above" else max(k / n, bound)
    return mixture - _bernoulli_log_likelihood(k, n, q)


def _install_priors(spec: GateSpec) -> tuple[tuple[float, float], tuple[float, float]]:
    """Beta priors ``(a, b)`` of the harm and non-inferiority mixtures.

    Harm: centred on ``allowed + 2 margin``, the harm worth catching; non-
    inferiority: on ``allowed``, the rate a good version has. Means are kept
    inside (0, 1/2] so both priors are proper.
    """
    allowed, _ = spec.bounds
    floor = 1.0 / INSTALL_PRIOR_SIZE
    harm = min(max(allowed + 2.0 * spec.margin, floor), 0.5)
    good = min(max(allowed, floor), 0.5)
    size = INSTALL_PRIOR_SIZE
    return (size * harm, size * (1.0 - harm)), (size * good, size * (1.0 - good))


def install_log_e(spec: GateSpec, failures: int, installs: int) -> tuple[float, float]:
    """``(log e harm, log e non-inferiority)`` of the install gate.

    Harm is shown when the rate is above ``allowed_rate``, a pass when it is
    below ``allowed_rate + margin``: against ``allowed + margin`` a rate of 3 %
    is not shown above 2 % by a thousand installs, against 1 % it is.
    """
    harm_at, ni_at = spec.bounds
    (ha, hb), (na, nb) = _install_priors(spec)
    return (
        bernoulli_log_e(failures, installs, harm_at, "above", ha, hb),
        bernoulli_log_e(failures, installs, ni_at, "below", na, nb),
    )


def _bisect(rejected: Callable[[float], bool], inside: float, outside: float) -> float:
    """The edge between a point ``inside`` a confidence set and one ``outside`` it."""
    for _ in range(60):
        middle = 0.5 * (inside + outside)
        inside, outside = (inside, middle) if rejected(middle) else (middle, outside)
    return inside


def install_interval(
    spec: GateSpec, failures: int, installs: int, alpha: float, beta: float
) -> tuple[float, float]:
    """The rates neither of the install gate's tests rejects: its confidence sequence.

    Low: the highest rate the harm test still rejects as a bound (at ``alpha``);
    high: the lowest the non-inferiority test rejects (at ``beta``), each found
    by bisection on the monotone e-value.
    """
    (ha, hb), (na, nb) = _install_priors(spec)
    mle = failures / installs
    low = _bisect(
        lambda p: bernoulli_log_e(failures, installs, p, "above", ha, hb) >= math.log(1 / alpha),
        mle,
        0.0,
    )
    high = _bisect(
        lambda p: bernoulli_log_e(failures, installs, p, "below", na, nb) >= math.log(1 / beta),
        mle,
        1.0,
    )
    return low, high


# --------------------------------------------------------------------------- one gate


def _usable(evidence: Comparison) -> bool:
    return math.isfinite(evidence.estimate) and math.isfinite(evidence.se) and evidence.se > 0


def _rates_usable(spec: GateSpec, evidence: Comparison) -> bool:
    if not _absolute(spec) or evidence.rates is None:
        return False
    r_t, v_t, r_c, v_c = (float(np.asarray(x)) for x in evidence.rates)
    return math.isfinite(r_t + v_t + r_c + v_c) and v_t + v_c > 0


def _missing(spec: GateSpec, evidence: Evidence) -> str | None:
    """What keeps a gate from judging: devices, requests or labels; ``None`` if nothing."""
    if isinstance(evidence, InstallTally):
        return "devices" if evidence.installs < spec.min_devices else None
    short_devices = min(evidence.n_treatment, evidence.n_control) < spec.min_devices
    short_samples = min(evidence.samples_treatment, evidence.samples_control) < spec.min_requests
    if spec.unit == "labels" and (short_devices or short_samples):
        return "labels"
    if short_devices:
        return "devices"
    if short_samples or not (_usable(evidence) or _rates_usable(spec, evidence)):
        return "requests"
    return None


def evaluate(
    spec: GateSpec, evidence: Evidence | None, alpha: float, beta: float
) -> GateEvaluation:
    """One gate's verdict on its evidence, ``alpha`` and ``beta`` being its shares.

    Evidence short of the gate's minimum, absent, or not finite is
    inconclusive with ``missing`` saying what it lacks; no NaN reaches a
    verdict.
    """
    harm_at, ni_at = spec.bounds
    if evidence is None:
        evidence = (
            InstallTally(0, 0)
            if spec.scale == "rate"
            else Comparison(math.nan, math.nan, 0, 0, 0, 0)
        )
    if isinstance(evidence, InstallTally):
        failures, installs = evidence
        if not 0 <= failures <= installs:
            raise ValueError(f"{failures} failures of {installs} installs is not a tally")
        n_devices, n_control, n_requests = installs, 0, 0
        log_e_harm, log_e_ni = install_log_e(spec, failures, installs)
        estimate = failures / installs if installs else None
        low = high = None
        if installs:
            low, high = install_interval(spec, failures, installs, alpha, beta)
    else:
        n_devices, n_control = evidence.n_treatment, evidence.n_control
        n_requests = evidence.samples_treatment
        harm, ni = comparison_log_e(spec, evidence.estimate, evidence.se, evidence.rates)
        log_e_harm, log_e_ni = float(harm), float(ni)
        estimate = evidence.estimate if _usable(evidence) else None
        low = high = None
        if estimate is not None:
            worse_level, better_level = (
                (alpha, beta) if spec.direction == "higher_is_worse" else (beta, alpha)
            )
            low = estimate - normal_mixture_reach(evidence.se, worse_level, spec.tau)
            high = estimate + normal_mixture_reach(evidence.se, better_level, spec.tau)
    missing = _missing(spec, evidence)
    decision: Decision = "inconclusive" if missing else decide(log_e_harm, log_e_ni, alpha, beta)
    return GateEvaluation(
        gate=spec.name,
        severity=spec.severity,
        decision=decision,
        n_devices=n_devices,
        n_control=n_control,
        n_requests=n_requests,
        estimate=estimate,
        low=low,
        high=high,
        harm_at=harm_at,
        margin=ni_at,
        log_e_harm=log_e_harm,
        log_e_ni=log_e_ni,
        alpha=alpha,
        beta=beta,
        missing=missing,
    )


def evaluate_all(
    specs: Sequence[GateSpec],
    evidence: Mapping[str, Evidence],
    alpha: float = ALPHA,
    beta: float = BETA,
    only: Collection[str] | None = None,
) -> list[GateEvaluation]:
    """Every gate's verdict at one tick, the budgets split over the stop-gates.

    ``only``: judge just these gates (the shadow stage's, or every other stage's),
    their shares still split over all of ``specs``.
    """
    alphas, betas = split(alpha, specs), split(beta, specs)
    judged = [s for s in specs if only is None or s.name in only]
    return [evaluate(s, evidence.get(s.name), alphas[s.name], betas[s.name]) for s in judged]


# --------------------------------------------------------------------------- sample ratio


def srm_log_e(
    counts: Sequence[float], shares: Sequence[float], size: float = SRM_PRIOR_SIZE
) -> float:
    """Log e-value that the arms report in other proportions than they were assigned.

    A Dirichlet(``size * shares``) mixture of multinomials against the point
    null ``shares``: ``log B(a + x) - log B(a) - sum x log shares`` (Lindon &
    Malek 2022). ``counts``: devices reporting in each arm since the wave
    started; ``shares``: the arms' shares of the assigned devices. A wave
    losing devices (crashes that stop reports) shows here before any gate;
    pause when it reaches ``log(1/alpha)``.
    """
    x = np.asarray(counts, dtype=np.float64)
    p = np.asarray(shares, dtype=np.float64)
    if x.shape != p.shape or x.size < 2 or np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"counts {list(counts)} do not match shares {list(shares)}")
    if np.any(p <= 0) or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-9):
        raise ValueError(f"shares {list(shares)} are not positive and summing to 1")
    a = size * p

    def log_multivariate_beta(v: FloatArray) -> float:
        return sum(math.lgamma(float(t)) for t in v) - math.lgamma(float(v.sum()))

    return log_multivariate_beta(a + x) - log_multivariate_beta(a) - float(np.sum(x * np.log(p)))
