"""The bundle manifest checked without pydantic: what a device reads from a bundle.

:class:`protocol.manifest.Manifest` is the manifest's definition (the release
tooling and the server build and read bundles with it). A device that only
needs to know a bundle's manifest is sound — ``edge-agent verify``, the
fetcher that checks every download — reads it here instead: the same fields,
defaults, constraints and consistency rules, written as
:mod:`protocol.checking` checks, with pydantic's refusal for the same place in
the same words. ``tests/unit/test_manifest_check.py`` holds these checks to
the pydantic models field by field and over a corpus of valid and invalid
manifests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final

from protocol.checking import (
    Field,
    Invalid,
    Model,
    array,
    integer,
    literal,
    mapping,
    number,
    optional,
    pair,
    string,
)
from protocol.versioning import HARDWARE_ID_PATTERN, NAME_PATTERN, parse_semver

# The same values as protocol.manifest and protocol.cbpe (the tests compare them).
TENSOR_DTYPES: Final = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "bool",
)
DERIVATION_METHODS: Final = ("elements", "channel_moments", "global_moments")
DEFAULT_PRIOR_ROWS: Final = 2.0
# pydantic-core's JSON parser refuses a value nested deeper than this (the document is 0).
MAX_JSON_DEPTH: Final = 200
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _feature_range(spec: dict[str, Any]) -> None:
    lo, hi = spec["valid_min"], spec["valid_max"]
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"feature {spec['name']}: valid_min is above valid_max")


def _counts_match_edges(baseline: dict[str, Any]) -> None:
    edges = baseline["edges"]
    if len(baseline["summary"]["counts"]) != len(edges) + 1:
        raise ValueError("a baseline needs len(edges) + 1 counts")
    if any(b <= a for a, b in pairwise(edges)):
        raise ValueError("bin edges must increase strictly")


def _calibration_is_consistent(c: dict[str, Any]) -> None:
    total, correct = c["total"], c["correct"]
    shape = [len(row) for row in total]
    if len(total) != len(c["classes"]) or len(set(shape)) != 1 or not shape[0]:
        raise ValueError("total needs one row per class, all with the same number of bins")
    if [len(row) for row in correct] != shape:
        raise ValueError("correct must have the shape of total")
    for t_row, c_row in zip(total, correct, strict=True):
        if any(not 0 <= k <= t for t, k in zip(t_row, c_row, strict=True)):
            raise ValueError("every cell needs 0 <= correct <= total")
    if c["prior_rows"] == 0 and any(t == 0 for row in total for t in row):
        raise ValueError("a calibration with empty cells needs prior_rows > 0")


def _calibration_matches_scores(baseline: dict[str, Any]) -> None:
    calibration, scores = baseline["calibration"], baseline["scores"]
    if calibration is not None:
        if scores is None:
            raise ValueError("a calibration needs the top-score histogram (scores)")
        if calibration["classes"] != scores["classes"]:
            raise ValueError("calibration.classes differ from scores.classes")
        if not scores["counts"] or len(calibration["total"][0]) != len(scores["counts"][0]):
            raise ValueError("calibration and scores have different numbers of score bins")


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return value


def _name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError("name must be 1-64 of a-z 0-9 . _ - and start with a letter or digit")
    return value


def _semver(value: str) -> str:
    parse_semver(value)
    return value


def _hardware_ids(value: list[str]) -> list[str]:
    for hw in value:
        if not HARDWARE_ID_PATTERN.match(hw):
            raise ValueError(f"hardware id {hw!r} has characters outside A-Z a-z 0-9 . _ : -")
    if len(set(value)) != len(value):
        raise ValueError("hardware ids repeat")
    return value


def _manifest_is_consistent(m: dict[str, Any]) -> None:
    for needed in (m["model_file"], m["golden"]["file"]):
        if needed not in m["files"]:
            raise ValueError(f"files has no entry for {needed}")
    if len(m["features"]) != len(m["baseline"]["features"]):
        raise ValueError("features and baseline.features differ in length")
    input_names = {t["name"] for t in m["inputs"]}
    for d in m["derivations"]:
        if d["input"] not in input_names:
            raise ValueError(f"derivation names unknown input {d['input']!r}")
    output_names = {t["name"] for t in m["outputs"]}
    if set(m["fallback"]["safe_default"]) != output_names:
        raise ValueError("fallback.safe_default must give every output and only those")
    if m["fallback"]["confidence_output"] not in (None, *output_names):
        raise ValueError("fallback.confidence_output names no output")


_ints = array(integer())
TENSOR_SPEC = Model(
    "TensorSpec",
    [
        Field("name", string),
        Field("dtype", literal(*TENSOR_DTYPES)),
        Field("shape", _ints),
        Field("shape_signature", _ints),
        Field("quantization", optional(pair(number(), integer())), None),
    ],
    forbid_extra=True,
)
FEATURE_SPEC = Model(
    "FeatureSpec",
    [
        Field("name", string),
        Field("unit", optional(string), None),
        Field("valid_min", optional(number()), None),
        Field("valid_max", optional(number()), None),
    ],
    forbid_extra=True,
    after=[_feature_range],
)
FEATURE_SUMMARY = Model(
    "FeatureSummary",
    [
        Field("n", integer(ge=0)),
        Field("nan", integer(ge=0)),
        Field("out_of_range", integer(ge=0)),
        Field("mean", number(), 0.0),
        Field("m2", number(ge=0.0), 0.0),
        Field("min", optional(number()), None),
        Field("max", optional(number()), None),
        Field("counts", _ints),
        Field("below_baseline", optional(integer(ge=0)), None, exclude_none=True),
        Field("above_baseline", optional(integer(ge=0)), None, exclude_none=True),
    ],
)
FEATURE_BASELINE = Model(
    "FeatureBaseline",
    [Field("edges", array(number())), Field("summary", FEATURE_SUMMARY)],
    forbid_extra=True,
    after=[_counts_match_edges],
)
SCORE_HISTOGRAM = Model(
    "ScoreHistogram",
    [Field("classes", array(string)), Field("counts", array(_ints))],
)
CALIBRATION = Model(
    "Calibration",
    [
        Field("classes", array(string, min_length=2)),
        Field("total", array(_ints)),
        Field("correct", array(_ints)),
        Field("prior_rows", number(ge=0.0), DEFAULT_PRIOR_ROWS),
        Field("allowance", optional(number(ge=0.0, le=1.0)), None),
    ],
    forbid_extra=True,
    after=[_calibration_is_consistent],
)
BASELINE = Model(
    "Baseline",
    [
        Field("id", string),
        Field("rows", integer(ge=1)),
        Field("features", array(FEATURE_BASELINE)),
        Field("scores", optional(SCORE_HISTOGRAM), None),
        Field("calibration", optional(CALIBRATION), None),
    ],
    forbid_extra=True,
    after=[_calibration_matches_scores],
)
FILE_ENTRY = Model(
    "FileEntry",
    [Field("sha256", string, after=[_sha256]), Field("length", integer(ge=0))],
    forbid_extra=True,
)
GOLDEN_VECTORS = Model(
    "GoldenVectors",
    [
        Field("file", string, "golden.npz"),
        Field("count", integer(ge=1)),
        Field("atol", number(ge=0), 1e-4),
        Field("rtol", number(ge=0), 1e-3),
    ],
    forbid_extra=True,
)
FALLBACK_POLICY = Model(
    "FallbackPolicy",
    [
        Field("safe_default", mapping(array(number()))),
        Field("confidence_output", optional(string), None),
        Field("confidence_threshold", number(ge=0.0, le=1.0), 0.6),
        Field("temperature", number(gt=0.0, le=100.0), 1.0),
    ],
    forbid_extra=True,
)
RESOURCE_BUDGET = Model(
    "ResourceBudget",
    [
        Field("max_latency_ms", number(gt=0), 100.0),
        Field("max_memory_mb", number(gt=0), 64.0),
    ],
    forbid_extra=True,
)
INPUT_DERIVATION = Model(
    "InputDerivation",
    [Field("input", string), Field("method", literal(*DERIVATION_METHODS))],
)
MANIFEST = Model(
    "Manifest",
    [
        Field("schema_version", literal(1), 1),
        Field("name", string, after=[_name]),
        Field("version", string, after=[_semver]),
        Field("release_counter", integer(ge=1)),
        Field("hardware_ids", array(string, min_length=1), after=[_hardware_ids]),
        Field("min_agent_version", string, "0.1.0", after=[_semver]),
        Field("description", string, ""),
        Field("files", mapping(FILE_ENTRY)),
        Field("model_file", string, "model.tflite"),
        Field("inputs", array(TENSOR_SPEC, min_length=1)),
        Field("outputs", array(TENSOR_SPEC, min_length=1)),
        Field("classes", optional(array(string)), None),
        Field("derivations", array(INPUT_DERIVATION)),
        Field("features", array(FEATURE_SPEC)),
        Field("baseline", BASELINE),
        Field("golden", GOLDEN_VECTORS),
        Field("fallback", FALLBACK_POLICY),
        Field("budget", RESOURCE_BUDGET, lambda: {"max_latency_ms": 100.0, "max_memory_mb": 64.0}),
    ],
    forbid_extra=True,
    after=[_manifest_is_consistent],
)


class ManifestInvalid(ValueError):
    """The manifest breaks the contract; the message names where and what, as pydantic's does."""


@dataclass(frozen=True)
class CheckedManifest:
    """A manifest that passed every check: ``document`` is what ``Manifest.model_dump()`` gives."""

    document: dict[str, Any]

    @property
    def name(self) -> str:
        """The bundle's name."""
        return str(self.document["name"])

    @property
    def version(self) -> str:
        """The bundle's semantic version."""
        return str(self.document["version"])

    @property
    def release_counter(self) -> int:
        """The bundle's release counter."""
        return int(self.document["release_counter"])

    @property
    def hardware_ids(self) -> tuple[str, ...]:
        """The hardware the bundle is built for."""
        return tuple(self.document["hardware_ids"])


def check_manifest(document: Any) -> CheckedManifest:
    """Check a parsed manifest; :class:`ManifestInvalid` says ``where: what`` pydantic would."""
    try:
        return CheckedManifest(MANIFEST(document))
    except Invalid as exc:
        raise ManifestInvalid(f"{exc.where('manifest')}: {exc.msg}") from None


def check_manifest_json(raw: bytes) -> CheckedManifest:
    """Parse and check a manifest's JSON (NaN and Infinity allowed, as pydantic allows them)."""
    try:
        # UTF-8 only, as pydantic reads JSON (json.loads would also take UTF-16 and UTF-32).
        document = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ManifestInvalid(f"manifest: Invalid JSON: {exc}") from None
    if (problem := _parser_refuses(document)) is not None:
        raise ManifestInvalid(f"manifest: Invalid JSON: {problem}")
    return check_manifest(document)


def _parser_refuses(document: Any) -> str | None:
    """What pydantic's JSON parser refuses that json.loads took, anywhere in ``document``.

    Values nested deeper than :data:`MAX_JSON_DEPTH`, and strings with a lone
    surrogate escape (``"\\ud800"``); ignored keys included.
    """
    stack = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH}"
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a lone surrogate escape in a string"
    return None
