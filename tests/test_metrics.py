"""Unsupervised accuracy, NMI and ARI."""

import numpy as np
import pytest

from dec_mlflow.metrics import cluster_accuracy, clustering_scores, contingency


def test_accuracy_invariant_under_label_permutation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.8, y, rng.integers(0, 5, 300))
    perm = np.array([3, 0, 4, 1, 2])
    assert cluster_accuracy(y, perm[pred]) == pytest.approx(cluster_accuracy(y, pred))
    assert cluster_accuracy(y, perm[y]) == 1.0


def test_accuracy_hand_computed_with_hungarian_matching():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([1, 1, 0, 0, 0, 2])
    # best map: 1->0 (2 right), 0->1 (2 right), 2->2 (1 right) = 5/6
    assert cluster_accuracy(y, pred) == pytest.approx(5 / 6)


def test_accuracy_with_more_clusters_than_classes():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2])
    assert cluster_accuracy(y, pred) == pytest.approx(3 / 4)


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1-D of equal length"):
        cluster_accuracy(np.zeros(3), np.zeros(4))


def test_contingency_counts():
    c = contingency(np.array([5, 5, 7]), np.array([1, 0, 0]))
    assert c.tolist() == [[1, 1], [1, 0]]


def test_clustering_scores_perfect_and_random():
    y = np.repeat(np.arange(4), 50)
    perfect = clustering_scores(y, (y + 1) % 4)
    assert perfect == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})
    rand = clustering_scores(y, np.random.default_rng(0).integers(0, 4, 200))
    assert rand["ari"] < 0.1 and rand["nmi"] < 0.1 and rand["acc"] < 0.5
