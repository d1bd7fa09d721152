"""Label-free scores of a clustering: how far to trust a run when no labels exist.

Arrays in, floats out; no I/O. Each score is "higher is better" and lies in a fixed range, so runs on
the same data compare.

:func:`trust_scores` is what a run logs: the product of two checks that fail in opposite ways.
``agreement`` (:func:`rerun_agreement`) is the share of points on which independent Gaussian mixtures
of the data's map put the run's clusters back together: low for a run that training led astray, and
for one that cuts a group in two, since every rerun cuts it elsewhere; but a run that merges two
groups agrees well, its merged group is easy to find again. ``modularity`` (:func:`modularity`) of the
clusters on the data's neighbour graph drops when two groups that share few neighbours are merged.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import silhouette_score

from dec_mlflow.initialisation import map_gmm

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


# Gaussian mixtures refitted to the run's map for `agreement`, each the most likely of TRUST_STARTS starts
# (one reference ranked the pool of docs/trust.md less well: a single mixture of a cut group is a coin toss).
TRUST_REFERENCES = 3
TRUST_STARTS = 10
# ... fitted to and compared on a sample of at most this many points: on MNIST's 38,000 to 70,000 rows the
# mixtures of every row took a third of a run
AGREEMENT_SAMPLE = 5_000
# A run that did not start from the map of its input (a pretrained encoder, the k-means start) maps a seeded
# sample of at most this many rows for its score: UMAP of all rows would cost more than such a run's training.
MAP_SAMPLE = 10_000


def matched_agreement(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Share of points two labellings put in the same cluster once clusters are matched one to one.

    The matching maximises that share (Hungarian algorithm on the contingency table), so cluster ids do
    not matter; in [0, 1], 1 for the same partition.
    """
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"labellings must be two 1-d arrays of the same, non-zero length; got shapes {a.shape} and {b.shape}")
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(a))


def modularity(labels: np.ndarray, graph: sp.spmatrix) -> float:
    """Newman's modularity of ``labels`` on the weighted, symmetric neighbour ``graph`` (n x n, sparse).

    The share of link weight inside clusters minus the share expected if links fell at random between
    clusters of these sizes (sum over clusters of their share of link ends, squared). In [-1/2, 1):
    0 for one cluster; merging two clusters lowers it unless they share more links than chance would
    give them, and cutting a group lowers it by the links cut.
    """
    labels = np.asarray(labels)
    g = sp.coo_matrix(graph)
    if g.shape != (len(labels), len(labels)):
        raise ValueError(f"graph must be n x n for n = {len(labels)} labels; got shape {g.shape}")
    weights = g.data.astype(np.float64)  # UMAP's graph is float32: its sum would round the chance term
    total = weights.sum()
    if total <= 0:
        return 0.0
    _, ids = np.unique(labels, return_inverse=True)
    k = ids.max() + 1
    if k == 1:
        return 0.0  # every link inside, as chance would have it
    links = np.zeros((k, k))
    np.add.at(links, (ids[g.row], ids[g.col]), weights)
    links /= total
    ends = links.sum(1)
    return float(np.trace(links) - (ends ** 2).sum())


def rerun_agreement(labels: np.ndarray, u: np.ndarray, n_clusters: int, *, seed: int,
                    n_references: int = TRUST_REFERENCES, n_init: int = TRUST_STARTS,
                    sample_size: int = AGREEMENT_SAMPLE) -> float:
    """Mean :func:`matched_agreement` of ``labels`` with ``n_references`` Gaussian mixtures of the map ``u``.

    Each reference is :func:`dec_mlflow.initialisation.map_gmm` with ``n_clusters`` components and its
    own seed (``seed + 1``, ``seed + 2``, ...; a run's own mixture uses ``seed``): an independent rerun
    of the clustering step on the same map, fitted to and compared on one seeded sample of at most
    ``sample_size`` points.
    """
    if n_clusters < 2:
        return 1.0  # one cluster: every rerun finds it
    labels = np.asarray(labels)
    if len(labels) > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), sample_size, replace=False))
        labels, u = labels[rows], u[rows]
    return float(np.mean([matched_agreement(labels, map_gmm(u, n_clusters, seed=seed + r, n_init=n_init).predict(u))
                          for r in range(1, n_references + 1)]))


def trust_scores(labels: np.ndarray, u: np.ndarray, graph: sp.spmatrix, n_clusters: int, *, seed: int) -> dict[str, float]:
    """A run's label-free scores on the map ``u`` of its data and the map's neighbour ``graph``.

    ``score`` = ``agreement`` x max(``modularity``, 0), in [0, 1): see the module's docstring. Compare
    it between runs on the same data: its ceiling grows with k (modularity is at most 1 - 1/k for k
    equal clusters), which is how merged groups show.
    """
    agreement = rerun_agreement(labels, u, n_clusters, seed=seed)
    quality = modularity(labels, graph)
    return {"score": agreement * max(quality, 0.0), "agreement": agreement, "modularity": quality}
