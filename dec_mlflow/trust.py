"""Label-free scores of a clustering: how far to trust a run when no labels exist.

Arrays in, floats out; no torch, no I/O. Each score is "higher is better" and lies in a fixed range,
so runs on the same data compare.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score, silhouette_score

SILHOUETTE_SAMPLE = 5000  # points the silhouette is computed on: O(m^2) distances, about a second


def size_balance(labels: np.ndarray, n_clusters: int) -> float:
    """Entropy of the cluster sizes over log(n_clusters): 1 for equal sizes, 0 for one cluster holding all.

    A merged pair of classes shows as one cluster twice the usual size and another split in two.
    """
    frac = np.bincount(labels, minlength=n_clusters) / len(labels)
    frac = frac[frac > 0]
    if n_clusters == 1:
        return 1.0  # everything in the one cluster there is: as balanced as it can be
    return float(-(frac * np.log(frac)).sum() / np.log(n_clusters))


def silhouette(z: np.ndarray, labels: np.ndarray, *, seed: int, sample_size: int = SILHOUETTE_SAMPLE) -> float:
    """Mean silhouette of ``labels`` in the embedding ``z`` (n_samples, d), on a seeded subsample.

    In [-1, 1]; 0 when there is a single cluster (silhouette is undefined there).
    """
    if len(np.unique(labels)) < 2:
        return 0.0
    m = min(sample_size, len(labels))
    idx = np.random.default_rng(seed).choice(len(labels), size=m, replace=False)
    if len(np.unique(labels[idx])) < 2:
        return 0.0
    return float(silhouette_score(z[idx], labels[idx]))


def agreement(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Normalised mutual information of two labellings of the same points, in [0, 1]."""
    return float(normalized_mutual_info_score(labels_a, labels_b))


def confidence(q: np.ndarray) -> float:
    """Mean over points of the largest soft assignment max_j q_ij, in [1/k, 1]."""
    return float(np.asarray(q).max(1).mean())
