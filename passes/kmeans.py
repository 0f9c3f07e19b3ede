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
    return kmeans_slices([values], levels, None if importance is None else [importance], iterations)[0]


def kmeans_slices(slices: list[np.ndarray], levels: int, importances: list[np.ndarray] | None = None,
                  iterations: int = MAX_ITERATIONS) -> list[tuple[np.ndarray, np.ndarray]]:
    """kmeans_1d of each slice, the slices' Lloyd iterations done together (one codebook per output channel
    means hundreds of small problems).

    All slices are sorted at once, and slice r's values are shifted to start where slice r−1's end, plus one:
    one binary search over all of them then finds every slice's interval ends.
    """
    if levels < 1:
        raise ValueError("levels must be at least 1")
    if not slices:
        return []
    flats = [np.asarray(v, dtype=np.float64).reshape(-1) for v in slices]
    sizes = np.array([f.size for f in flats], dtype=np.int64)
    count = len(flats)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    flat = np.concatenate(flats) if count else np.zeros(0)
    owner = np.repeat(np.arange(count), sizes)
    if importances is None:
        weight_flat = np.ones_like(flat)
    else:
        weight_flat = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in importances])
        if weight_flat.size != flat.size or np.any(weight_flat < 0):
            raise ValueError("importance must be one non-negative value per weight")
    filled = sizes > 0
    low, high = np.zeros(count), np.zeros(count)
    if flat.size:
        low[filled] = np.minimum.reduceat(flat, starts[:-1][filled])
        high[filled] = np.maximum.reduceat(flat, starts[:-1][filled])
    shift = np.concatenate([[0.0], np.cumsum(high - low + 1)])[:-1] - low  # value + shift: one sorted line
    keys = flat + shift[owner]
    order = np.argsort(keys, kind="stable")  # the slices stay in place: slice r still fills starts[r]…
    keys, ordered, weight = keys[order], flat[order], weight_flat[order]
    new_value = np.ones(flat.size, dtype=bool)
    new_value[1:] = (ordered[1:] != ordered[:-1]) | (owner[1:] != owner[:-1])
    distinct = np.bincount(owner[new_value], minlength=count)
    results: list = [None] * count
    for r in np.nonzero(distinct <= levels)[0]:  # nothing to approximate
        centroids = np.unique(flats[r])
        results[r] = (centroids, np.searchsorted(centroids, flats[r]))
    rows = np.nonzero(distinct > levels)[0]
    if rows.size:
        weight_sums = np.concatenate([[0.0], np.cumsum(weight)])
        moment_sums = np.concatenate([[0.0], np.cumsum(weight * ordered)])
        first, last = starts[rows][:, None], starts[rows + 1][:, None]
        centroids = np.linspace(low[rows], high[rows], levels, axis=1)
        for _ in range(iterations):
            middles = (centroids[:, :-1] + centroids[:, 1:]) / 2
            ends = np.clip(np.searchsorted(keys, middles + shift[rows][:, None], side="right"), first, last)
            ends = np.concatenate([ends, last], axis=1)
            begins = np.concatenate([first, ends[:, :-1]], axis=1)
            mass = weight_sums[ends] - weight_sums[begins]
            updated = np.where(mass > 0, (moment_sums[ends] - moment_sums[begins]) / np.maximum(mass, 1e-300),
                               centroids)
            if np.array_equal(updated, centroids):
                break
            centroids = updated
        # the same rule as the iterations: a value on a middle goes to the lower centroid
        middles = ((centroids[:, :-1] + centroids[:, 1:]) / 2 + shift[rows][:, None]).reshape(-1)
        for j, r in enumerate(rows):
            found = np.searchsorted(middles, flats[r] + shift[r], side="left") - j * (levels - 1)
            results[r] = (centroids[j], found)
    return results
