"""Rates of detector scores (numpy only): the area under the ROC curve, and two detectors'
thresholds chosen together so that either flags at most a given share of in-distribution images."""

import numpy as np


def auroc(in_scores, out_scores) -> float:
    """P(out score > in score) + P(equal) / 2: the area under the ROC curve, from ranks.

    The Mann-Whitney U statistic over n_in * n_out, with tied scores given their mean rank.
    """
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError(f"auroc needs scores on both sides, got {len(a)} in-distribution and {len(b)} out")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("auroc: scores hold NaN or infinity")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank, averaged over ties
    u = mean_ranks[inverse[len(a):]].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


def joint_thresholds(first: np.ndarray, second: np.ndarray, heldout: int, rate: float) -> tuple[float, float]:
    """Thresholds of two detectors, each at the same tail share k / n of its scores, with the
    largest k for which the images flagged by either are at most `rate` of all n images and
    of the last `heldout` of them (the held-out images; the rest are training images scored
    out of fold). k = 0 gives each detector's highest score: nothing of these images is flagged."""
    n = len(first)
    best = (float(first.max()), float(second.max()))
    for k in range(1, int(rate * n) + 1):
        t1 = float(np.quantile(first, 1 - k / n, method="higher"))
        t2 = float(np.quantile(second, 1 - k / n, method="higher"))
        flagged = (first > t1) | (second > t2)
        if flagged.mean() <= rate and flagged[n - heldout:].mean() <= rate:
            best = (t1, t2)
    return best
