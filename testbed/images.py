"""The sample models and bundles built from them, for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet_server.release.bundle_builder import BundleSpec, build_bundle, load_feature_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "firmware_images" / "models"
HARDWARE = "rpi4-arm64"


def make_bundle(
    tmp: Path, model: str, version: str, hardware: tuple[str, ...] = (HARDWARE,), **spec: Any
) -> Path:
    """Build a bundle of a sample model into ``tmp`` and return its path.

    The bundle carries the model's calibration temperature from ``models.json``
    unless ``spec`` names one.
    """
    features, classes = load_feature_file(MODELS / "features.json")
    spec.setdefault("temperature", temperature(model))
    built = build_bundle(
        (MODELS / f"{model}.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name="pump-health",
            version=version,
            hardware_ids=hardware,
            feature_specs=features,
            classes=classes,
            **spec,
        ),
        calibration=MODELS / "heldout.npz",
    )
    path = tmp / f"pump-health-{version}.bundle"
    built.write(path)
    return path


def temperature(model: str) -> float:
    """The calibration temperature the build fitted for sample model ``model`` (e.g. ``"v2"``)."""
    doc = json.loads((MODELS / "models.json").read_text())
    return float(doc["models"][model]["temperature"])
