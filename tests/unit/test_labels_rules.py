"""The labels' rules over plain data (no database): counts, duplicates, unknown windows."""

from __future__ import annotations

import pytest

from fleet_server.errors import NotFound, Unprocessable
from fleet_server.labels.rules import (
    LabelsError,
    confusion_counts,
    distinct_windows,
    labelled,
    missing_windows,
)
from protocol.api.labels import LabelCount, WindowLabelsBody

CLASSES = ["cat", "dog"]


def pairs(window_id: str, *labels: tuple[str, str, int]) -> WindowLabelsBody:
    return WindowLabelsBody(
        window_id=window_id,
        labels=[LabelCount(actual=a, predicted=p, count=n) for a, p, n in labels],
    )


def test_pairs_become_counts_in_the_models_class_order() -> None:
    body = pairs("w1", ("dog", "cat", 2), ("cat", "cat", 3), ("dog", "cat", 1))
    assert confusion_counts(body, CLASSES) == [[3, 0], [3, 0]]


def test_counts_for_other_classes_are_refused() -> None:
    body = WindowLabelsBody(window_id="w1", classes=["dog", "cat"], counts=[[1, 0], [0, 1]])
    with pytest.raises(LabelsError, match="the window's model has") as refused:
        confusion_counts(body, CLASSES)
    assert isinstance(refused.value, Unprocessable)


def test_a_class_the_model_lacks_is_refused_by_name() -> None:
    with pytest.raises(LabelsError, match="'bird' is not a class of its model"):
        confusion_counts(pairs("w1", ("bird", "cat", 1)), CLASSES)


def test_a_window_labelled_twice_in_one_request_is_refused() -> None:
    assert distinct_windows([pairs("w1"), pairs("w2")]) == ["w1", "w2"]
    with pytest.raises(LabelsError, match="a window appears twice in one request"):
        distinct_windows([pairs("w1"), pairs("w1")])


def test_unknown_windows_are_refused_naming_the_first() -> None:
    missing_windows(["w1", "w2"], {"w1", "w2", "w3"})
    with pytest.raises(LabelsError, match=r"^no window w2 \(and 1 more\)$") as refused:
        missing_windows(["w1", "w2", "w4"], {"w1"})
    assert isinstance(refused.value, NotFound)


def test_an_unreadable_stored_window_is_refused() -> None:
    with pytest.raises(LabelsError, match="window w1 cannot be read"):
        labelled(pairs("w1", ("cat", "cat", 1)), b"not a window")
