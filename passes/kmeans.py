"""One-dimensional k-means for weight sharing: sorted values and prefix sums make each Lloyd step O(k log n).

In one dimension every cluster of a k-means solution is an interval of the sorted values, bounded by the
midpoints between neighbouring centroids. So the values are sorted once; each Lloyd iteration then finds the
interval ends with a binary search per centroid and each interval's (weighted) mean from prefix sums, without
touching the n values again. Cost: one sort, O(n log n), plus iterations × O(k log n), plus one final
assignment, O(n log k).

Initialisation is linear (k centroids evenly spaced between the smallest and the largest value), as Deep
Compression found best for accuracy: it keeps centroids on the rare large weights, which matter most. The result
is deterministic. A tensor with at most k distinct values is returned exactly.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 50


def kmeans_1d(values: np.ndarray, levels: int, importance: np.ndarray | None = None,
              iterations: int = MAX_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, index of each value's centroid) for at most `levels` centroids, in float64.

    `importance` weighs each value's squared error (default: all 1); centroids are the weighted means of their
    intervals. Centroids come sorted; a centroid whose interval is empty keeps its place and takes no index.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if levels < 1:
        raise ValueError("levels must be at least 1")
    if flat.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    distinct = np.unique(ordered)
    if distinct.size <= levels:  # nothing to approximate
        return distinct, np.searchsorted(distinct, flat)
    weight = np.ones_like(ordered) if importance is None else \
        np.asarray(importance, dtype=np.float64).reshape(-1)[order]
    if np.any(weight < 0) or weight.size != ordered.size:
        raise ValueError("importance must be one non-negative value per weight")
    weight_sums = np.concatenate([[0.0], np.cumsum(weight)])
    moment_sums = np.concatenate([[0.0], np.cumsum(weight * ordered)])
    centroids = np.linspace(ordered[0], ordered[-1], levels)
    for _ in range(iterations):
        ends = np.concatenate([np.searchsorted(ordered, (centroids[:-1] + centroids[1:]) / 2, side="right"),
                               [ordered.size]])
        starts = np.concatenate([[0], ends[:-1]])
        mass = weight_sums[ends] - weight_sums[starts]
        updated = np.where(mass > 0, (moment_sums[ends] - moment_sums[starts]) / np.maximum(mass, 1e-300),
                           centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    # the same rule as the iterations: a value on a midpoint goes to the lower centroid
    indices = np.searchsorted((centroids[:-1] + centroids[1:]) / 2, flat, side="left")
    return centroids, indices
