"""The summary math: merged summaries equal the summary of the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.summary import (
    FeatureSummary,
    bin_counts,
    edges_id,
    merge,
    quantile_edges,
    score_histogram,
    summarize,
)


def test_merged_summaries_equal_the_summary_of_the_concatenation() -> None:
    rng = np.random.default_rng(7)
    data = rng.normal(3.0, 2.0, size=(5000, 3))
    data[rng.random(data.shape) < 0.01] = np.nan
    edges = [quantile_edges(data[:, j]) for j in range(3)]
    ranges = [(-1.0, 7.0)] * 3
    whole = summarize(data, edges, ranges)
    parts = [summarize(chunk, edges, ranges) for chunk in np.array_split(data, 7)]
    for j in range(3):
        merged = parts[0][j]
        for p in parts[1:]:
            merged = merge(merged, p[j])
        assert merged.n == whole[j].n
        assert merged.nan == whole[j].nan
        assert merged.out_of_range == whole[j].out_of_range
        assert merged.counts == whole[j].counts
        assert merged.mean == pytest.approx(whole[j].mean, rel=1e-12)
        assert merged.m2 == pytest.approx(whole[j].m2, rel=1e-10)
        assert (merged.min, merged.max) == (whole[j].min, whole[j].max)


def test_moments_match_numpy() -> None:
    x = np.array([[1.0], [2.0], [4.0], [np.inf], [np.nan]])
    [s] = summarize(x, [[2.0]])
    assert (s.n, s.nan) == (3, 2)
    assert s.mean == pytest.approx(7 / 3)
    assert s.variance == pytest.approx(np.var([1, 2, 4], ddof=1))
    assert s.counts == [1, 2]


def test_bins_are_open_at_both_ends_and_left_closed() -> None:
    counts = bin_counts(np.array([-1e9, 0.0, 0.5, 1.0, 1e9]), [0.0, 1.0])
    assert counts.tolist() == [1, 2, 2]


def test_quantile_edges_give_about_equal_bins() -> None:
    x = np.random.default_rng(1).normal(size=20_000)
    edges = quantile_edges(x)
    assert len(edges) == 19
    counts = bin_counts(x, edges)
    assert counts.min() > 900 and counts.max() < 1100


def test_constant_feature_gets_one_edge_not_empty_bins() -> None:
    assert quantile_edges(np.full(100, 5.0)) == [5.0]


def test_merging_empty_summaries_is_empty() -> None:
    empty = FeatureSummary(n=0, nan=0, out_of_range=0, counts=[0, 0])
    merged = merge(empty, empty)
    assert merged.n == 0 and merged.min is None


def test_merge_refuses_different_bins() -> None:
    with pytest.raises(ValueError, match="different bins"):
        merge(
            FeatureSummary(n=0, nan=0, out_of_range=0, counts=[0]),
            FeatureSummary(n=0, nan=0, out_of_range=0, counts=[0, 0]),
        )


def test_score_histogram_counts_top_score_per_predicted_class() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [np.nan, 0.5]])
    hist = score_histogram(scores, ["a", "b"])
    assert sum(map(sum, hist.counts)) == 3
    assert hist.counts[0][18] == 1 and hist.counts[0][11] == 1 and hist.counts[1][16] == 1


def test_edges_id_is_stable_and_sensitive() -> None:
    assert edges_id([[1.0, 2.0]]) == edges_id([[1, 2]])
    assert edges_id([[1.0, 2.0]]) != edges_id([[1.0, 2.5]])
