"""The benchmark of criteria for the number of clusters (bench/bench_k_criteria.py): its graph scores on graphs
whose answer is known by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
criteria = pytest.importorskip("bench_k_criteria")


def cliques(n_groups: int, size: int, bridge: float) -> sp.csr_matrix:
    """``n_groups`` complete graphs of ``size`` nodes (weight 1), each joined to the next by one link of ``bridge``."""
    n = n_groups * size
    w = np.zeros((n, n))
    for g in range(n_groups):
        block = slice(g * size, (g + 1) * size)
        w[block, block] = 1.0
        if g + 1 < n_groups:
            w[(g + 1) * size - 1, (g + 1) * size] = w[(g + 1) * size, (g + 1) * size - 1] = bridge
    np.fill_diagonal(w, 0.0)
    return sp.csr_matrix(w)


def test_largest_pairwise_cut_is_the_links_between_two_clusters_over_the_smaller_volume():
    graph = cliques(2, 3, bridge=1.0)
    # each triangle: 6 link ends inside plus the bridge's one; one link between them
    assert criteria.largest_pairwise_cut(np.array([0, 0, 0, 1, 1, 1]), graph, 2) == pytest.approx(1 / 7)
    # cutting one triangle instead: node 0 alone has 2 link ends, both to the other cluster
    assert criteria.largest_pairwise_cut(np.array([0, 1, 1, 1, 1, 1]), graph, 2) == pytest.approx(1.0)


def test_eigengap_is_widest_at_the_number_of_loosely_joined_groups():
    gaps = criteria.eigengaps(cliques(3, 8, bridge=0.05), k_max=5)
    assert sorted(gaps) == [2, 3, 4, 5]
    assert max(gaps, key=gaps.get) == 3
