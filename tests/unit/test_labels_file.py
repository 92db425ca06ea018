"""Labels files for ``fleetctl labels post``: what is accepted, what each mistake says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet_server.fleetctl import CommandError, read_labels_file


def test_csv_rows_group_by_window_with_counts_defaulting_to_one(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "window_id,actual,predicted,count\n"
        "w1,normal,normal,3\n"
        "w2,imbalance,normal,\n"
        "w1,overheating,normal,1\n"
    )
    assert read_labels_file(path) == [
        {
            "window_id": "w1",
            "labels": [
                {"actual": "normal", "predicted": "normal", "count": 3},
                {"actual": "overheating", "predicted": "normal", "count": 1},
            ],
        },
        {"window_id": "w2", "labels": [{"actual": "imbalance", "predicted": "normal", "count": 1}]},
    ]


def test_json_is_the_api_body_or_its_list(tmp_path: Path) -> None:
    windows = [{"window_id": "w1", "classes": ["a", "b"], "counts": [[1, 0], [0, 1]]}]
    body, bare = tmp_path / "body.json", tmp_path / "list.json"
    body.write_text(json.dumps({"windows": windows}))
    bare.write_text(json.dumps(windows))
    assert read_labels_file(body) == read_labels_file(bare) == windows


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("labels.csv", "window,label\nx,y\n", "window_id,actual,predicted"),
        ("labels.csv", "window_id,actual,predicted,count\nw1,a,b,two\n", ":2: count 'two'"),
        ("labels.json", "{not json", "is not JSON"),
        ("labels.json", '{"windows": 3}', 'must hold {"windows": [...]}'),
        ("labels.txt", "w1,a,b\n", "give labels as .csv"),
    ],
)
def test_a_file_that_does_not_fit_is_refused_saying_why(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CommandError) as caught:
        read_labels_file(path)
    assert message in str(caught.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        read_labels_file(tmp_path / "absent.csv")
