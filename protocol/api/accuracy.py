"""Accuracy over time: CBPE's estimate and the labelled accuracy, per model version and period."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from protocol.api.base import ResponseBody
from protocol.api.drift import DriftQuery

MAX_BUCKETS = 200


class AccuracyHistoryQuery(DriftQuery):
    """Whose windows (one scope, as for drift), the range, and how it is cut into periods.

    The periods are ``step_s`` long and end at ``until``: period ``k`` holds the
    windows that ended in ``(until - (k + 1) step, until - k step]``. Without
    ``step_s`` the range from the first window found to ``until`` is cut into
    ``buckets`` periods of whole seconds.
    """

    step_s: float | None = Field(default=None, ge=1.0, le=86400.0 * 366)
    buckets: int = Field(default=24, ge=1, le=MAX_BUCKETS)


class AccuracyPoint(ResponseBody):
    """One period's windows of one model version: CBPE's estimate, and what labels measured.

    ``estimated``, ``low`` and ``high`` are null when the windows carry no
    scores or the release no calibration; ``labelled`` is null when no labels
    arrived for them.
    """

    start: datetime
    end: datetime
    windows: int
    n: int = Field(description="predictions the estimate covers")
    estimated: float | None
    low: float | None
    high: float | None
    labelled_windows: int = 0
    labelled_rows: int = 0
    labelled: float | None = Field(
        default=None, description="share of the labelled predictions that were right"
    )
    labelled_estimated: float | None = Field(
        default=None, description="CBPE's estimate over the labelled windows alone"
    )


class AccuracySeries(ResponseBody):
    """One model version's periods, oldest first (periods without windows are left out).

    ``problem`` says why there is no estimate (the release is unknown or has
    no calibration); labelled accuracy is still given where labels arrived.
    """

    model: str
    version: str
    reference: float | None = Field(description="accuracy on the bundle's calibration data")
    threshold: float | None = Field(description="an accuracy alert opens below this")
    confidence: float | None = None
    points: list[AccuracyPoint]
    unreadable: int = Field(default=0, description="windows whose summary could not be read")
    problem: str | None = None


class AccuracyHistory(ResponseBody):
    """Accuracy over time for one scope: a series per model version."""

    scope: str
    scope_value: str
    since: datetime
    until: datetime
    step_s: float
    series: list[AccuracySeries]
