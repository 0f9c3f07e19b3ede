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
    means hundreds of small problems)."""
    return SortedSlices(slices, importances).kmeans(levels, iterations)


class SortedSlices:
    """Slices sorted once for k-means at any number of levels (share tries each layer at 1 … 8 bits).

    All slices are sorted at once, and slice r's values are shifted to start where slice r−1's end, plus one:
    one binary search over all of them then finds every slice's interval ends.
    """

    def __init__(self, slices: list[np.ndarray], importances: list[np.ndarray] | None = None):
        self.flats = [np.asarray(v, dtype=np.float64).reshape(-1) for v in slices]
        sizes = np.array([f.size for f in self.flats], dtype=np.int64)
        count = len(self.flats)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        flat = np.concatenate(self.flats) if count else np.zeros(0)
        self.owner = np.repeat(np.arange(count), sizes)
        if importances is None:
            weight_flat = np.ones_like(flat)
        else:
            weight_flat = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in importances]) \
                if count else np.zeros(0)
            if weight_flat.size != flat.size or np.any(weight_flat < 0):
                raise ValueError("importance must be one non-negative value per weight")
        filled = sizes > 0
        self.low, self.high = np.zeros(count), np.zeros(count)
        if flat.size:
            self.low[filled] = np.minimum.reduceat(flat, self.starts[:-1][filled])
            self.high[filled] = np.maximum.reduceat(flat, self.starts[:-1][filled])
        # value + shift: one sorted line
        self.shift = np.concatenate([[0.0], np.cumsum(self.high - self.low + 1)])[:-1] - self.low
        self.unsorted_keys = flat + self.shift[self.owner]
        order = np.argsort(self.unsorted_keys, kind="stable")  # the slices stay in place: slice r fills starts[r]…
        self.keys, ordered, weight = self.unsorted_keys[order], flat[order], weight_flat[order]
        new_value = np.ones(flat.size, dtype=bool)
        new_value[1:] = (ordered[1:] != ordered[:-1]) | (self.owner[1:] != self.owner[:-1])
        self.distinct = np.bincount(self.owner[new_value], minlength=count)
        self.weight_sums = np.concatenate([[0.0], np.cumsum(weight)])
        self.moment_sums = np.concatenate([[0.0], np.cumsum(weight * ordered)])

    def kmeans(self, levels: int, iterations: int = MAX_ITERATIONS) -> list[tuple[np.ndarray, np.ndarray]]:
        """(centroids, index of each value's centroid) per slice, as kmeans_1d."""
        if levels < 1:
            raise ValueError("levels must be at least 1")
        results: list = [None] * len(self.flats)
        for r in np.nonzero(self.distinct <= levels)[0]:  # nothing to approximate
            centroids = np.unique(self.flats[r])
            results[r] = (centroids, np.searchsorted(centroids, self.flats[r]))
        rows = np.nonzero(self.distinct > levels)[0]
        if not rows.size:
            return results
        first, last = self.starts[rows][:, None], self.starts[rows + 1][:, None]
        centroids = np.linspace(self.low[rows], self.high[rows], levels, axis=1)
        for _ in range(iterations):
            middles = (centroids[:, :-1] + centroids[:, 1:]) / 2
            ends = np.clip(np.searchsorted(self.keys, middles + self.shift[rows][:, None], side="right"), first, last)
            ends = np.concatenate([ends, last], axis=1)
            begins = np.concatenate([first, ends[:, :-1]], axis=1)
            mass = self.weight_sums[ends] - self.weight_sums[begins]
            updated = np.where(mass > 0, (self.moment_sums[ends] - self.moment_sums[begins]) /
                               np.maximum(mass, 1e-300), centroids)
            if np.array_equal(updated, centroids):
                break
            centroids = updated
        # the same rule as the iterations: a value on a middle goes to the lower centroid. The rows' middles lie
        # on the shifted line in order, so one search finds every value's centroid, less the rows before it
        middles = ((centroids[:, :-1] + centroids[:, 1:]) / 2 + self.shift[rows][:, None]).reshape(-1)
        before = np.zeros(len(self.flats), dtype=np.int64)
        before[rows] = np.arange(rows.size) * (levels - 1)
        found = np.searchsorted(middles, self.unsorted_keys, side="left") - before[self.owner]
        for j, r in enumerate(rows):
            results[r] = (centroids[j], found[self.starts[r]:self.starts[r + 1]])
        return results
