"""The local API's admission: connections and bytes in flight against the configured limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api.admission import REQUEST_COST_FACTOR, Admission, ApiLimits, request_cost
from agent.config import AgentConfig, ApiConfig, ConfigError


def test_connections_beyond_the_limit_are_refused_and_counted() -> None:
    admission = Admission(ApiLimits(max_connections=2))
    assert admission.open_connection() and admission.open_connection()
    assert not admission.open_connection()
    assert admission.connections == 2
    admission.close_connection()
    assert admission.open_connection()
    counters = admission.counters
    assert counters.refused["connections"] == 1
    assert (counters.connections_accepted, counters.peak_connections) == (3, 2)


def test_charges_never_exceed_the_budget_and_are_given_back() -> None:
    admission = Admission(ApiLimits(max_body_bytes=1000, max_inflight_bytes=2 * request_cost(1000)))
    assert admission.try_charge(request_cost(1000))
    assert admission.try_charge(request_cost(1000))
    assert not admission.try_charge(1)
    assert admission.inflight_bytes == 2 * request_cost(1000)
    admission.release(request_cost(1000))
    assert admission.try_charge(request_cost(500))
    assert admission.counters.peak_inflight_bytes == 2 * request_cost(1000)
    assert admission.counters.requests_admitted == 3


def test_a_body_over_the_limit_is_refused_and_counted() -> None:
    admission = Admission(ApiLimits(max_body_bytes=4096))
    assert admission.body_allowed(4096)
    assert not admission.body_allowed(4097)
    assert admission.counters.refused == {
        "connections": 0,
        "inflight_bytes": 0,
        "body_too_large": 1,
        "body_timeout": 0,
    }


def test_releasing_more_than_was_charged_is_a_bug_not_a_silent_negative() -> None:
    admission = Admission(ApiLimits())
    admission.try_charge(10)
    with pytest.raises(RuntimeError, match="release of 11 bytes, 10 are charged"):
        admission.release(11)
    with pytest.raises(RuntimeError, match="without an open connection"):
        admission.close_connection()


def test_a_request_is_charged_its_worst_case_parse() -> None:
    # "0.0," is 4 bytes of JSON and 32 bytes as a Python float in a list, plus its tensors.
    assert request_cost(1_000_000) == REQUEST_COST_FACTOR * 1_000_000
    assert REQUEST_COST_FACTOR >= 11


def test_limits_must_hold_one_request_of_the_largest_body() -> None:
    with pytest.raises(ValueError, match="cannot hold one request of max_body_bytes 1048576"):
        ApiLimits(max_body_bytes=1024 * 1024, max_inflight_bytes=4 * 1024 * 1024)
    ApiLimits(max_body_bytes=1024 * 1024, max_inflight_bytes=request_cost(1024 * 1024))


def test_metrics_are_prometheus_text_with_every_refusal_reason() -> None:
    admission = Admission(ApiLimits(max_connections=1))
    admission.open_connection()
    admission.open_connection()
    admission.try_charge(123)
    text = admission.metrics()
    assert "edgefleet_agent_api_connections 1\n" in text
    assert "edgefleet_agent_api_max_connections 1\n" in text
    assert "edgefleet_agent_api_inflight_bytes 123\n" in text
    assert 'edgefleet_agent_api_refused_total{limit="connections"} 1\n' in text
    assert 'edgefleet_agent_api_refused_total{limit="inflight_bytes"} 0\n' in text
    assert 'edgefleet_agent_api_refused_total{limit="body_too_large"} 0\n' in text
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(len(line.split(" ")) == 2 for line in samples)


# -- the [api] section of agent.toml -------------------------------------------------------------


def test_the_default_api_limits_fit_an_edge_device() -> None:
    api = ApiConfig()
    limits = ApiLimits.from_config(api)
    assert limits == ApiLimits()
    assert (api.max_connections, api.max_body_bytes, api.max_inflight_bytes) == (
        64,
        4 * 1024 * 1024,
        80 * 1024 * 1024,
    )
    assert api.max_inflight_bytes >= request_cost(api.max_body_bytes)
    assert (api.retry_after_s, api.admission_wait_s, api.body_timeout_s) == (1, 2.0, 10.0)


def write_config(tmp_path: Path, api: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "d1"\nhardware_id = "rpi4-arm64"\ndata_dir = "data"\n'
        '[image_repository]\nurl = "repo"\nroot = "root.json"\n'
        '[director]\nurl = "director"\nroot = "droot.json"\n'
        f"[api]\n{api}\n"
    )
    return path


def test_api_limits_are_read_from_the_config_file(tmp_path: Path) -> None:
    config = AgentConfig.load(
        write_config(
            tmp_path,
            "max_connections = 8\nmax_body_bytes = 1048576\nmax_inflight_bytes = 20971520\n"
            "retry_after_s = 5\nadmission_wait_s = 0.5\nbody_timeout_s = 3",
        )
    )
    assert ApiLimits.from_config(config.api) == ApiLimits(
        max_connections=8,
        max_body_bytes=1024 * 1024,
        max_inflight_bytes=20 * 1024 * 1024,
        retry_after_s=5,
        admission_wait_s=0.5,
        body_timeout_s=3.0,
    )


@pytest.mark.parametrize(
    ("api", "message"),
    [
        (
            "max_body_bytes = 4194304\nmax_inflight_bytes = 8388608",
            "api: Value error, max_inflight_bytes (8388608) must hold one request of "
            "max_body_bytes (4194304), which is charged 83886080 bytes",
        ),
        ("max_connections = 0", "api.max_connections: Input should be greater than or equal to 1"),
        ("retry_after_s = 0", "api.retry_after_s: Input should be greater than or equal to 1"),
        ("body_timeout_s = 0", "api.body_timeout_s: Input should be greater than 0"),
        ("max_inflight = 5", "api.max_inflight: Extra inputs are not permitted"),
    ],
)
def test_impossible_api_limits_are_refused_naming_the_field(
    tmp_path: Path, api: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentConfig.load(write_config(tmp_path, api))
    assert message in str(caught.value)
