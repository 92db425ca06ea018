"""The checks a run makes by itself at its end (:data:`simulator.scenario.CHECKS`).

Each check reads what the run recorded (:class:`RunRecord`: the devices'
stats, the window ids they produced and the server stored, the moments a
device was seen without a verified model, the time series) and, for the
expectations, the server's REST API; each returns a
:class:`~simulator.report.Check` whose detail says what was counted, so a
green check says what it covered and a red one names what failed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulator.report import Check, Sample
from simulator.scenario import CHECKS, Scenario
from simulator.sim_device import DeviceStats

SHOWN = 5  # offenders named in a failed check's detail
QUOTA_SLACK = 1.0  # tokens: an answer in flight while the plan changed
ROLLOUT_PHASES = {
    "completed": ("completed",),
    "rolled-back": ("rolling_back", "stopped"),
    "paused": ("paused",),
    "aborted": ("aborted",),
}
"""The rollout phases that meet an expected outcome."""
UNDER_WAY = ("pending", "shadow", "baking")
"""The phases of a rollout still going out."""
GIVEN_SERVER_PACE = (
    "(a server given by URL steps its rollouts at its own pace, every 60 s unless started "
    "with --rollout-interval; a short scenario's rollout wants --rollout-interval 1)"
)
"""Why a rollout may still be active at the end of a run against a server given by URL."""


@dataclass
class RunRecord:
    """What a run recorded, for its checks."""

    scenario: Scenario
    stats: Mapping[str, DeviceStats]
    produced: Mapping[str, Sequence[str]]  # window ids each device produced
    stored: Mapping[str, Sequence[str]]  # window ids the server stored, by device
    unserved: Mapping[str, Sequence[tuple[float, str]]] = field(default_factory=dict)
    series: Sequence[Sample] = ()
    rollouts: Sequence[str] = ()
    capacity_steps: Sequence[float] = ()
    api: Callable[..., Any] | None = None  # (method, path, body=None) -> JSON, as the admin


def make_checks(record: RunRecord) -> list[Check]:
    """Every check the scenario does not skip, in :data:`CHECKS` order."""
    makers: dict[str, Callable[[RunRecord], Check]] = {
        "requests-answered": requests_answered,
        "windows-once": windows_once,
        "verified-model": verified_model,
        "quotas-held": quotas_held,
        "expectations": expectations,
    }
    checks = []
    for name in CHECKS:
        if name in record.scenario.skip_checks:
            continue
        try:
            checks.append(makers[name](record))
        except Exception as exc:  # a check that could not be made did not pass
            checks.append(Check(name, False, f"could not be checked: {type(exc).__name__}: {exc}"))
    return checks


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def requests_answered(record: RunRecord) -> Check:
    """Every request a device's caller made was answered (no exception reached the caller)."""
    requests = sum(s.requests for s in record.stats.values())
    answered = sum(s.answered for s in record.stats.values())
    failed = {d: s.failed for d, s in record.stats.items() if s.failed}
    unanswered = requests - answered
    if unanswered == 0 and not failed:
        return Check("requests-answered", True, f"{requests:,} requests, all answered")
    first = next(iter(failed.items()), None)
    why = f"; {first[0]}: {first[1][0]}" if first else ""
    return Check(
        "requests-answered",
        False,
        f"{unanswered:,} of {requests:,} requests unanswered on {len(failed)} devices{why}",
    )


def windows_once(record: RunRecord) -> Check:
    """Every window a device produced is stored once; the server holds none it never produced."""
    missing: list[str] = []
    repeated: list[str] = []
    extra: list[str] = []
    produced_total = 0
    for device_id, produced in record.produced.items():
        counts = Counter(produced)
        produced_total += len(counts)
        repeated += [w for w, n in counts.items() if n > 1]
        stored = Counter(record.stored.get(device_id, ()))
        repeated += [w for w, n in stored.items() if n > 1]
        missing += [w for w in counts if w not in stored]
        extra += [w for w in stored if w not in counts]
    if not (missing or repeated or extra):
        if produced_total == 0:
            return Check("windows-once", False, "no window was produced: nothing was checked")
        return Check("windows-once", True, f"{produced_total:,} windows, each stored once")
    parts = []
    if missing:
        parts.append(f"{len(missing):,} of {produced_total:,} never stored: {_named(missing)}")
    if repeated:
        parts.append(f"{len(repeated):,} twice: {_named(repeated)}")
    if extra:
        parts.append(f"{len(extra):,} stored but never produced: {_named(extra)}")
    return Check("windows-once", False, "; ".join(parts))


def verified_model(record: RunRecord) -> Check:
    """No device was seen without a verified model to serve (sampled each second, and by itself)."""
    without = {d: moments for d, moments in record.unserved.items() if moments}
    devices = len(record.stats)
    if not without:
        return Check(
            "verified-model",
            True,
            f"{devices:,} devices, each with a verified model throughout "
            f"({len(record.series)} samples)",
        )
    first_device, moments = next(iter(sorted(without.items())))
    at, why = moments[0]
    return Check(
        "verified-model",
        False,
        f"{len(without)} of {devices:,} devices without a verified model "
        f"({_named(sorted(without))}); {first_device} at {at:.0f} s: {why}",
    )


def bucket_overruns(times: Sequence[float], rate: float, burst: int) -> int:
    """Answers beyond a bucket of ``burst`` tokens refilled at ``rate`` a second, full at first."""
    tokens = float(burst)
    last: float | None = None
    over = 0
    for t in sorted(times):
        if last is not None:
            tokens = min(float(burst), tokens + rate * (t - last))
        last = t
        if tokens < 1.0 - QUOTA_SLACK:
            over += 1
        tokens -= 1.0
    return over


def quotas_held(record: RunRecord) -> Check:
    """No device got more cloud answers than the most generous plan it followed allows."""
    offenders: list[str] = []
    answers = 0
    for device_id, stats in record.stats.items():
        times = [
            at - latency
            for at, latency in zip(stats.cloud_answers, stats.cloud_latency_s, strict=False)
        ]
        answers += len(times)
        if not times:
            continue
        plans = list(stats.plans.values())
        if not plans:
            offenders.append(f"{device_id} ({len(times)} answers under no plan)")
            continue
        rate = max(p.quota_rate for p in plans)
        burst = max(p.quota_burst for p in plans)
        over = bucket_overruns(times, rate, burst)
        if over:
            offenders.append(f"{device_id} ({over} over {rate:g}/s, burst {burst})")
    if offenders:
        return Check(
            "quotas-held",
            False,
            f"{len(offenders)} devices over their quota: {_named(offenders)}",
        )
    return Check(
        "quotas-held",
        True,
        f"{answers:,} cloud answers on {len(record.stats):,} devices, each within its plan's quota",
    )


def expectations(record: RunRecord) -> Check:
    """``[expect]``: rollout outcome and wave, drift alerts, plans after capacity, online share."""
    expect = record.scenario.expect
    met: list[str] = []
    unmet: list[str] = []
    api = record.api
    if expect.rollout is not None or expect.rollout_stopped_in_wave is not None:
        if not record.rollouts or api is None:
            unmet.append("a rollout was expected but none was created")
        else:
            rollout = api("GET", f"/rollouts/{record.rollouts[-1]}")
            phase = rollout["phase"]
            if expect.rollout is not None:
                said = f"rollout {phase} (expected {expect.rollout})"
                if phase in UNDER_WAY and record.scenario.server.url is not None:
                    said += f" {GIVEN_SERVER_PACE}"
                as_expected = phase in ROLLOUT_PHASES[expect.rollout]
                if not as_expected and rollout.get("reason"):
                    said += f" ({rollout['reason']})"
                (met if as_expected else unmet).append(said)
            if expect.rollout_stopped_in_wave is not None:
                wave = stopped_wave(rollout)
                said = f"stopped in wave {wave} (expected {expect.rollout_stopped_in_wave})"
                ok = wave == expect.rollout_stopped_in_wave and phase != "completed"
                (met if ok else unmet).append(said)
    if expect.drift_alerts is not None:
        found, missing = drift_alerts(record, expect.drift_alerts)
        met += found
        unmet += missing
    if expect.plans_adapt:
        said, ok = plans_adapt(record)
        (met if ok else unmet).append(said)
    if expect.min_online is not None:
        last = record.series[-1] if record.series else None
        share = last.online / len(record.stats) if last and record.stats else 0.0
        said = f"{share:.0%} online at the end (expected at least {expect.min_online:.0%})"
        (met if share >= expect.min_online else unmet).append(said)
    if unmet:
        return Check("expectations", False, "; ".join(unmet + met))
    if not met:
        return Check("expectations", True, "none set")
    return Check("expectations", True, "; ".join(met))


def stopped_wave(rollout: Mapping[str, Any]) -> int:
    """The wave a rollout stood at when it stopped or paused: its stage (wave 1 is stage 1)."""
    return int(rollout["stage"])


def drift_alerts(
    record: RunRecord, wanted: Sequence[Mapping[str, str]]
) -> tuple[list[str], list[str]]:
    """Each expected alert (``cohort``, ``feature``) found open on a scope holding that cohort."""
    assert record.api is not None
    alerts = record.api("GET", "/alerts")["alerts"]
    cohorts = {c.name: c for c in record.scenario.cohorts}
    found: list[str] = []
    missing: list[str] = []
    for want in wanted:
        cohort = cohorts.get(want.get("cohort", ""))
        scopes = {"fleet"}
        if cohort is not None:
            scopes |= {cohort.name, *(t.partition("=")[2] or t for t in cohort.tags)}
        feature = want.get("feature")
        hit = any(
            alert["scope"] == "fleet" or alert["scope_value"] in scopes
            if feature is None
            else (
                (
                    (alert["scope"] == "fleet" or alert["scope_value"] in scopes)
                    and any(f.get("name") == feature for f in alert.get("features", []))
                )
                or alert.get("feature_name") == feature
            )
            for alert in alerts
        )
        said = f"drift alert for {want}"
        (found if hit else missing).append(said + (" raised" if hit else " not raised"))
    return found, missing


def plans_adapt(record: RunRecord) -> tuple[str, bool]:
    """After the last capacity step, the plans hand out no more than that capacity."""
    if not record.capacity_steps or record.api is None:
        return "plans adapt: no capacity step was made", False
    capacity = record.capacity_steps[-1]
    plans = record.api("GET", "/plans")["plans"]
    granted = sum(float(p.get("share") or 0.0) for p in plans)
    ok = bool(plans) and granted <= capacity * 1.0001
    return f"plans grant {granted:.1f} requests/s of a capacity of {capacity:g}", ok
