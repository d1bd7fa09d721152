"""Label-free trust scores on small cases computed by hand, and the trust score on constructed data."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import make_blobs

from dec_mlflow import trust
from dec_mlflow.initialisation import VALLEY_DEPTH, input_map, split_in_two
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.scaling import fit_scaling


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


def test_the_agreement_of_two_labellings_ignores_cluster_ids_and_counts_the_matched_share():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(a, (a + 1) % 3) == pytest.approx(1.0)
    # clusters {0,1},{2,3},{4,5} against {0,1,2},{3,4,5}: at best 2 + 2 of 6 points matched
    assert cluster_accuracy(a, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="equal length"):
        cluster_accuracy(a, a[:3])


def two_cliques(size: int = 5) -> sp.csr_matrix:
    """Two cliques of ``size`` nodes joined by one link (both directions), unit weights."""
    rows, cols = [], []
    for block in (range(size), range(size, 2 * size)):
        rows += [i for i in block for j in block if i != j]
        cols += [j for i in block for j in block if i != j]
    rows += [size - 1, size]
    cols += [size, size - 1]
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(2 * size, 2 * size))


def test_modularity_by_hand_on_two_cliques():
    g = two_cliques()  # 2 x 20 links inside, 2 between: 42 in all
    right = np.repeat([0, 1], 5)
    assert trust.modularity(right, g) == pytest.approx(40 / 42 - 2 * 0.5**2)
    assert trust.modularity(np.zeros(10, int), g) == pytest.approx(0.0)  # one cluster: no better than chance
    assert trust.modularity(right + 7, g) == pytest.approx(trust.modularity(right, g))  # ids do not matter
    cut = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])  # each clique cut in two
    assert trust.modularity(cut, g) < trust.modularity(right, g)
    with pytest.raises(ValueError, match="n x n"):
        trust.modularity(right[:4], g)


@pytest.fixture(scope="module")
def blobs():
    """Three separated groups of unequal sizes in 20 dimensions, and the map of them a run would read."""
    x, y = make_blobs([60, 120, 240], n_features=20, cluster_std=1.0, center_box=(-10, 10), random_state=3)
    x = x.astype(np.float32)
    offset, scale = fit_scaling(x, "standard")
    return y, input_map(x, offset, scale, 3, seed=0)


def test_trust_score_ranks_the_true_partition_above_a_merge_a_cut_and_noise(blobs):
    y, m = blobs
    right = trust.trust_scores(y, m.u, m.graph, 3, seed=0)
    merged = np.where(y == 2, 1, y)  # two groups as one
    cut = y.copy()
    cut[np.random.default_rng(0).choice(np.flatnonzero(y == 2), 120, replace=False)] = 3  # the largest group cut in two
    noise = np.random.default_rng(0).integers(0, 3, len(y))
    others = {"merged": trust.trust_scores(merged, m.u, m.graph, 2, seed=0),
              "cut": trust.trust_scores(cut, m.u, m.graph, 4, seed=0),
              "noise": trust.trust_scores(noise, m.u, m.graph, 3, seed=0)}
    assert right["agreement"] == pytest.approx(1.0)
    for name, other in others.items():
        assert other["score"] < right["score"] - 0.05, name
    assert others["merged"]["modularity"] < right["modularity"]  # two groups with no common neighbours merged
    assert others["cut"]["agreement"] < 0.95  # a cut is not: the reruns cut elsewhere
    assert others["cut"]["modularity"] < right["modularity"]  # and a cut through a group's neighbours costs links


def test_trust_score_lies_in_zero_one_and_repeats_with_the_seed(blobs):
    y, m = blobs
    noise = np.random.default_rng(1).integers(0, 3, len(y))
    for labels in (y, noise, np.zeros_like(y)):
        k = len(np.unique(labels))
        first = trust.trust_scores(labels, m.u, m.graph, k, seed=4)
        assert 0.0 <= first["score"] <= 1.0
        assert first == trust.trust_scores(labels, m.u, m.graph, k, seed=4)
    assert trust.trust_scores(np.zeros_like(y), m.u, m.graph, 1, seed=0)["score"] == 0.0


@pytest.fixture(scope="module")
def clumps():
    """Three round clumps of 150, 300 and 450 points in 2-d, far apart, and their 10-nearest-neighbour graph."""
    from sklearn.neighbors import kneighbors_graph

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [12.0, 0.0], [0.0, 12.0]])
    y = np.repeat([0, 1, 2], [150, 300, 450])
    u = centres[y] + rng.normal(size=(len(y), 2))
    graph = kneighbors_graph(u, 10, mode="connectivity")
    return y, u, (graph + graph.T).tocsr()


def test_valley_share_is_one_for_separate_clumps_and_drops_by_the_share_merged_or_cut(clumps):
    y, u, g = clumps
    assert trust.valley_share(y, u, g, seed=0) == pytest.approx(1.0)
    merged = np.where(y == 2, 1, y)  # two clumps, 750 of 900 points, as one cluster: a valley inside it
    assert trust.valley_share(merged, u, g, seed=0) == pytest.approx(150 / 900)
    cut = y.copy()
    cut[(y == 2) & (u[:, 0] > 0)] = 3  # the largest clump cut through its middle: no valley between the halves
    assert trust.valley_share(cut, u, g, seed=0) == pytest.approx(450 / 900)
    assert trust.valley_share(np.zeros_like(y), u, g, seed=0) == 0.0  # one cluster is apart from nothing


def test_valley_share_ignores_a_few_stray_points_in_a_cluster(clumps):
    y, u, g = clumps
    strays = y.copy()
    strays[np.flatnonzero(y == 2)[:20]] = 0  # 20 points of the far clump labelled as the first: 10% of that cluster
    assert trust.valley_share(strays, u, g, seed=0) == pytest.approx(1.0)


def test_valley_share_looks_past_strays_to_a_merged_pair():
    """A cluster of two clumps 7 apart and 12 strays across a gap: its likeliest split parts off the strays,
    which are set aside, and the split of the rest finds the pair's valley."""
    from sklearn.neighbors import kneighbors_graph

    rng = np.random.default_rng(0)
    merged = np.vstack([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + [7.0, 0.0],
                        rng.normal(scale=0.3, size=(12, 2)) + [3.5, 60.0]])
    u = np.vstack([merged, rng.normal(size=(300, 2)) + [40.0, 60.0]])
    labels = np.repeat([0, 1], [len(merged), 300])
    graph = kneighbors_graph(u, 10, mode="connectivity")
    depth, halves = split_in_two(merged, seed=0)
    assert sorted(np.bincount(halves)) == [12, 600] and depth < VALLEY_DEPTH  # the first split: the strays
    assert trust.two_clumps(merged, seed=0)
    assert not trust.two_clumps(merged[:300], seed=0)  # one round clump
    assert trust.valley_share(labels, u, (graph + graph.T).tocsr(), seed=0) == pytest.approx(300 / 912)


def test_valley_share_samples_large_data_with_the_seed(clumps):
    y, u, g = clumps
    cut = y.copy()
    cut[(y == 2) & (u[:, 0] > 0)] = 3
    small = trust.valley_share(cut, u, g, seed=1, sample_size=300)
    assert small == trust.valley_share(cut, u, g, seed=1, sample_size=300)
    assert small == pytest.approx(450 / 900)
