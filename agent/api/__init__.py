"""Local inference APIs: the Open Inference Protocol over HTTP, and in-process calls.

The exports load on first use, so the configuration (which checks the API's
limits with :mod:`agent.api.admission`) does not bring the HTTP server into
processes that never serve, such as the update fetcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.api.admission import ApiLimits
    from agent.api.http import LocalApi
    from agent.api.inprocess import InferenceClient

__all__ = ["ApiLimits", "InferenceClient", "LocalApi"]


def __getattr__(name: str) -> Any:
    if name == "ApiLimits":
        from agent.api.admission import ApiLimits

        return ApiLimits
    if name == "LocalApi":
        from agent.api.http import LocalApi

        return LocalApi
    if name == "InferenceClient":
        from agent.api.inprocess import InferenceClient

        return InferenceClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
