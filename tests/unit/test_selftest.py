"""The self-test refuses models that do not load, disagree with their golden vectors,
or break the manifest's latency and memory budget — with the real runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.ota.errors import SelfTestFailed
from agent.ota.selftest import self_test
from agent.ota.slots import Slots
from firmware_images.tflite_writer import GraphBuilder, build_unresolved_custom_op_model
from fleet_server.release.bundle_builder import BundleSpec, build_bundle
from model_runtime import default_runtime
from protocol.manifest import ResourceBudget
from testbed.images import MODELS


def staged(tmp_path: Path, bundle: Path) -> tuple[Path, object]:
    slots = Slots(tmp_path / "slots")
    manifest = slots.stage("a", bundle)
    return slots.path("a"), manifest


def test_a_good_model_passes_and_reports_its_measurements(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    slot, manifest = staged(tmp_path, bundles["v2"])
    model, report = self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]
    assert report.golden_max_error <= 1e-6
    assert 0 < report.latency_p95_ms < 100
    assert model.outputs[0].name == "scores"


def test_an_unresolved_custom_op_is_a_refusal_not_a_crash(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    slot, manifest = staged(tmp_path, bundles["v1"])
    (slot / "model.tflite").write_bytes(build_unresolved_custom_op_model())
    with pytest.raises(SelfTestFailed, match="unresolved custom op: EdgefleetMysteryOp"):
        self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]


def test_golden_vectors_that_disagree_are_refused(tmp_path: Path, bundles: dict[str, Path]) -> None:
    slot, manifest = staged(tmp_path, bundles["v1"])
    shutil.copyfile(MODELS / "v2.tflite", slot / "model.tflite")  # same contract, other answers
    with pytest.raises(SelfTestFailed, match=r"golden vector \d+: output 'scores' differs"):
        self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]


def test_a_model_with_other_tensors_than_the_manifest_is_refused(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    slot, manifest = staged(tmp_path, bundles["v1"])
    g = GraphBuilder()
    x = g.add_input("features", [1, 8])
    g.mark_output(g.softmax(g.fully_connected(x, np.ones((4, 8)), np.zeros(4), "l"), "scores"))
    (slot / "model.tflite").write_bytes(g.to_bytes())
    with pytest.raises(SelfTestFailed, match="differ from the manifest's contract"):
        self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]


def test_a_model_over_its_latency_budget_is_refused(tmp_path: Path) -> None:
    built = build_bundle(
        (MODELS / "cloud.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name="p",
            version="1.0.0",
            hardware_ids=["hw"],
            budget=ResourceBudget(max_latency_ms=1e-6),
        ),
    )
    built.write(tmp_path / "b.bundle")
    slot, manifest = staged(tmp_path, tmp_path / "b.bundle")
    with pytest.raises(SelfTestFailed, match="over the budget of 1e-06 ms"):
        self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]


def test_a_model_over_its_memory_budget_is_refused(tmp_path: Path) -> None:
    g = GraphBuilder()
    x = g.add_input("x", [1, 16])
    wide = g.fully_connected(
        x, np.random.default_rng(0).normal(size=(131_072, 16)), np.zeros(131_072), "wide"
    )
    g.mark_output(g.mean(wide, [1], "pooled"))
    built = build_bundle(
        g.to_bytes(),
        {"x": np.zeros((4, 16), np.float32)},
        BundleSpec(
            name="p", version="1.0.0", hardware_ids=["hw"], budget=ResourceBudget(max_memory_mb=1.0)
        ),
    )
    built.write(tmp_path / "b.bundle")
    slot, manifest = staged(tmp_path, tmp_path / "b.bundle")
    with pytest.raises(SelfTestFailed, match="over the budget of 1 MB"):
        self_test(default_runtime(), slot, manifest)  # type: ignore[arg-type]
