"""The local API's admission: connections and bytes in flight against the configured limits."""

from __future__ import annotations

import contextlib
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.api.admission import (
    MAX_JSON_DEPTH,
    REQUEST_COST_FACTOR,
    Admission,
    ApiLimits,
    parse_cost,
    request_cost,
)
from agent.api.jsonscan import JsonStructure, scan_structure
from agent.api.routes import parse_request
from agent.config import AgentConfig, ApiConfig, ConfigError
from protocol.inference import MAX_RANK, InferenceRequestError, decode_inputs


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


# -- what a body's JSON costs, read before it is parsed -------------------------------------------


def reference_structure(text: str) -> tuple[int, int, int]:
    """Depth, arrays and objects of JSON ``text``, one character at a time."""
    depth = deepest = arrays = objects = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
            arrays += c == "["
            objects += c == "{"
        elif c in "]}":
            depth -= 1
    return deepest, arrays, objects


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 8 or roll < 0.3:
        return rng.choice([0, 1.5, "a[b", '\\"[{', "\\\\", 'x\\\\"]', "é[", None, True, "}}"])
    if roll < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["k", "[", '\\"{', "\\\\", "{"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("piece_bytes", [1, 3, 7, 64, 32 * 1024])
def test_the_scan_counts_arrays_and_objects_outside_strings(piece_bytes: int) -> None:
    rng = random.Random(piece_bytes)
    for _ in range(400):
        text = json.dumps(random_json(rng), ensure_ascii=rng.random() < 0.5)
        found = scan_structure(text.encode(), 100, piece_bytes=piece_bytes)
        assert (found.depth, found.arrays, found.objects) == reference_structure(text), text
    # runs of backslashes across the pieces' edges: only an odd run escapes a quote
    for n in range(12):
        text = json.dumps(["\\" * n + '"[', "]"])
        found = scan_structure(text.encode(), 100, piece_bytes=piece_bytes)
        assert (found.depth, found.arrays, found.objects) == (1, 1, 0), text


def test_the_scan_stops_once_the_nesting_is_too_deep() -> None:
    body = b'{"inputs": [' + b"[" * 1000 + b"]" * 1000 + b"]}"
    assert scan_structure(body, MAX_JSON_DEPTH).depth == MAX_JSON_DEPTH + 1
    brackets_in_a_string = json.dumps({"id": "[" * 1000, "inputs": []}).encode()
    assert scan_structure(brackets_in_a_string, MAX_JSON_DEPTH) == JsonStructure(2, 1, 1)


def test_the_deepest_json_allowed_is_a_request_around_data_of_the_highest_rank() -> None:
    assert MAX_JSON_DEPTH == 3 + MAX_RANK


def request_of(data: str, shape: list[int], count: int = 1) -> bytes:
    tensor = '{"name": "x%d", "shape": %s, "datatype": "FP32", "data": %s}'
    inputs = ",".join(tensor % (i, json.dumps(shape), data) for i in range(count))
    return ('{"inputs": [' + inputs + "]}").encode()


def nested(n: int, rank: int) -> str:
    one = "[" * (rank - 1) + "0" + "]" * (rank - 1)
    return "[" + ",".join([one] * n) + "]"


# ~256 KB bodies of the shapes that cost the most per byte once parsed
N = 64 * 1024
HOSTILE_BODIES: dict[str, bytes] = {
    "short ints": request_of("[" + ",".join(["0"] * N * 2) + "]", [N * 2]),
    "floats 0.0": request_of("[" + ",".join(["0.0"] * N) + "]", [N]),
    "ints 1000": request_of("[" + ",".join(["1000"] * N) + "]", [N]),
    "long floats": request_of("[" + ",".join(["0.12345678901234567"] * (N // 4)) + "]", [N // 4]),
    "strings": request_of("[" + ",".join(['"ab"'] * N) + "]", [N]),
    "tiny arrays": request_of(nested(N, 2), [N, 1]),
    "empty arrays": request_of("[" + ",".join(["[]"] * N) + "]", [N, 0]),
    "deepest allowed": request_of(nested(N // 16, MAX_RANK), [N // 16] + [1] * (MAX_RANK - 1)),
    "empty objects": request_of("[" + ",".join(["{}"] * N) + "]", [N]),
    "many tensors": request_of("[0]", [1], count=N // 16),
    "many parameters": (
        '{"parameters": {"p": [' + ",".join(['{"": 0}'] * (N // 2)) + "]}, "
        '"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}'
    ).encode(),
    "many keys": (
        '{"parameters": {' + ",".join(f'"{i}": 0' for i in range(N // 2)) + "}, "
        '"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}'
    ).encode(),
}


@pytest.mark.parametrize("shape", list(HOSTILE_BODIES))
def test_parsing_and_decoding_any_body_stays_within_its_charge(shape: str) -> None:
    body = bytearray(HOSTILE_BODIES[shape])
    structure = scan_structure(body, MAX_JSON_DEPTH)
    assert structure.depth <= MAX_JSON_DEPTH
    tracemalloc.start()
    try:
        with contextlib.suppress(InferenceRequestError, ValidationError):
            decode_inputs(parse_request(body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the body itself was in memory before tracing began
    assert peak + len(body) <= parse_cost(len(body), structure)
