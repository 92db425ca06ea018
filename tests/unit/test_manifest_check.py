"""The device's manifest check accepts and refuses exactly what the pydantic model does.

``protocol.manifest_check`` reads a manifest without pydantic (``edge-agent
verify`` and the fetcher use it); ``protocol.manifest.Manifest`` stays the
definition. Both get the same JSON: a valid manifest, and every variant of it
with one field missing, of the wrong type, out of range, NaN, huge, wrapped or
unwrapped one level, or with an unknown key beside it, plus each consistency
rule broken. Both must accept the same documents with the same values, and
refuse the same documents naming the same place with the same words.
"""

from __future__ import annotations

import copy
import io
import json
import math
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from protocol import manifest as pm
from protocol.bundle import (
    MANIFEST_MEMBER,
    BundleFormatError,
    _first_error,
    read_checked_manifest,
    read_manifest,
)
from protocol.cbpe import DEFAULT_PRIOR_ROWS, Calibration
from protocol.checking import Model
from protocol.derivation import InputDerivation
from protocol.manifest_check import (
    BASELINE,
    CALIBRATION,
    FALLBACK_POLICY,
    FEATURE_BASELINE,
    FEATURE_SPEC,
    FEATURE_SUMMARY,
    FILE_ENTRY,
    GOLDEN_VECTORS,
    INPUT_DERIVATION,
    MANIFEST,
    RESOURCE_BUDGET,
    SCORE_HISTOGRAM,
    TENSOR_SPEC,
    ManifestInvalid,
    check_manifest_json,
)
from protocol.manifest_check import (
    DEFAULT_PRIOR_ROWS as CHECK_PRIOR_ROWS,
)
from protocol.summary import FeatureSummary, ScoreHistogram

SHA = "ab" * 32
BASE: dict[str, Any] = {
    "schema_version": 1,
    "name": "pump-health",
    "version": "1.2.3-rc.1",
    "release_counter": 1_002_001,
    "hardware_ids": ["rpi4-arm64", "jetson:orin"],
    "min_agent_version": "0.2.0",
    "description": "a pump",
    "files": {
        "model.tflite": {"sha256": SHA, "length": 10},
        "golden.npz": {"sha256": SHA, "length": 0},
    },
    "model_file": "model.tflite",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 2], "shape_signature": [-1, 2]}],
    "outputs": [
        {
            "name": "y",
            "dtype": "int8",
            "shape": [1, 2],
            "shape_signature": [-1, 2],
            "quantization": [0.5, -3],
        }
    ],
    "classes": ["ok", "fault"],
    "derivations": [{"input": "x", "method": "elements"}],
    "features": [{"name": "a", "unit": "bar"}, {"name": "b", "valid_min": 0, "valid_max": 9.5}],
    "baseline": {
        "id": "sha256:00",
        "rows": 10,
        "features": [
            {
                "edges": [0.5, 1.5],
                "summary": {
                    "n": 10,
                    "nan": 0,
                    "out_of_range": 1,
                    "mean": 0.7,
                    "m2": 2.5,
                    "min": -1,
                    "max": 3.0,
                    "counts": [3, 4, 3],
                },
            },
            {
                "edges": [2],
                "summary": {
                    "n": 4,
                    "nan": 1,
                    "out_of_range": 0,
                    "counts": [2, 2],
                    "below_baseline": 0,
                    "above_baseline": 1,
                },
            },
        ],
        "scores": {"classes": ["ok", "fault"], "counts": [[1, 2], [3, 4]]},
        "calibration": {
            "classes": ["ok", "fault"],
            "total": [[1, 2], [3, 4]],
            "correct": [[1, 1], [0, 4]],
            "prior_rows": 1.5,
            "allowance": 0.02,
        },
    },
    "golden": {"file": "golden.npz", "count": 2, "atol": 0.001},
    "fallback": {
        "safe_default": {"y": [0.5, 0.5]},
        "confidence_output": "y",
        "confidence_threshold": 0.7,
        "temperature": 1.3,
    },
    "budget": {"max_latency_ms": 20, "max_memory_mb": 32.5},
}

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    1.0,
    1.5,
    -0.5,
    101,
    1e19,
    10**30,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "1",
    " 2 ",
    "1.0",
    "1.5",
    "-1",
    "1_0",
    "nan",
    "inf",
    "x",
    "float32",
    "elements",
    "pump-health",
    "1.2.3",
    "Model.tflite",
    "ab" * 32,
    [],
    [1],
    ["a"],
    [[1]],
    [1.5, "2"],
    [0.5, 1, 2],
    {},
    {"a": 1},
]


def paths(doc: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key and index path in ``doc``, parents before children."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*here, k)
            yield from paths(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*here, i)
            yield from paths(v, (*here, i))


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def variants() -> Iterator[tuple[str, Any]]:
    """(what was changed, document) for every variant of ``BASE``."""
    yield "base", BASE
    for doc in (None, [], 1, "manifest", [BASE]):
        yield f"document {doc!r:.20}", doc
    for path in paths(BASE):
        parent, key = at(BASE, path[:-1]), path[-1]
        if isinstance(parent, dict):
            doc = copy.deepcopy(BASE)
            del at(doc, path[:-1])[key]
            yield f"{path} missing", doc
        else:
            doc = copy.deepcopy(BASE)
            at(doc, path[:-1]).append(copy.deepcopy(parent[key]))
            yield f"{path} repeated", doc
        value = parent[key]
        wrapped = [value], *(value[:1] if isinstance(value, list) else ())
        for value in (*ODD_VALUES, *wrapped):
            doc = copy.deepcopy(BASE)
            at(doc, path[:-1])[key] = copy.deepcopy(value)
            yield f"{path} = {value!r:.30}", doc
        if isinstance(parent[key], dict):
            doc = copy.deepcopy(BASE)
            at(doc, path)["unknown"] = 1
            yield f"{path} with an unknown key", doc
    doc = copy.deepcopy(BASE)
    doc["unknown"] = 1
    yield "unknown top-level key", doc
    yield from rule_breakers()


def changed(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        path = [int(p) if p.isdigit() else p for p in dotted.split("__")]
        if value is _DELETE:
            del at(doc, tuple(path[:-1]))[path[-1]]
        else:
            at(doc, tuple(path[:-1]))[path[-1]] = value
    return doc


_DELETE = object()


def rule_breakers() -> Iterator[tuple[str, Any]]:
    """Documents whose fields each pass but whose consistency rules do not."""
    cases = {
        "bad name": changed(name="Pump"),
        "long name": changed(name="a" * 65),
        "bad version": changed(version="1.2"),
        "build metadata": changed(version="1.2.3+b1"),
        "bad agent version": changed(min_agent_version="v1"),
        "bad hardware id": changed(hardware_ids=["rpi 4"]),
        "repeated hardware id": changed(hardware_ids=["a", "a"]),
        "upper-case sha256": changed(
            files={**BASE["files"], "golden.npz": {"sha256": "AB" * 32, "length": 1}}
        ),
        "sha256 with newline": changed(
            files={**BASE["files"], "golden.npz": {"sha256": SHA + "\n", "length": 1}}
        ),
        "no model file entry": changed(model_file="other.tflite"),
        "no golden entry": changed(golden={"file": "g.npz", "count": 1}),
        "range reversed": changed(features__1__valid_min=10),
        "range NaN": changed(features__1__valid_min=math.nan),
        "features longer than baseline": changed(
            features=[*BASE["features"], {"name": "c"}],
        ),
        "edges not increasing": changed(baseline__features__0__edges=[1.5, 0.5]),
        "edges equal": changed(baseline__features__0__edges=[0.5, 0.5]),
        "counts short": changed(baseline__features__0__summary__counts=[3, 4]),
        "calibration without scores": changed(baseline__scores=None),
        "calibration classes differ": changed(baseline__scores__classes=["fault", "ok"]),
        "score bins differ": changed(baseline__scores__counts=[[1, 2, 3], [3, 4, 5]]),
        "no score rows": changed(baseline__scores__counts=[]),
        "calibration one row": changed(baseline__calibration__total=[[1, 2]]),
        "calibration ragged": changed(baseline__calibration__total=[[1, 2], [3]]),
        "calibration empty rows": changed(
            baseline__calibration__total=[[], []], baseline__calibration__correct=[[], []]
        ),
        "correct shape": changed(baseline__calibration__correct=[[1, 1]]),
        "correct above total": changed(baseline__calibration__correct=[[2, 1], [0, 4]]),
        "correct negative": changed(baseline__calibration__correct=[[-1, 1], [0, 4]]),
        "empty cell, no prior": changed(
            baseline__calibration__total=[[0, 2], [3, 4]],
            baseline__calibration__correct=[[0, 1], [0, 4]],
            baseline__calibration__prior_rows=0,
        ),
        "one class": changed(baseline__calibration__classes=["ok"]),
        "unknown derivation input": changed(derivations=[{"input": "z", "method": "elements"}]),
        "safe default for another output": changed(fallback__safe_default={"z": [1.0]}),
        "safe default extra output": changed(fallback__safe_default={"y": [1.0], "z": [1.0]}),
        "confidence output unknown": changed(fallback__confidence_output="z"),
        "defaults only": changed(
            schema_version=_DELETE,
            min_agent_version=_DELETE,
            description=_DELETE,
            model_file=_DELETE,
            classes=_DELETE,
            budget=_DELETE,
            golden={"count": 1},
            fallback={"safe_default": {"y": [0.0, 1.0]}},
            files={
                "model.tflite": {"sha256": SHA, "length": 1},
                "golden.npz": BASE["files"]["golden.npz"],
            },
        ),
        "huge counts": changed(baseline__features__0__summary__counts=[10**40, 2**63, -(2**63)]),
        "many errors": changed(name=1, version=2, release_counter="x", unknown=3),
    }
    yield from cases.items()


def pydantic_outcome(raw: bytes) -> tuple[str, str]:
    try:
        return "accepted", canonical(pm.Manifest.model_validate_json(raw).model_dump())
    except ValidationError as exc:
        return "refused", _first_error(exc)


def device_outcome(raw: bytes) -> tuple[str, str]:
    try:
        return "accepted", canonical(check_manifest_json(raw).document)
    except ManifestInvalid as exc:
        return "refused", str(exc)


def canonical(value: Any) -> str:
    """Values compared exactly: int and float apart, NaN equal to NaN, tuples as lists."""
    return json.dumps(value, sort_keys=True)


CASES = list(variants())


def test_the_base_document_is_valid_and_the_corpus_is_large() -> None:
    assert pydantic_outcome(json.dumps(BASE).encode())[0] == "accepted"
    assert len(CASES) > 3000


def test_device_and_pydantic_accept_and_refuse_the_same_manifests() -> None:
    differ = []
    outcomes = {"accepted": 0, "refused": 0}
    for what, doc in CASES:
        raw = json.dumps(doc).encode()
        expected = pydantic_outcome(raw)
        outcomes[expected[0]] += 1
        if device_outcome(raw) != expected:
            differ.append(f"{what}: pydantic {expected}, device {device_outcome(raw)}")
    assert differ == []
    assert outcomes["accepted"] > 200 and outcomes["refused"] > 2000


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"name": 1} x', b"\xff", b"[1,", b'{"a": NaN'],
    ids=["empty", "open", "trailing", "not utf-8", "open array", "open NaN"],
)
def test_both_refuse_what_is_not_json(raw: bytes) -> None:
    assert pydantic_outcome(raw)[0] == "refused"
    with pytest.raises(ManifestInvalid, match=r"^manifest: Invalid JSON"):
        check_manifest_json(raw)


@pytest.mark.parametrize("depth", [194, 195, 196, 300])
@pytest.mark.parametrize("kind", ["arrays", "objects"])
def test_both_refuse_the_same_depth_of_nesting(depth: int, kind: str) -> None:
    # Under an ignored key of a summary (5 levels down), where no field check refuses it.
    doc = copy.deepcopy(BASE)
    nested: Any = 1
    for _ in range(depth):
        nested = [nested] if kind == "arrays" else {"a": nested}
    doc["baseline"]["features"][0]["summary"]["ignored"] = nested
    raw = json.dumps(doc).encode()
    assert pydantic_outcome(raw)[0] == device_outcome(raw)[0]
    assert device_outcome(raw)[0] == ("accepted" if depth <= 195 else "refused")


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        (
            "a repeated key (the last wins)",
            '"name": "pump-health"',
            '"name": "x", "name": "pump-health"',
        ),
        ("a lone surrogate", '"a pump"', '"\\ud800"'),
        ("a lone surrogate in an ignored key", '"n": 4,', '"\\udc00": 1, "n": 4,'),
        ("a surrogate pair", '"a pump"', '"\\ud83d\\ude00"'),
        ("a NUL escape", '"a pump"', '"a\\u0000b"'),
        ("a raw control character", '"a pump"', '"a\tb"'),
        ("a byte-order mark", "{", "\ufeff{"),
    ],
)
def test_both_parse_the_same_json(what: str, old: str, new: str) -> None:
    text = json.dumps(BASE)
    assert old in text
    raw = text.replace(old, new, 1).encode()
    expected = pydantic_outcome(raw)
    if expected[0] == "accepted":
        assert device_outcome(raw) == expected, what
    else:  # the words of a JSON syntax error are each parser's own
        assert device_outcome(raw)[0] == "refused", what
        assert device_outcome(raw)[1].startswith("manifest: Invalid JSON: "), what


def test_both_refuse_other_encodings_than_utf8() -> None:
    for raw in (json.dumps(BASE).encode("utf-16"), json.dumps(BASE).encode("utf-32")):
        assert pydantic_outcome(raw)[0] == device_outcome(raw)[0] == "refused"


def test_a_refusal_names_the_place_and_the_rule() -> None:
    doc = changed(baseline__features__0__summary__m2=-1)
    with pytest.raises(ManifestInvalid) as refused:
        check_manifest_json(json.dumps(doc).encode())
    assert str(refused.value) == (
        "baseline.features.0.summary.m2: Input should be greater than or equal to 0"
    )


PAIRS: list[tuple[Model, type[BaseModel]]] = [
    (TENSOR_SPEC, pm.TensorSpec),
    (FEATURE_SPEC, pm.FeatureSpec),
    (FEATURE_SUMMARY, FeatureSummary),
    (FEATURE_BASELINE, pm.FeatureBaseline),
    (SCORE_HISTOGRAM, ScoreHistogram),
    (CALIBRATION, Calibration),
    (BASELINE, pm.Baseline),
    (FILE_ENTRY, pm.FileEntry),
    (GOLDEN_VECTORS, pm.GoldenVectors),
    (FALLBACK_POLICY, pm.FallbackPolicy),
    (RESOURCE_BUDGET, pm.ResourceBudget),
    (INPUT_DERIVATION, InputDerivation),
    (MANIFEST, pm.Manifest),
]


@pytest.mark.parametrize(("check", "model"), PAIRS, ids=[m.__name__ for _, m in PAIRS])
def test_each_check_has_its_models_fields_defaults_and_extra_rule(
    check: Model, model: type[BaseModel]
) -> None:
    assert check.name == model.__name__
    fields = model.model_fields
    assert [f.name for f in check.fields] == list(fields)
    for f in check.fields:
        info = fields[f.name]
        assert f.required == info.is_required(), f.name
        if not f.required:
            default = f.default() if callable(f.default) else f.default
            expected = info.get_default(call_default_factory=True)
            if isinstance(expected, BaseModel):
                expected = expected.model_dump()
            assert default == expected and type(default) is type(expected), f.name
    assert check.forbid_extra == (model.model_config.get("extra") == "forbid")


def test_the_enumerations_and_defaults_are_the_models() -> None:
    assert CHECK_PRIOR_ROWS == DEFAULT_PRIOR_ROWS
    dtype = pm.TensorSpec.model_fields["dtype"].annotation
    assert dtype is not None and dtype.__args__ == pm.TensorDType.__args__
    method = InputDerivation.model_fields["method"].annotation
    assert method is not None
    from protocol.manifest_check import DERIVATION_METHODS, TENSOR_DTYPES

    assert pm.TensorDType.__args__ == TENSOR_DTYPES
    assert method.__args__ == DERIVATION_METHODS


def bundle_with_manifest(raw: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(MANIFEST_MEMBER)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return out.getvalue()


@pytest.mark.parametrize(
    "doc",
    [
        BASE,
        changed(release_counter=0),
        changed(name="Pump"),
        changed(fallback__confidence_output="z"),
        changed(baseline__calibration__prior_rows=math.nan),
    ],
    ids=["valid", "counter 0", "bad name", "unknown output", "NaN prior"],
)
def test_a_bundle_reads_alike_with_and_without_pydantic(doc: dict[str, Any]) -> None:
    data = bundle_with_manifest(json.dumps(doc).encode())
    try:
        expected: object = read_manifest(io.BytesIO(data)).model_dump()
    except BundleFormatError as exc:
        expected = str(exc)
    try:
        got: object = read_checked_manifest(io.BytesIO(data)).document
    except BundleFormatError as exc:
        got = str(exc)
    assert canonical(got) == canonical(expected)
