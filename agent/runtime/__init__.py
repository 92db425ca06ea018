"""Model runtimes: one small interface, TFLite (tflite-runtime or LiteRT) behind it."""

from agent.runtime.base import LoadedModel, ModelLoadError, ModelRunError, Runtime
from agent.runtime.tflite import TFLiteRuntime, default_runtime

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelRunError",
    "Runtime",
    "TFLiteRuntime",
    "default_runtime",
]
