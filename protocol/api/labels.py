"""Labels: the true classes of a window's rows, for accuracy."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from protocol.api.base import RequestBody, ResponseBody

WindowId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", max_length=128)]
ClassName = Annotated[str, Field(min_length=1, max_length=128)]
MAX_LABELLED_WINDOWS = 1000
_MAX_LABEL_COUNT = 2**53


class LabelCount(RequestBody):
    """Predictions of class ``predicted`` whose true class turned out to be ``actual``."""

    actual: ClassName
    predicted: ClassName
    count: int = Field(default=1, ge=0, le=_MAX_LABEL_COUNT)


class WindowLabelsBody(RequestBody):
    """The labels of one window's predictions: confusion counts, or a list of (actual, predicted).

    ``counts[actual][predicted]`` in the order of ``classes``, which must be
    the window's model classes, in its order (a guard against a shuffled
    matrix); or ``labels``, counts per (actual, predicted) class name.
    """

    window_id: WindowId
    classes: list[ClassName] | None = Field(default=None, max_length=1024)
    counts: list[list[Annotated[int, Field(ge=0, le=_MAX_LABEL_COUNT)]]] | None = Field(
        default=None, max_length=1024
    )
    labels: list[LabelCount] | None = Field(default=None, max_length=100_000)

    @model_validator(mode="after")
    def _one_form(self) -> WindowLabelsBody:
        if (self.counts is None) == (self.labels is None):
            raise ValueError("give either counts (with classes) or labels")
        if self.counts is not None:
            if self.classes is None:
                raise ValueError("counts need classes, in the matrix's order")
            width = len(self.classes)
            if len(self.counts) != width or any(len(row) != width for row in self.counts):
                raise ValueError(f"counts must be a {width} x {width} matrix, one row per class")
        return self


class LabelsRequest(RequestBody):
    """Labels that arrived after the fact, for windows the server holds."""

    windows: list[WindowLabelsBody] = Field(min_length=1, max_length=MAX_LABELLED_WINDOWS)


class LabelsResult(ResponseBody):
    stored: int = Field(description="windows that had no labels before")
    replaced: int = Field(description="windows whose earlier labels these replace")
    rows: int = Field(description="labelled predictions in this request")
    correct: int = Field(description="of those, predictions that were right")
