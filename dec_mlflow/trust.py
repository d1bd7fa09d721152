"""Label-free scores of a clustering: how far to trust a run when no labels exist.

Arrays in, floats out; no I/O. Each score is "higher is better" and lies in a fixed range, so runs on
the same data compare.

:func:`trust_scores` is what a run logs: the product of two checks that fail in opposite ways.
``agreement`` (:func:`rerun_agreement`) is the share of points on which independent Gaussian mixtures
of the data's map put the run's clusters back together: low for a run that training led astray, and
for one that cuts a group in two, since every rerun cuts it elsewhere; but a run that merges two
groups agrees well, its merged group is easy to find again. ``modularity`` (:func:`modularity`) of the
clusters on the data's neighbour graph drops when two groups that share few neighbours are merged.
``valleys`` (:func:`valley_share`) reads the density of the map around each cluster: the share of points
in clusters that are one clump, parted from their nearest neighbouring cluster by a density valley. It
catches what the other two miss: a merged pair of groups that touch (a valley inside the cluster), and a
group cut where the reruns cut it too (no valley between the halves).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import silhouette_score

from dec_mlflow.initialisation import K_SAMPLE, VALLEY_DEPTH, InputMap, fisher_valley, input_map, map_gmm, split_in_two
from dec_mlflow.metrics import cluster_accuracy

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


def cluster_links(labels: np.ndarray, graph: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids 0..k-1 of ``labels`` (n,) and the link weight of ``graph`` (n x n) between clusters, (k, k) in float64.

    UMAP's graph is float32: its sums are taken in float64, or they would round the chance term of :func:`modularity`.
    """
    ids = np.unique(np.asarray(labels), return_inverse=True)[1]
    g = sp.coo_matrix(graph)
    k = int(ids.max()) + 1
    links = np.zeros((k, k))
    np.add.at(links, (ids[g.row], ids[g.col]), g.data.astype(np.float64))
    return ids, links


def modularity(labels: np.ndarray, graph: sp.spmatrix) -> float:
    """Newman's modularity of ``labels`` on the weighted, symmetric neighbour ``graph`` (n x n, sparse).

    The share of link weight inside clusters minus the share expected if links fell at random between
    clusters of these sizes (sum over clusters of their share of link ends, squared). In [-1/2, 1):
    0 for one cluster; merging two clusters lowers it unless they share more links than chance would
    give them, and cutting a group lowers it by the links cut.
    """
    labels = np.asarray(labels)
    if graph.shape != (len(labels), len(labels)):
        raise ValueError(f"graph must be n x n for n = {len(labels)} labels; got shape {graph.shape}")
    _, links = cluster_links(labels, graph)
    total = links.sum()
    if total <= 0:
        return 0.0
    if len(links) == 1:
        return 0.0  # every link inside, as chance would have it
    links /= total
    ends = links.sum(1)
    return float(np.trace(links) - (ends ** 2).sum())


# valley_share: a cluster is two clumps when a two-component split of it leaves at least SPLIT_SHARE of its
# points on each side with a valley deeper than choose_k's cut (the density there below VALLEY_DEPTH of
# the lower peak's); it is parted from its neighbour unless the density between them stays above APART_DEPTH
# of the lower peak. Set on the pools of wine, breast cancer, digits and imbalanced MNIST, checked on those of
# the blobs and MNIST's digits 0-5 (BENCHMARKS "Label-free trust score against ACC"): between the true k's
# clusters the density reads 0.5 or less on every pool; between the halves of a group cut at k + 1 or k + 2
# where it has no valley inside, 0.65 to 1.
SPLIT_SHARE = 0.15
APART_DEPTH = 0.6
VALLEY_MIN_POINTS = 40  # a cluster with fewer sampled points is not split: its density estimate is noise
# A split that parts off less than SPLIT_SHARE of a cluster (a few strays across an empty gap, a fringe) is
# set aside and the rest split again, up to this many times: on the MNIST test split a cluster of merged 4s
# and 9s first parts off 12 strays, and its 4/9 valley shows only in the split after.
STRAY_PEELS = 2


def two_clumps(points: np.ndarray, *, seed: int) -> bool:
    """Whether the map shows the cluster ``points`` (n, m) as two clumps.

    :func:`dec_mlflow.initialisation.split_in_two` must cut it along a valley deeper than :data:`VALLEY_DEPTH`
    with at least :data:`SPLIT_SHARE` of its points on each side. A split whose smaller side holds less than
    that is strays, not a second clump: they are set aside and the rest is split again, up to
    :data:`STRAY_PEELS` times. Never true below :data:`VALLEY_MIN_POINTS` points.
    """
    rest = points
    for _ in range(STRAY_PEELS + 1):
        if len(rest) < VALLEY_MIN_POINTS:
            return False
        depth, halves = split_in_two(rest, seed=seed)
        sizes = np.bincount(halves, minlength=2)
        if sizes.min() >= SPLIT_SHARE * len(points):
            return depth < VALLEY_DEPTH
        rest = rest[halves == sizes.argmax()]
    return False


def valley_share(labels: np.ndarray, u: np.ndarray, graph: sp.spmatrix, *, seed: int,
                 sample_size: int = K_SAMPLE) -> float:
    """The share of points in clusters that the map ``u`` (n, m) shows as one clump apart from its neighbours.

    For each cluster of ``labels`` (n,), on one seeded sample of at most ``sample_size`` rows of ``u``:
    it is *one clump* unless :func:`two_clumps` finds two in it; it is *apart*
    when :func:`dec_mlflow.initialisation.fisher_valley` between it and the cluster it shares the most
    links of ``graph`` with is below :data:`APART_DEPTH`. In [0, 1]: 1 when every cluster is both.
    """
    ids, links = cluster_links(labels, graph)
    k = len(links)
    if k < 2:
        return 0.0  # one cluster: nothing parted from anything
    np.fill_diagonal(links, -1.0)
    rows = np.arange(len(ids))
    if len(rows) > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), sample_size, replace=False))
    points, sampled = u[rows], ids[rows]
    share = np.bincount(ids, minlength=k) / len(ids)
    trusted = 0.0
    for c in range(k):
        own, nearest = points[sampled == c], points[sampled == int(links[c].argmax())]
        if two_clumps(own, seed=seed):
            continue
        if len(own) < 2 or len(nearest) < 2 or fisher_valley(own, nearest) >= APART_DEPTH:
            continue  # not parted from its neighbour
        trusted += share[c]
    return float(trusted)


def rerun_agreement(labels: np.ndarray, u: np.ndarray, n_clusters: int, *, seed: int,
                    n_references: int = TRUST_REFERENCES, n_init: int = TRUST_STARTS,
                    sample_size: int = AGREEMENT_SAMPLE) -> float:
    """Mean matched agreement (:func:`dec_mlflow.metrics.cluster_accuracy`) of ``labels`` with ``n_references`` Gaussian mixtures of the map ``u``.

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
    return float(np.mean([cluster_accuracy(labels, map_gmm(u, n_clusters, seed=seed + r, n_init=n_init).predict(u))
                          for r in range(1, n_references + 1)]))


def trust_scores(labels: np.ndarray, u: np.ndarray, graph: sp.spmatrix, n_clusters: int, *, seed: int) -> dict[str, float]:
    """A run's label-free scores on the map ``u`` of its data and the map's neighbour ``graph``.

    ``score`` = ``agreement`` x max(``modularity``, 0) x ``valleys``, in [0, 1): see the module's
    docstring. Compare it between runs on the same data: its ceiling grows with k (modularity is at
    most 1 - 1/k for k equal clusters), which is how merged groups show.
    """
    agreement = rerun_agreement(labels, u, n_clusters, seed=seed)
    quality = modularity(labels, graph)
    valleys = valley_share(labels, u, graph, seed=seed)
    return {"score": agreement * max(quality, 0.0) * valleys, "agreement": agreement, "modularity": quality,
            "valleys": valleys}


def run_scores(X, labels: np.ndarray, n_clusters: int, *, seed: int, offset: np.ndarray, scale: np.ndarray,
               image_shape: tuple[int, ...] | None = None, mapped: InputMap | None = None, callback=None) -> dict[str, float]:
    """:func:`trust_scores` of a fitted run's ``labels`` of ``X`` (raw rows, scaled by ``offset`` and ``scale``).

    ``mapped`` is the map of the input the run started from (the default recipe's); without it the input
    is mapped here as :func:`dec_mlflow.initialisation.input_map` does for such a run, on a seeded sample of
    :data:`MAP_SAMPLE` rows of larger data, so that runs of every recipe on the same data are scored alike.
    """
    if n_clusters < 2:  # one cluster: every rerun finds it, and it is no better than chance
        return {"score": 0.0, "agreement": 1.0, "modularity": 0.0, "valleys": 0.0}
    if mapped is None:
        rows = np.arange(X.shape[0])
        if len(rows) > MAP_SAMPLE:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAP_SAMPLE, replace=False))
        X, labels = X[rows], np.asarray(labels)[rows]
        mapped = input_map(X, offset, scale, n_clusters, seed=seed, image_shape=image_shape, callback=callback)
    return trust_scores(labels, mapped.u, mapped.graph, n_clusters, seed=seed)
