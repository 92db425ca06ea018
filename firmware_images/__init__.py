"""Sample models for predictive maintenance, and how they are made.

``generate`` draws synthetic sensor rows of a rotating machine, under the
training distribution or under :class:`FieldConditions` that describe drift,
idle machines and noise. ``GraphBuilder`` writes real ``.tflite`` files.
``python -m firmware_images.build`` trains the sample models and writes them,
with their baseline and held-out data, to :data:`MODELS_DIR`.
"""

from pathlib import Path

from firmware_images.datagen import (
    CLASSES,
    FEATURES,
    TRAINING_CONDITIONS,
    Feature,
    FieldConditions,
    generate,
)
from firmware_images.tflite_writer import GraphBuilder, build_unresolved_custom_op_model

MODELS_DIR = Path(__file__).resolve().parent / "models"

__all__ = [
    "CLASSES",
    "FEATURES",
    "MODELS_DIR",
    "TRAINING_CONDITIONS",
    "Feature",
    "FieldConditions",
    "GraphBuilder",
    "build_unresolved_custom_op_model",
    "generate",
]
