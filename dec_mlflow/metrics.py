"""Clustering quality against reference labels: unsupervised accuracy, NMI and ARI (paper eq. 10)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts ``c[i, j]`` of samples in predicted cluster ``i`` with true label ``j``.

    Both label arrays are re-coded to 0..n-1 first, so any integer labels work.

    Returns
    -------
    ndarray of shape (n_predicted_clusters, n_true_classes), int64
    """
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    c = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(c, (p, t), 1)
    return c


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unsupervised accuracy: max over one-to-one cluster-to-class maps m of mean(y_true == m(y_pred)).

    The best map comes from the Hungarian algorithm on the contingency table (paper eq. 10), so the
    score does not change when cluster ids are permuted.

    Parameters
    ----------
    y_true, y_pred : ndarray of shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length; got {y_true.shape} and {y_pred.shape}")
    c = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(-c)
    return float(c[rows, cols].sum() / y_true.size)


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``{"acc": ..., "nmi": ..., "ari": ...}`` for one labelling."""
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
    }
