"""The agent's metrics as Prometheus text: names, buckets, bounded reason labels, own registry."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.metrics import LATENCY_BUCKETS_S, AgentMetrics, refusal_reasons


def samples(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and sorted labels, parsed as Prometheus does."""
    text = metrics.exposition().decode()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP text"
        for s in family.samples:
            assert isinstance(s, Sample)
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_answers_are_counted_by_stage_with_latency_in_inclusive_buckets() -> None:
    metrics = AgentMetrics()
    inference = metrics.inference
    inference.answered("active", 0.00005)
    inference.answered("active", 0.0001)  # on a bound: counted in that bucket ("le")
    inference.answered("active", 0.003)
    inference.answered("previous", 6.0)  # beyond the largest bound: only in +Inf
    inference.refused("client_error")
    inference.refused("client_error")
    inference.refused("unavailable")
    got = samples(metrics)

    def requests(stage: str, outcome: str) -> float:
        key = (("outcome", outcome), ("stage", stage))
        return got[("edgefleet_agent_inference_requests_total", key)]

    assert requests("active", "ok") == 3
    assert requests("previous", "ok") == 1
    assert requests("cloud", "ok") == 0
    assert requests("safe_default", "ok") == 0
    assert requests("none", "client_error") == 2
    assert requests("none", "unavailable") == 1

    def bucket(stage: str, le: str) -> float:
        key = (("le", le), ("stage", stage))
        return got[("edgefleet_agent_inference_duration_seconds_bucket", key)]

    assert [bucket("active", le) for le in ("0.0001", "0.00025", "0.0025", "0.005", "+Inf")] == [
        2,
        2,
        2,
        3,
        3,
    ]
    assert bucket("previous", "5.0") == 0 and bucket("previous", "+Inf") == 1
    assert got[("edgefleet_agent_inference_duration_seconds_count", (("stage", "active"),))] == 3
    total = got[("edgefleet_agent_inference_duration_seconds_sum", (("stage", "active"),))]
    assert abs(total - 0.00315) < 1e-12
    les = {dict(k[1])["le"] for k in got if k[0].endswith("_bucket")}
    assert les == {repr(b) for b in LATENCY_BUCKETS_S} | {"+Inf"}
    assert min(LATENCY_BUCKETS_S) == 0.0001 and max(LATENCY_BUCKETS_S) == 5.0


def test_install_results_and_reasons_are_counted_with_bounded_labels() -> None:
    metrics = AgentMetrics()
    for event in (
        {"event": "download-started"},
        {"event": "switched", "slot": "b"},
        {"event": "committed"},
        {"event": "switched", "slot": "a"},
        {"event": "rolled-back", "reason": "watchdog", "message": "3 of 3 NaN"},
        {"event": "refused", "reason": "self-test-failed", "message": "latency 3 ms"},
        {"event": "refused", "reason": "wrong-hardware"},
        {"event": "refused", "reason": "a reason nobody planned for: /etc/passwd"},
        {"event": "fleet-rolled-back", "reason": "fleet-rollback", "to": "pump 1.0.0"},
    ):
        metrics.installs.record(event)
    got = samples(metrics)
    results = {
        dict(labels)["result"]: value
        for (name, labels), value in got.items()
        if name == "edgefleet_agent_installs_total"
    }
    assert results == {
        "installed": 2,
        "committed": 1,
        "rolled_back": 1,
        "refused": 3,
        "fleet_rolled_back": 1,
    }
    refusals = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "edgefleet_agent_install_refusals_total"
    }
    assert set(refusals) == set(refusal_reasons())  # every reason, zeros included, nothing else
    assert {r: v for r, v in refusals.items() if v} == {
        "self-test-failed": 1,
        "wrong-hardware": 1,
        "other": 1,
    }
    rollbacks = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "edgefleet_agent_install_rollbacks_total"
    }
    assert rollbacks == {"watchdog": 1, "crash-loop": 0, "other": 0}


def test_every_refusal_reason_of_the_installer_has_its_label() -> None:
    reasons = refusal_reasons()
    for code in ("tampered-bundle", "self-test-failed", "invalid-bundle", "staging-failed"):
        assert code in reasons
    assert reasons[-1] == "other" and len(reasons) == len(set(reasons))


def test_two_agents_in_one_process_keep_their_own_counts() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first.inference.answered("cloud", 0.02)
    key = ("edgefleet_agent_inference_requests_total", (("outcome", "ok"), ("stage", "cloud")))
    assert samples(first)[key] == 1
    assert samples(second)[key] == 0
    assert first.registry is not second.registry


def test_no_created_series_and_nothing_of_the_process_collectors() -> None:
    text = AgentMetrics().exposition().decode()
    assert "_created" not in text
    assert "process_" not in text and "python_gc" not in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert all(name.startswith("edgefleet_agent_") for name in names)


def test_prometheus_client_is_imported_only_when_the_metrics_are_first_rendered() -> None:
    # 1.3 MB resident on a device whose memory budget is 64 MB: only an agent that is scraped.
    script = (
        "import sys, agent.daemon\n"
        "from agent.metrics import AgentMetrics\n"
        "m = AgentMetrics()\n"
        "m.inference.answered('active', 0.001)\n"
        "before = 'prometheus_client' in sys.modules\n"
        "m.exposition()\n"
        "print(before, 'prometheus_client' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "True"]
