"""One-dimensional k-means for weight sharing, against a plain Lloyd iteration."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.passes.kmeans import kmeans_1d, kmeans_slices

RNG = np.random.default_rng(0)


def lloyd(values: np.ndarray, levels: int, importance: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Textbook weighted Lloyd from the same linear initialisation, assigning every value at every step."""
    centroids = np.linspace(values.min(), values.max(), levels)
    for _ in range(iterations):
        assigned = np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1)
        mass = np.bincount(assigned, importance, levels)
        sums = np.bincount(assigned, importance * values, levels)
        centroids = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centroids)
    return centroids


@pytest.mark.parametrize("bits", [1, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_same_centroids_as_plain_lloyd(bits, weighted):
    values = np.concatenate([RNG.normal(0, 0.05, 3000), RNG.normal(0, 0.5, 300)])  # a dense core, long tails
    importance = RNG.uniform(0.1, 2.0, values.size) if weighted else np.ones(values.size)
    centroids, indices = kmeans_1d(values, 2 ** bits, importance if weighted else None)
    np.testing.assert_allclose(centroids, lloyd(values, 2 ** bits, importance), rtol=1e-9, atol=1e-12)
    nearest = np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1)
    np.testing.assert_array_equal(centroids[indices], centroids[nearest])  # each value at its nearest centroid


def test_few_distinct_values_are_kept_exactly():
    values = RNG.choice(np.array([-0.5, 0.0, 0.25, 3.0]), size=(16, 16))
    centroids, indices = kmeans_1d(values, 8)
    np.testing.assert_array_equal(centroids[indices].reshape(values.shape), values)
    assert centroids.size == 4


def test_importance_pulls_centroids_towards_important_weights():
    values = np.linspace(-1, 1, 201)
    importance = np.where(values > 0.9, 1000.0, 1.0)
    plain, _ = kmeans_1d(values, 4)
    weighted, _ = kmeans_1d(values, 4, importance)
    top = values[values > 0.9]
    assert np.min(np.abs(weighted[:, None] - top[None, :]), axis=0).mean() < \
        np.min(np.abs(plain[:, None] - top[None, :]), axis=0).mean() / 3


def test_deterministic_and_bad_arguments():
    values = RNG.normal(size=1000)
    first, second = kmeans_1d(values, 16), kmeans_1d(values, 16)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    with pytest.raises(ValueError):
        kmeans_1d(values, 0)
    with pytest.raises(ValueError):
        kmeans_1d(values, 4, -np.ones(1000))


def test_slices_clustered_together_match_each_slice_alone():
    """Per-channel codebooks cluster hundreds of slices in one batch: the result is each slice's own k-means,
    whatever the slices' sizes and ranges (empty, constant, few values, wide)."""
    slices = [RNG.normal(0, scale, size) for scale, size in ((0.01, 300), (5.0, 40), (1.0, 1), (0.3, 1000))]
    slices += [np.zeros(0), np.full(7, 2.5), RNG.choice(np.array([-1.0, 0.5, 3.0]), 50)]
    importances = [RNG.uniform(0.1, 2.0, s.size) for s in slices]
    together = kmeans_slices(slices, 8, importances)
    for values, importance, (centroids, indices) in zip(slices, importances, together):
        if np.unique(values).size <= 8:
            np.testing.assert_array_equal(centroids[indices], values)
            continue
        np.testing.assert_allclose(centroids, lloyd(values, 8, importance), rtol=1e-9, atol=1e-12)
        nearest = np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1)
        np.testing.assert_array_equal(centroids[indices], centroids[nearest])


def test_equal_slices_sorted_row_by_row_match_each_slice_alone():
    slices = list(RNG.normal(0, 1, (6, 200)) * np.array([[0.01], [0.1], [1], [10], [100], [1000]]))
    for values, (centroids, _) in zip(slices, kmeans_slices(slices, 16)):
        np.testing.assert_allclose(centroids, lloyd(values, 16, np.ones(values.size)), rtol=1e-9, atol=1e-12)
