"""The alert lifecycle: which alerts open, update, close and are notified (no I/O).

One alert per scope and cause, the cause being a model version's drift or its
accuracy. A feature's tests (:data:`protocol.drift.model.DriftReason`) are
``distribution`` (the bins), ``missing-values`` (the share of NaN),
``out-of-range`` (the share outside the valid range) and ``new-range`` (values
beyond the baseline's min or max); the drift alert lists every (feature, test)
that found drift, with its figures. Each test is decided at its share of the
scope's false-alarm rate (:mod:`fleet_server.drift.family`), so
the alert as a whole, not each feature, holds that rate:

- ``drift`` adds a test to the list (or refreshes its figures); the first one
  opens the alert. Accuracy: ``below`` (see :class:`protocol.cbpe.AccuracyPolicy`)
  opens the alert or updates it;
- ``no_drift`` on enough data takes a test off the list; the alert closes when
  none is left. Accuracy: ``within`` closes it;
- ``not_enough_data`` (accuracy: also ``uncertain``) changes nothing: too few
  values is no evidence of recovery;
- an alert opened or closed is notified unless it is acknowledged or an active
  silence matches it (see :mod:`fleet_server.drift.silences`); an update is not.

:func:`decide` applies these rules to one scope's results and the evidence of
the open alerts; the service writes what it decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from fleet_server.db.models import as_utc
from fleet_server.drift.family import alarm_levels
from fleet_server.drift.models import Accuracy, ModelDrift, Scope
from fleet_server.stored_json import finite_or_none
from protocol.drift.model import DriftPolicy, DriftReason, FeatureDrift

if TYPE_CHECKING:
    from fleet_server.db.models import AlertRow, SilenceRow

AlertCause = Literal["drift", "accuracy"]
AlertChange = Literal["opened", "updated", "closed"]

# A drift alert's tests by (feature, reason), each as its feature entry shows it.
_Tests = dict[tuple[int, str], tuple[str | None, dict[str, Any]]]

_ACTIONS: Final[dict[str, Literal["open", "close"]]] = {
    "drift": "open",
    "below": "open",
    "no_drift": "close",
    "within": "close",
}


@dataclass(frozen=True)
class Decision:
    """One change :func:`decide` makes: open an alert, or update or close the one at ``key``."""

    change: AlertChange
    cause: AlertCause
    key: str
    model_name: str
    model_version: str
    evidence: dict[str, Any]


def open_key(scope: Scope, model_name: str, model_version: str, cause: AlertCause) -> str:
    """The key no two open alerts share: one per scope and cause (a model version's drift,
    or its accuracy). Accuracy alerts keep the key they had before drift alerts were grouped."""
    return f"{cause}|{scope}|{model_name}@{model_version}"


def decide(
    scope: Scope, results: Iterable[ModelDrift], open_evidence: Mapping[str, dict[str, Any]]
) -> list[Decision]:
    """The alert changes ``results`` make in ``scope`` (see the module's rules), in order.

    ``open_evidence`` is the evidence of every open alert by its :func:`open_key`.
    A result with a problem changes nothing.
    """
    current = dict(open_evidence)
    decisions: list[Decision] = []

    def record(
        result: ModelDrift, change: AlertChange, cause: AlertCause, key: str, evidence: Any
    ) -> None:
        name, version = result.model_name, result.model_version
        decisions.append(Decision(change, cause, key, name, version, evidence))
        if change == "closed":
            del current[key]
        else:
            current[key] = evidence

    for result in results:
        if result.problem is not None:
            continue
        key = open_key(scope, result.model_name, result.model_version, "drift")
        before = current.get(key)
        tests, cleared = drift_tests(result, alert_tests(before) if before is not None else {})
        if tests:
            evidence = drift_evidence(result, tests, "drift")
            record(result, "opened" if before is None else "updated", "drift", key, evidence)
        elif before is not None:
            record(result, "closed", "drift", key, drift_evidence(result, cleared, "no_drift"))
        accuracy = result.accuracy
        action = _ACTIONS.get(accuracy.verdict) if accuracy is not None else None
        if accuracy is None or action is None:
            continue
        key = open_key(scope, result.model_name, result.model_version, "accuracy")
        found = accuracy_evidence(result, accuracy)
        if action == "open":
            record(result, "opened" if key not in current else "updated", "accuracy", key, found)
        elif key in current:
            record(result, "closed", "accuracy", key, found)
    return decisions


def drift_tests(result: ModelDrift, current: _Tests) -> tuple[_Tests, _Tests]:
    """The tests a drift alert lists after ``result``, and those that cleared.

    A test that found drift is (re)listed with its new figures; one that found
    none on enough data is dropped (and returned as cleared, with those
    figures); one without enough data keeps what it had: too few values is no
    evidence either way.
    """
    tests = dict(current)
    cleared: _Tests = {}
    policy = result.feature_policy
    for f in result.features:
        for reason, verdict in f.verdicts.items():
            action = _ACTIONS.get(verdict)
            key = (f.feature, reason)
            if action == "open":
                tests[key] = (f.name, evidence_of_test(f, reason, policy))
            elif action == "close" and key in tests:
                del tests[key]
                cleared[key] = (f.name, evidence_of_test(f, reason, policy))
    return tests, cleared


def notified(change: AlertChange, suppressed: bool) -> bool:
    """Whether ``change`` is notified: an alert opened or closed that nobody suppressed."""
    return change != "updated" and not suppressed


# -- silences (Alertmanager's matching) ------------------------------------------------


def matches(silence: SilenceRow, alert: AlertRow) -> bool:
    """Whether every matcher ``silence`` gives equals ``alert``'s (ignores time)."""
    return all(
        want is None or want == have
        for want, have in (
            (silence.kind, alert.kind),
            (silence.scope, alert.scope),
            (silence.scope_value, alert.scope_value),
            (silence.model_name, alert.model_name),
            (silence.model_version, alert.model_version),
        )
    )


def is_active(silence: SilenceRow, now: datetime) -> bool:
    return as_utc(silence.starts_at) <= now < as_utc(silence.ends_at)


def silenced_by(alert: AlertRow, silences: Iterable[SilenceRow]) -> list[int]:
    """The ids of ``silences`` (active ones) that match ``alert``."""
    return [s.id for s in silences if matches(s, alert)]


def suppressed(alert: AlertRow, silences: Sequence[SilenceRow]) -> bool:
    """Whether a change of ``alert`` goes un-notified: acknowledged, or silenced."""
    return alert.acknowledged_at is not None or bool(silenced_by(alert, silences))


# -- evidence ------------------------------------------------------------------------


def _share(count: int, rows: int) -> float | None:
    return count / rows if rows else None


def evidence_of_test(
    feature: FeatureDrift, reason: DriftReason, policy: DriftPolicy
) -> dict[str, Any]:
    """What one test of a feature shows: its verdict, its numbers and its false-alarm rate."""
    found: dict[str, Any] = {
        "reason": reason,
        "verdict": feature.verdicts[reason],
        "n": feature.n,
        "baseline_n": feature.baseline_n,
    }
    if reason == "distribution":
        found |= {
            "psi": feature.psi,
            "js": feature.js,
            "statistic": feature.statistic,
            "df": feature.df,
            "threshold": finite_or_none(feature.threshold),
            "p_value": feature.p_value,
            "psi_threshold": finite_or_none(feature.psi_threshold),
        }
    elif reason == "missing-values":
        rows, baseline_rows = feature.n + feature.nan, feature.baseline_n + feature.baseline_nan
        found |= {
            "nan": feature.nan,
            "rows": rows,
            "share": _share(feature.nan, rows),
            "baseline_nan": feature.baseline_nan,
            "baseline_rows": baseline_rows,
            "baseline_share": _share(feature.baseline_nan, baseline_rows),
            "p_value": feature.missing_p_value,
        }
    elif reason == "out-of-range":
        found |= {
            "out_of_range": feature.out_of_range,
            "share": _share(feature.out_of_range, feature.n),
            "baseline_out_of_range": feature.baseline_out_of_range,
            "baseline_share": _share(feature.baseline_out_of_range, feature.baseline_n),
            "p_value": feature.out_of_range_p_value,
        }
    else:
        found |= {
            "min": feature.min,
            "max": feature.max,
            "baseline_min": feature.baseline_min,
            "baseline_max": feature.baseline_max,
            "below_baseline": feature.below_baseline,
            "above_baseline": feature.above_baseline,
            "p_value": feature.new_range_p_value,
        }
    return found | {"alpha": alarm_levels(feature, policy)[reason]}


def windows_evidence(result: ModelDrift) -> dict[str, Any]:
    """What every alert of ``result`` shows of the merged windows (the first thousand ids)."""
    return {
        "min_n": result.policy.min_n,
        # Per feature, as the API's drift report gives it; the scope's is the sum.
        "false_alarm_rate": result.feature_policy.false_alarm_rate,
        "scope_false_alarm_rate": result.policy.false_alarm_rate,
        "baseline_id": result.baseline_id,
        "windows": result.windows,
        "window_ids": result.window_ids,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
    }


def drift_evidence(result: ModelDrift, tests: _Tests, verdict: str) -> dict[str, Any]:
    """A drift alert's evidence: ``verdict``, every feature of ``tests`` and the windows."""
    features: dict[int, dict[str, Any]] = {}
    for (index, reason), (name, figures) in sorted(tests.items()):
        entry = features.setdefault(index, {"feature": index, "name": name, "tests": {}})
        entry["tests"][reason] = figures
    return {
        "verdict": verdict,
        "features": [e | {"reasons": sorted(e["tests"])} for _, e in sorted(features.items())],
    } | windows_evidence(result)


def alert_tests(evidence: dict[str, Any]) -> _Tests:
    """The tests a stored drift alert lists, by (feature, reason)."""
    return {
        (int(f["feature"]), reason): (f.get("name"), figures)
        for f in evidence.get("features") or []
        for reason, figures in (f.get("tests") or {}).items()
    }


def accuracy_evidence(result: ModelDrift, accuracy: Accuracy) -> dict[str, Any]:
    """What an accuracy alert shows: the estimate, its interval, the threshold, the windows."""
    e = accuracy.estimate
    labelled = accuracy.labelled
    return {
        "verdict": accuracy.verdict,
        "estimated": e.accuracy,
        "low": e.low,
        "high": e.high,
        "confidence": e.confidence,
        "n": e.n,
        "unseen_share": e.unseen_share,
        "allowance": e.allowance,
        "allowance_measured": e.allowance_measured,
        "assumption": e.assumption,
        "reference": accuracy.reference,
        "threshold": accuracy.threshold,
        "max_drop": result.accuracy_policy.max_drop,
        "min_n": result.accuracy_policy.min_n,
        "measured": labelled.accuracy if labelled else None,
        "labelled_rows": labelled.rows if labelled else 0,
        "baseline_id": result.baseline_id,
        "windows": result.windows,
        "window_ids": result.window_ids,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
    }
