"""The bundle manifest: everything a device needs to know about a model.

A bundle is a model file plus this manifest (and its golden vectors). The
manifest is versioned by ``schema_version``; a reader refuses versions it does
not know instead of guessing. Every field is validated on load, so a device
never acts on a manifest that does not make sense.

A device that only checks a manifest (``edge-agent verify``, the fetcher) reads
it through :mod:`protocol.manifest_check`, the same rules without pydantic: a
change here needs the same change there, and ``tests/unit/test_manifest_check.py``
fails until the two accept and refuse the same documents.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.cbpe import Calibration
from protocol.derivation import InputDerivation
from protocol.summary import FeatureSummary, ScoreHistogram
from protocol.versioning import HARDWARE_ID_PATTERN, NAME_PATTERN, parse_semver

MANIFEST_SCHEMA_VERSION: Final = 1

# The dtypes TFLite tensors may have, by their numpy names.
TensorDType = Literal[
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
]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Strict):
    """One input or output tensor as the model declares it.

    ``shape`` is the shape the model was built with; ``-1`` in
    ``shape_signature`` marks a dimension that may be resized (a dynamic batch).
    """

    name: str
    dtype: TensorDType
    shape: list[int]
    shape_signature: list[int]
    quantization: tuple[float, int] | None = Field(
        default=None, description="(scale, zero point) of a quantized tensor"
    )

    @property
    def example_shape(self) -> list[int]:
        """The shape of one example: the shape without its batch dimension."""
        return self.shape[1:]


class FeatureSpec(_Strict):
    """A summarised feature: its name, unit and the range a valid value lies in."""

    name: str
    unit: str | None = None
    valid_min: float | None = None
    valid_max: float | None = None

    @model_validator(mode="after")
    def _range_is_ordered(self) -> FeatureSpec:
        if (
            self.valid_min is not None
            and self.valid_max is not None
            and self.valid_min > self.valid_max
        ):
            raise ValueError(f"feature {self.name}: valid_min is above valid_max")
        return self


class FeatureBaseline(_Strict):
    """The training set's summary of one feature and the bin edges devices use."""

    edges: list[float]
    summary: FeatureSummary

    @model_validator(mode="after")
    def _counts_match_edges(self) -> FeatureBaseline:
        if len(self.summary.counts) != len(self.edges) + 1:
            raise ValueError("a baseline needs len(edges) + 1 counts")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("bin edges must increase strictly")
        return self


class Baseline(_Strict):
    """What the model's training data looked like, in the summary format."""

    id: str = Field(description="identifier of the bin edges (sha256 of their canonical JSON)")
    rows: int = Field(ge=1)
    features: list[FeatureBaseline]
    scores: ScoreHistogram | None = Field(
        default=None, description="top-score histogram per predicted class, for CBPE"
    )
    calibration: Calibration | None = Field(
        default=None,
        description="how often the model was right per predicted class and top-score bin, "
        "on labelled reference data: what CBPE estimates accuracy with",
    )

    @model_validator(mode="after")
    def _calibration_matches_scores(self) -> Baseline:
        if self.calibration is not None:
            if self.scores is None:
                raise ValueError("a calibration needs the top-score histogram (scores)")
            if self.calibration.classes != self.scores.classes:
                raise ValueError("calibration.classes differ from scores.classes")
            # An empty histogram has no bins to compare: refused, not an IndexError.
            if not self.scores.counts or self.calibration.bins != len(self.scores.counts[0]):
                raise ValueError("calibration and scores have different numbers of score bins")
        return self


class FileEntry(_Strict):
    """A file inside the bundle, bound to the manifest by its hash and length."""

    sha256: str
    length: int = Field(ge=0)

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class GoldenVectors(_Strict):
    """Inputs with known outputs, checked on the device before a model is switched in."""

    file: str = "golden.npz"
    count: int = Field(ge=1)
    atol: float = Field(default=1e-4, ge=0)
    rtol: float = Field(default=1e-3, ge=0)


class FallbackPolicy(_Strict):
    """What the device answers when no model can, and when to ask the cloud."""

    safe_default: dict[str, list[float]] = Field(
        description="flattened output per output tensor, served when every stage failed"
    )
    confidence_output: str | None = Field(
        default=None, description="the probability output whose top score is the confidence"
    )
    confidence_threshold: float = Field(default=0.6, ge=0.0, le=1.0)
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="temperature that calibrates confidence_output's scores, "
        "softmax(log(p) / T), fitted on labelled reference data (1.0: as the model gives them)",
    )


class ResourceBudget(_Strict):
    """Limits the device's self-test enforces before switching to a model."""

    max_latency_ms: float = Field(default=100.0, gt=0)
    max_memory_mb: float = Field(default=64.0, gt=0)


class Manifest(_Strict):
    """A model bundle's manifest (schema version 1)."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str
    version: str
    release_counter: int = Field(ge=1)
    hardware_ids: list[str] = Field(min_length=1)
    min_agent_version: str = "0.1.0"
    description: str = ""
    files: dict[str, FileEntry]
    model_file: str = "model.tflite"
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    classes: list[str] | None = Field(default=None, description="labels of the score output")
    derivations: list[InputDerivation]
    features: list[FeatureSpec]
    baseline: Baseline
    golden: GoldenVectors
    fallback: FallbackPolicy
    budget: ResourceBudget = ResourceBudget()

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("name must be 1-64 of a-z 0-9 . _ - and start with a letter or digit")
        return value

    @field_validator("version", "min_agent_version")
    @classmethod
    def _is_semver(cls, value: str) -> str:
        parse_semver(value)
        return value

    @field_validator("hardware_ids")
    @classmethod
    def _hardware_ids_are_safe(cls, value: list[str]) -> list[str]:
        for hw in value:
            if not HARDWARE_ID_PATTERN.match(hw):
                raise ValueError(f"hardware id {hw!r} has characters outside A-Z a-z 0-9 . _ : -")
        if len(set(value)) != len(value):
            raise ValueError("hardware ids repeat")
        return value

    @model_validator(mode="after")
    def _is_consistent(self) -> Manifest:
        for needed in (self.model_file, self.golden.file):
            if needed not in self.files:
                raise ValueError(f"files has no entry for {needed}")
        if len(self.features) != len(self.baseline.features):
            raise ValueError("features and baseline.features differ in length")
        input_names = {t.name for t in self.inputs}
        for d in self.derivations:
            if d.input not in input_names:
                raise ValueError(f"derivation names unknown input {d.input!r}")
        output_names = {t.name for t in self.outputs}
        if set(self.fallback.safe_default) != output_names:
            raise ValueError("fallback.safe_default must give every output and only those")
        if self.fallback.confidence_output not in (None, *output_names):
            raise ValueError("fallback.confidence_output names no output")
        return self

    def tensor_disagreement(
        self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> str | None:
        """How a loaded model's tensors differ from the ones this manifest promises, or ``None``.

        Names, dtypes and shapes must be the same, in order.
        """

        def shape(specs: Sequence[TensorSpec]) -> list[tuple[str, str, list[int]]]:
            return [(t.name, t.dtype, t.shape) for t in specs]

        if (shape(inputs), shape(outputs)) == (shape(self.inputs), shape(self.outputs)):
            return None
        return (
            "the model's tensors differ from the manifest's contract: "
            f"{shape(inputs)} -> {shape(outputs)}"
        )

    @property
    def target_path(self) -> str:
        """Where the bundle lives in the image repository."""
        return bundle_target_path(self.name, self.version)


def bundle_target_path(name: str, version: str) -> str:
    """The TUF target path of a bundle: ``NAME/NAME-VERSION.bundle``."""
    return f"{name}/{name}-{version}.bundle"
