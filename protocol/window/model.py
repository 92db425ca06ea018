"""Window summaries: what a device uploads about the requests of one window.

A window closes by time or by count. It carries a unique id, the device, the
model version that served and the baseline whose bins it counted in, and for
those requests: a :class:`~protocol.summary.FeatureSummary` per input feature
(in manifest order), the top-score histogram per predicted class, latency as a
base-2 exponential histogram, requests served per fallback stage, and errors.

A device may summarise only a sample of its requests, to bound what
summarising costs next to a cheap model. ``requests``, ``errors``, ``served``
and the latency histogram still count every request; the features and the
top-score histogram then hold the ``summarised_requests``, chosen at random
independently of their values, so their shares are an unbiased sample and a
drift test on their counts is valid with their ``n``.

Everything in a window is additive, so windows merge (:func:`merge_windows`)
into a :class:`WindowAggregate` for a device, a cohort, a model version or a
time range; the caller picks which windows go in, the merge only insists that
they counted in the same baseline bins.

On the wire a window is the compact binary record of :mod:`protocol.window.codec`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.histogram import DEFAULT_MAX_BUCKETS, ExponentialHistogram, merge_histograms
from protocol.hybrid import HybridSummary
from protocol.inference import StageName
from protocol.summary import FeatureSummary, ScoreHistogram, merge

WINDOW_SCHEMA_VERSION: Final = 1

_Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
_Name = Annotated[str, Field(min_length=1, max_length=128)]


class ShadowSummary(BaseModel):
    """What a shadow model did on the requests of a window it ran on, beside the active model.

    A device in a rollout's shadow stage holds the new release beside its
    active model and runs it on a share of requests without serving its
    answers. ``requests`` counts the requests the shadow ran on; of them
    ``agreements`` got the same answer as the one served (the same top class,
    or for other outputs values within the manifest's tolerance), and
    ``errors`` failed (the runtime raised, or an output was not finite).
    ``latency_ms`` is the shadow's own inference time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle_id: _Id
    model_version: _Name
    requests: int = Field(ge=0)
    agreements: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    latency_ms: ExponentialHistogram = Field(default_factory=ExponentialHistogram)

    @model_validator(mode="after")
    def _is_consistent(self) -> ShadowSummary:
        if self.agreements + self.errors > self.requests:
            raise ValueError(
                f"{self.agreements} agreements and {self.errors} errors of only "
                f"{self.requests} shadow requests"
            )
        return self


class WindowSummary(BaseModel):
    """One device's summary of the requests of one window (schema version 1).

    ``start`` and ``end`` are the device clock in seconds since the epoch.
    ``requests`` counts inference requests; a feature's ``n`` counts rows, and a
    request may carry several. ``served`` counts requests per fallback stage.
    ``unsummarised_requests`` of the requests are counted (requests, errors,
    served, latency) but their rows and scores are not in the features and the
    score histogram: 0 for a window that summarised every request.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = WINDOW_SCHEMA_VERSION
    window_id: _Id
    device_id: _Id
    model_name: _Name
    model_version: _Name
    baseline_id: _Id
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    requests: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    unsummarised_requests: int = Field(default=0, ge=0)
    served: dict[StageName, int] = Field(default_factory=dict)
    features: list[FeatureSummary]
    scores: ScoreHistogram | None = None
    latency_ms: ExponentialHistogram = Field(default_factory=ExponentialHistogram)
    cohort_id: _Id | None = None
    plan_id: _Id | None = None
    shadow: ShadowSummary | None = None
    hybrid: HybridSummary | None = None

    @field_validator("served")
    @classmethod
    def _drop_zero_stages(cls, value: dict[StageName, int]) -> dict[StageName, int]:
        return {k: v for k, v in value.items() if v != 0}

    @model_validator(mode="after")
    def _is_consistent(self) -> WindowSummary:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise ValueError("a window needs finite times with start <= end")
        _check_parts(
            self.requests, self.unsummarised_requests, self.served, self.features, self.scores
        )
        return self

    @property
    def summarised_requests(self) -> int:
        """The requests whose rows and scores the features and score histogram hold."""
        return self.requests - self.unsummarised_requests


class WindowAggregate(BaseModel):
    """The sum of windows that counted in the same baseline bins.

    ``model_versions`` lists the distinct ``name@version`` that served; the
    caller chooses the windows (a device, a cohort, a version, a time range).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    baseline_id: _Id
    windows: int = Field(ge=1)
    model_versions: list[str]
    start: float
    end: float
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)
    unsummarised_requests: int = Field(default=0, ge=0)
    served: dict[StageName, int]
    features: list[FeatureSummary]
    scores: ScoreHistogram | None = None
    latency_ms: ExponentialHistogram

    @model_validator(mode="after")
    def _is_consistent(self) -> WindowAggregate:
        _check_parts(
            self.requests, self.unsummarised_requests, self.served, self.features, self.scores
        )
        return self

    @property
    def summarised_requests(self) -> int:
        """The requests whose rows and scores the features and score histogram hold."""
        return self.requests - self.unsummarised_requests


def _check_parts(
    requests: int,
    unsummarised: int,
    served: dict[StageName, int],
    features: Sequence[FeatureSummary],
    scores: ScoreHistogram | None,
) -> None:
    if unsummarised > requests:
        raise ValueError(f"{unsummarised} unsummarised requests of only {requests}")
    if any(v < 0 for v in served.values()):
        raise ValueError("served counts must be >= 0")
    for i, f in enumerate(features):
        if f.counts and min(f.counts) < 0:
            raise ValueError(f"feature {i}: bin counts must be >= 0")
        if sum(f.counts) != f.n:
            raise ValueError(f"feature {i}: bin counts sum to {sum(f.counts)}, not n = {f.n}")
        if (f.below_baseline or 0) + (f.above_baseline or 0) > f.n:
            raise ValueError(
                f"feature {i}: {f.below_baseline} values below and {f.above_baseline} above "
                f"the baseline's range, of only n = {f.n}"
            )
    if scores is not None:
        if len(scores.counts) != len(scores.classes):
            raise ValueError("scores need one row of counts per class")
        if any(c < 0 for row in scores.counts for c in row):
            raise ValueError("score counts must be >= 0")
        if len({len(row) for row in scores.counts}) > 1:
            raise ValueError("score rows differ in length")


class WindowMergeError(ValueError):
    """Windows that cannot be summed: different baselines, features or classes."""


def merge_scores(a: ScoreHistogram | None, b: ScoreHistogram | None) -> ScoreHistogram | None:
    """The sum of two top-score histograms over the same classes."""
    if a is None or b is None:
        if a is not b:
            raise WindowMergeError("one window has a score histogram and the other has none")
        return None
    if a.classes != b.classes or [len(r) for r in a.counts] != [len(r) for r in b.counts]:
        raise WindowMergeError("score histograms over different classes or bins")
    return ScoreHistogram(
        classes=list(a.classes),
        counts=[
            [x + y for x, y in zip(ra, rb, strict=True)]
            for ra, rb in zip(a.counts, b.counts, strict=True)
        ],
    )


def merge_windows(
    windows: Iterable[WindowSummary | WindowAggregate],
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> WindowAggregate:
    """The sum of ``windows`` (summaries or aggregates), all over one baseline.

    Raises :class:`WindowMergeError` if there are none, or if they counted in
    different baselines, or their features or classes differ.
    """
    items = list(windows)
    if not items:
        raise WindowMergeError("no windows to merge")
    first = items[0]
    baseline_id = first.baseline_id
    features = list(first.features)
    scores = first.scores
    latency = first.latency_ms
    served: dict[StageName, int] = dict(first.served)
    versions = set(_versions(first))
    for w in items[1:]:
        if w.baseline_id != baseline_id:
            raise WindowMergeError(
                f"windows over baselines {baseline_id} and {w.baseline_id} cannot be merged"
            )
        if len(w.features) != len(features):
            raise WindowMergeError(
                f"windows with {len(features)} and {len(w.features)} features cannot be merged"
            )
        try:
            features = [merge(a, b) for a, b in zip(features, w.features, strict=True)]
        except ValueError as exc:
            raise WindowMergeError(str(exc)) from None
        scores = merge_scores(scores, w.scores)
        latency = merge_histograms(latency, w.latency_ms, max_buckets)
        for stage, count in w.served.items():
            served[stage] = served.get(stage, 0) + count
        versions.update(_versions(w))
    return WindowAggregate(
        baseline_id=baseline_id,
        windows=sum(w.windows if isinstance(w, WindowAggregate) else 1 for w in items),
        model_versions=sorted(versions),
        start=min(w.start for w in items),
        end=max(w.end for w in items),
        requests=sum(w.requests for w in items),
        errors=sum(w.errors for w in items),
        unsummarised_requests=sum(w.unsummarised_requests for w in items),
        served=served,
        features=features,
        scores=scores,
        latency_ms=latency,
    )


def _versions(w: WindowSummary | WindowAggregate) -> list[str]:
    if isinstance(w, WindowAggregate):
        return list(w.model_versions)
    return [f"{w.model_name}@{w.model_version}"]
