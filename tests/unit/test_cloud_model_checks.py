"""What a model must pass before it serves, on a device or in the cloud: tensors, golden vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from protocol.bundle import read_manifest
from protocol.golden import golden_disagreement
from protocol.manifest import Manifest, TensorSpec

EXPECTED = {"scores": np.array([[0.9, 0.1], [0.2, 0.8]])}


def test_outputs_within_tolerance_agree_and_report_their_largest_error() -> None:
    worst, problem = golden_disagreement(
        {"scores": EXPECTED["scores"] + 5e-5}, EXPECTED, atol=1e-4, rtol=0.0
    )
    assert problem is None
    assert worst == pytest.approx(5e-5)


def test_an_output_beyond_tolerance_names_the_golden_vector_and_output() -> None:
    got = EXPECTED["scores"].copy()
    got[1, 0] += 0.5
    _, problem = golden_disagreement({"scores": got}, EXPECTED, atol=1e-4, rtol=1e-3)
    assert problem is not None
    assert problem.startswith("golden vector 1: output 'scores' differs by 0.5")


@pytest.mark.parametrize(
    ("outputs", "fault"),
    [
        ({"scores": np.array([[np.nan, 0.1], [0.2, 0.8]])}, "NaN or Inf"),
        ({"logits": EXPECTED["scores"]}, "output 'scores' is missing"),
        ({"scores": EXPECTED["scores"][:1]}, "has shape [1, 2], not [2, 2]"),
    ],
)
def test_missing_misshapen_or_non_finite_outputs_are_named(
    outputs: dict[str, npt.NDArray[np.float64]], fault: str
) -> None:
    _, problem = golden_disagreement(outputs, EXPECTED, atol=1.0, rtol=1.0)
    assert problem is not None and fault in problem


@pytest.fixture
def manifest_v1(bundles: dict[str, Path]) -> Manifest:
    with bundles["v1"].open("rb") as f:
        return read_manifest(f)


def test_a_model_whose_tensors_differ_from_the_manifest_is_named(manifest_v1: Manifest) -> None:
    assert manifest_v1.tensor_disagreement(manifest_v1.inputs, manifest_v1.outputs) is None
    wider = [TensorSpec(name="features", dtype="float32", shape=[1, 17], shape_signature=[-1, 17])]
    problem = manifest_v1.tensor_disagreement(wider, manifest_v1.outputs)
    assert problem is not None
    assert "differ from the manifest's contract" in problem and "17" in problem
