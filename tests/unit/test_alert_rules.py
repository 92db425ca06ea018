"""The grouped drift alert's rules, silence matching and the webhook signature, without I/O."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Any

from fleet_server.db.models import AlertRow, SilenceRow
from fleet_server.drift.lifecycle import (
    alert_tests,
    drift_evidence,
    drift_tests,
    is_active,
    matches,
    open_key,
    silenced_by,
    suppressed,
)
from fleet_server.drift.models import Scope
from fleet_server.drift.webhook import Notification, WebhookNotifier, signature, signature_matches
from tests.support.drift_results import T0, feature, result


def test_one_drift_alert_lists_every_drifting_feature_and_test() -> None:
    tests, cleared = drift_tests(
        result(feature(0, distribution="drift", new_range="drift"), feature(3, missing="drift")),
        {},
    )
    assert sorted(tests) == [(0, "distribution"), (0, "new-range"), (3, "missing-values")]
    assert cleared == {}
    evidence = drift_evidence(result(), tests, "drift")
    assert [(f["feature"], f["name"], f["reasons"]) for f in evidence["features"]] == [
        (0, "f0", ["distribution", "new-range"]),
        (3, "f3", ["missing-values"]),
    ]
    assert evidence["features"][0]["tests"]["distribution"]["statistic"] == 90.0
    assert evidence["features"][1]["tests"]["missing-values"]["nan"] == 30
    assert evidence["window_ids"] == ["w1", "w2"] and evidence["verdict"] == "drift"
    assert alert_tests(evidence).keys() == tests.keys()


def test_a_recovered_feature_leaves_the_alert_and_one_without_data_stays() -> None:
    before, _ = drift_tests(
        result(feature(0, distribution="drift"), feature(1, distribution="drift")), {}
    )
    # Feature 0 is back on enough data; feature 1 has too few values to say.
    after, cleared = drift_tests(
        result(feature(0), feature(1, distribution="not_enough_data", missing="not_enough_data")),
        before,
    )
    assert (
        sorted(after) == [(1, "distribution")]
        and after[(1, "distribution")] == before[(1, "distribution")]
    )
    assert sorted(cleared) == [(0, "distribution")]
    assert cleared[(0, "distribution")][1]["verdict"] == "no_drift"
    # Everything back: nothing is listed, so the alert closes.
    last, cleared = drift_tests(result(feature(0), feature(1)), after)
    assert last == {} and sorted(cleared) == [(1, "distribution")]


def test_the_open_key_is_one_per_scope_and_cause() -> None:
    device = Scope("device", "pump-17")
    assert open_key(device, "m", "1", "drift") == "drift|device:pump-17|m@1"
    assert open_key(Scope("fleet"), "m", "1", "accuracy") == "accuracy|fleet|m@1"


def alert(**fields: Any) -> AlertRow:
    values = {
        "kind": "drift",
        "scope": "device",
        "scope_value": "pump-17",
        "model_name": "pump-health",
        "model_version": "1.0.0",
        "state": "open",
        "acknowledged_at": None,
    } | fields
    return AlertRow(**values)


def silence(ends: datetime = T0 + timedelta(hours=2), **matchers: Any) -> SilenceRow:
    return SilenceRow(id=matchers.pop("id", 1), starts_at=T0, ends_at=ends, **matchers)


def test_a_silence_matches_by_every_matcher_it_gives() -> None:
    pump = alert()
    assert matches(silence(scope="device", scope_value="pump-17"), pump)
    assert matches(silence(scope="device"), pump)
    assert matches(silence(scope="device", kind="drift", model_version="1.0.0"), pump)
    assert not matches(silence(scope="device", scope_value="pump-18"), pump)
    assert not matches(silence(scope="tag", scope_value="pump-17"), pump)
    assert not matches(silence(scope="device", kind="accuracy"), pump)
    assert not matches(silence(scope="device", model_version="2.0.0"), pump)


def test_a_silence_is_active_until_it_ends() -> None:
    s = silence(scope="device")
    assert not is_active(s, T0 - timedelta(seconds=1))
    assert is_active(s, T0) and is_active(s, T0 + timedelta(hours=2) - timedelta(seconds=1))
    assert not is_active(s, T0 + timedelta(hours=2))


def test_acknowledged_or_silenced_alerts_are_not_notified() -> None:
    quiet = [silence(id=7, scope="tag"), silence(id=8, scope="device", scope_value="pump-17")]
    assert silenced_by(alert(), quiet) == [8]
    assert suppressed(alert(), quiet)
    assert not suppressed(alert(scope_value="pump-18"), quiet)
    assert suppressed(alert(scope_value="pump-18", acknowledged_at=T0), quiet)


def test_the_webhook_signature_is_the_hmac_of_the_body() -> None:
    secret, body = b"s3cret", b'{"event": "alert.opened"}'
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert signature(secret, body) == f"sha256={expected}"
    assert signature_matches(secret, body, f"sha256={expected}")
    assert not signature_matches(secret, body + b" ", f"sha256={expected}")
    assert not signature_matches(b"other", body, f"sha256={expected}")


def test_each_attempt_is_signed_with_its_timestamp_in_the_body() -> None:
    notifier = WebhookNotifier("http://127.0.0.1:9/hook", b"k", clock=lambda: 1_900_000_000.0)
    note = Notification("alert.opened", {"id": 3})
    body, headers = notifier.body(note, attempt=2)
    assert headers["X-Edgefleet-Signature"] == signature(b"k", body)
    assert headers["X-Edgefleet-Timestamp"] == "1900000000"
    assert headers["X-Edgefleet-Delivery"] == note.delivery
    assert b'"sent_at": 1900000000' in body and b'"attempt": 2' in body
