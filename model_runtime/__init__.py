"""Model runtimes: one small interface, TFLite (tflite-runtime or LiteRT) behind it.

The one adapter the agent (serving, self-test), the fleet server (bundle
builder) and the benchmarks run models through. It imports only ``protocol``.
"""

from model_runtime.base import (
    LoadedModel,
    ModelLoadError,
    ModelRunError,
    Runtime,
    RuntimeNotInstalled,
)
from model_runtime.tflite import TFLiteRuntime, default_runtime

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelRunError",
    "Runtime",
    "RuntimeNotInstalled",
    "TFLiteRuntime",
    "default_runtime",
]
