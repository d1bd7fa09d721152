"""Label-free trust scores on small cases computed by hand."""

import numpy as np
import pytest

from dec_mlflow import trust


def test_size_balance_is_one_for_equal_clusters_and_lower_for_a_merge():
    assert trust.size_balance(np.repeat(np.arange(4), 25), 4) == pytest.approx(1.0)
    merged = np.concatenate([np.zeros(50), np.ones(25), np.full(13, 2), np.full(12, 3)]).astype(int)
    # sizes 0.5, 0.25, 0.13, 0.12: entropy 1.7668 nats over log(4)
    frac = np.array([0.5, 0.25, 0.13, 0.12])
    assert trust.size_balance(merged, 4) == pytest.approx(-(frac * np.log(frac)).sum() / np.log(4))


def test_size_balance_of_a_single_cluster_is_zero():
    assert trust.size_balance(np.zeros(10, int), 3) == pytest.approx(0.0)


def test_silhouette_near_one_for_tight_separated_clusters():
    z = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 100.0)]) + np.random.default_rng(0).normal(0, 0.01, (40, 2))
    labels = np.repeat([0, 1], 20)
    assert trust.silhouette(z, labels, seed=0) > 0.99
    assert trust.silhouette(z, labels[::-1].copy() * 0, seed=0) == 0.0  # a single cluster


def test_silhouette_of_a_wrong_split_is_low():
    z = np.random.default_rng(0).normal(size=(200, 2))
    labels = np.random.default_rng(1).integers(0, 2, 200)
    assert abs(trust.silhouette(z, labels, seed=0)) < 0.05


def test_agreement_ignores_cluster_ids():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert trust.agreement(a, (a + 1) % 3) == pytest.approx(1.0)
    assert trust.agreement(a, np.array([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_confidence_is_the_mean_largest_assignment():
    q = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert trust.confidence(q) == pytest.approx(0.75)
