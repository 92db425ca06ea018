"""Local inference APIs: the Open Inference Protocol over HTTP, and in-process calls."""

from agent.api.http import LocalApi
from agent.api.inprocess import InferenceClient

__all__ = ["InferenceClient", "LocalApi"]
