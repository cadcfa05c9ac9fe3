"""``StreamingLabelStats``: a mergeable summary of one label's scores, for runs too big to hold
in one process. The report fills one per label and prediction file and merges them on the
driver; its image counts, mean scores and score histograms come from the merged summaries.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from medray.workers.errors import InputError
from medray.workers.metrics import (
    as_labels,
    as_unit_scores,
    auroc_from_cum,
    bin_index,
    check_n_bins,
)


class StreamingLabelStats:
    """Mergeable summary of a run's scores, for runs too big to hold in one process.

    Each shard's worker fills one, the driver merges them; the state is three fixed-width
    histograms on [0, 1] (positives, negatives, rows without ground truth) and a score sum,
    so memory is O(n_bins) whatever the run size and merging is exact and order-free.
    """

    def __init__(self, n_bins: int = 1000) -> None:
        self.n_bins = check_n_bins(n_bins)
        self._pos = np.zeros(self.n_bins, dtype=np.int64)
        self._neg = np.zeros(self.n_bins, dtype=np.int64)
        self._unlabelled = np.zeros(self.n_bins, dtype=np.int64)
        self._sum_score = 0.0

    def update(self, y_true: npt.ArrayLike | None, y_score: npt.ArrayLike) -> None:
        """Add a batch; ``y_true=None`` for images without ground truth (nightly scoring)."""
        s = as_unit_scores(y_score)
        idx = bin_index(s, self.n_bins)
        if y_true is None:
            self._unlabelled += np.bincount(idx, minlength=self.n_bins)
        else:
            y = as_labels(y_true)
            if y.shape[0] != s.shape[0]:
                raise InputError(f"y_true has {y.shape[0]} rows but y_score has {s.shape[0]}")
            self._pos += np.bincount(idx[y], minlength=self.n_bins)
            self._neg += np.bincount(idx[~y], minlength=self.n_bins)
        self._sum_score += float(s.sum())

    def merge(self, other: StreamingLabelStats) -> StreamingLabelStats:
        """A new summary of both; neither input changes, so a tree reduction is safe."""
        if not isinstance(other, StreamingLabelStats) or other.n_bins != self.n_bins:
            raise InputError(
                f"can only merge StreamingLabelStats with the same n_bins ({self.n_bins})"
            )
        out = StreamingLabelStats(self.n_bins)
        out._pos = self._pos + other._pos
        out._neg = self._neg + other._neg
        out._unlabelled = self._unlabelled + other._unlabelled
        out._sum_score = self._sum_score + other._sum_score
        return out

    @property
    def count(self) -> int:
        """All rows seen, labelled or not."""
        return int(self._pos.sum() + self._neg.sum() + self._unlabelled.sum())

    @property
    def labelled(self) -> int:
        return int(self._pos.sum() + self._neg.sum())

    @property
    def positives(self) -> int:
        return int(self._pos.sum())

    @property
    def mean_score(self) -> float:
        n = self.count
        return self._sum_score / n if n else math.nan

    def _all(self) -> np.ndarray:
        return self._pos + self._neg + self._unlabelled

    def histogram(self, n_bins: int = 20) -> dict[str, list]:
        """{"edges", "counts"} on ``n_bins`` equal-width bins of [0, 1] (1.0 in the last), every
        row counted; ``n_bins`` must divide the stored bin count."""
        n_bins = check_n_bins(n_bins)
        if self.n_bins % n_bins:
            raise InputError(f"n_bins must divide {self.n_bins}, got {n_bins}")
        counts = self._all().reshape(n_bins, -1).sum(axis=1)
        return {"edges": (np.arange(n_bins + 1) / n_bins).tolist(), "counts": counts.tolist()}

    def _cum(self) -> tuple[np.ndarray, np.ndarray]:
        # Highest bin first, as the ranking core expects.
        return (
            np.cumsum(self._pos[::-1]).astype(np.float64)[None, :],
            np.cumsum(self._neg[::-1]).astype(np.float64)[None, :],
        )

    def auroc_approx(self) -> float:
        """AUROC with scores in the same bin treated as tied.

        Only positive/negative pairs sharing a bin can be misordered, so the error is at most
        ``auroc_error_bound()``; at 1000 bins it is typically below 1e-4. ``nan`` unless both
        classes were seen.
        """
        return float(auroc_from_cum(*self._cum())[0])

    def auroc_error_bound(self) -> float:
        """Largest possible |auroc_approx - exact AUROC| given the histograms."""
        p, n = self._pos.sum(), self._neg.sum()
        if p == 0 or n == 0:
            return math.nan
        return float(0.5 * np.dot(self._pos, self._neg.astype(np.float64)) / (p * n))
