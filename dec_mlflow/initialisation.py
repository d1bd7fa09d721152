"""Initial clusterings: k-means in the embedding (the paper) or a manifold clustering (N2D).

The manifold clustering is UMAP then a Gaussian mixture, on the pretrained embedding (N2D) or, with no
pretraining, on the input itself reduced to at most 50 principal components. NumPy in, NumPy out
(torch only for the matmuls of the exact nearest-neighbour search); no I/O, every result seeded.
``fit``'s stage is :func:`initial_clusters`: the encoder's embedding (or the input) clustered, and the
encoder rescaled to it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.mixture import GaussianMixture

from dec_mlflow import distributed
from dec_mlflow.callbacks import Callback
from dec_mlflow.model import scale_embedding
from dec_mlflow.rows import Features, chunks
from dec_mlflow.training import embed

INITS = ("manifold", "kmeans")
# N2D (McConville et al. 2020): min_dist=0 packs each cluster tightly; 20 neighbours join a class's sub-styles.
UMAP_NEIGHBORS = 20
# GMM starts on a subsample, the most likely refined on all points: one start can merge two digits
# (docs/recipe.md, "Other choices").
GMM_N_INIT = 30
GMM_SAMPLE = 10_000
MAX_MAP_DIM = 10  # UMAP components: min(n_clusters, 10), at least 2
# The input-space map reduces wider inputs to this many principal components, fitted on PCA_SAMPLE rows: a
# better map than the raw pixels', at a fraction of the neighbour search's cost (docs/recipe.md, "Other choices").
INPUT_MAP_DIMS = 50
PCA_SAMPLE = 20_000
# Images of data sets under BLUR_MAX_ROWS are blurred before the map (:func:`blur_images`): with few samples an
# image's pixel-distance neighbours are too often of another class; large sets lose by it (docs/recipe.md).
BLUR_MIN_SIGMA = 0.5
BLUR_MAX_ROWS = 30_000
# For image sets, a neighbour is as near as its image shifted by up to SHIFT_PIXELS in either direction
# (:func:`nearest_neighbours` with shifted views): a digit written a pixel off is still the nearest of its class.
# Up to SHIFT_EXACT_MAX_ROWS every pair is compared so; above, the SHIFT_CANDIDATES plain nearest of each row.
SHIFT_PIXELS = 1
SHIFT_EXACT_MAX_ROWS = 30_000
SHIFT_CANDIDATES = 100
# Exact nearest neighbours (blocked matmuls on every core, deterministic) up to this many rows; beyond it
# UMAP's own approximate search, single-threaded when seeded.
EXACT_KNN_MAX_ROWS = 200_000
# UMAP's optimisation epochs above 10,000 points (umap-learn's: 200): the same clustering in a quarter of the time.
LARGE_MAP_EPOCHS = 50
# n_clusters='auto' (:func:`choose_k`): one map of MAX_MAP_DIM components, of which a seeded subsample of K_SAMPLE
# points is split top-down: a cluster is cut in two while the halves of its two-component GMM are separated by a
# density valley below VALLEY_DEPTH of the lower peak along their Fisher axis (docs/recipe.md). Each half keeps at
# least K_MIN_SPLIT points. K_STARTS and K_SILHOUETTE_SAMPLE are :func:`k_candidates`' (the criteria benchmark's).
K_RANGE = (2, 20)
K_SAMPLE = 4000
VALLEY_DEPTH = 0.2
K_MIN_SPLIT = 20
# Each cut is the deepest valley of this many two-component GMMs from different starts: the most likely
# split of a cluster that holds three groups can run through one of them (a valley of 0.3-0.5, which ended
# the cutting early on MNIST's imbalanced subsample and on digits), where another start parts one group
# cleanly (BENCHMARKS "Choosing the number of clusters"; docs/trust.md).
K_SPLIT_STARTS = 4
# Where the cutting stops, the halves of each cut the map does not support are cut once more: a valley
# below this depth inside such a half is a group the two-component split ran past (on MNIST's imbalanced
# subsample, seed 1, the deepest of four starts' cuts of the cluster of 4s and 9s runs through the 9s at 0.46,
# and the half holding the 4s then parts them from those 9s at 0.07). Half VALLEY_DEPTH: a valley found past an
# unsupported cut must be clearer than one found directly. It fired on none of the other 53 maps of the
# benchmark, where the halves' deepest valleys are 0.14 (digits, between styles of its 1s) and shallower
# (BENCHMARKS "Choosing the number of clusters").
K_HIDDEN_DEPTH = 0.1
K_STARTS = 5
K_SILHOUETTE_SAMPLE = 3000
# Mean squared distance of a point to its initial centroid in a rescaled pretrained embedding, where MNIST
# autoencoders land by themselves: the Student's t kernel is not scale-free (docs/recipe.md).
WITHIN_CLUSTER_SQ_DIST = 9.0
# Radius of an untrained encoder's prototypes (:func:`prototypes`): 8.5 apart, a point on one has q = 0.89
# against nine others, about distillation's smoothed targets.
PROTOTYPE_RADIUS = 6.0


@dataclass(frozen=True)
class InputSpace:
    """What the input-space map clusters (:func:`input_space`).

    ``points`` (n_samples, m) are the reduced input; ``shifted`` (n_shifts, n_samples, m), for small
    image sets only, the same rows with each image shifted, reduced alike: the map's neighbours are
    then shift-invariant (:func:`nearest_neighbours`).
    """
    points: np.ndarray
    shifted: np.ndarray | None = None


@dataclass
class Initialisation:
    """A clustering of the embedding that self-training starts from."""

    centroids: np.ndarray  # (n_clusters, embedding_dim) float32, in the embedding
    labels: np.ndarray  # (n_samples,) int64
    posteriors: np.ndarray | None  # (n_samples, n_clusters) float32 soft labels to distil, or None
    k_scores: dict[int, float] | None = None  # n_clusters='auto': each candidate k's score (:func:`choose_k`)
    # the default recipe's map of the input, kept for the run's trust score (:func:`input_map`)
    input_map: InputMap | None = None


@dataclass
class InputMap:
    """The UMAP of a dataset's input (:func:`input_map`) that a run's label-free trust score reads.

    ``u`` (n_samples, m) is the map, ``graph`` (n_samples x n_samples, sparse, symmetric) UMAP's
    weighted graph of each row's nearest neighbours in the input.
    """
    u: np.ndarray
    graph: sp.csr_matrix


def embedding_scale(z: np.ndarray, init: Initialisation) -> float:
    """Factor that brings the mean squared distance of ``z`` to its initial centroids to WITHIN_CLUSTER_SQ_DIST.

    Parameters
    ----------
    z : ndarray of shape (n_samples, embedding_dim)
    init : the initial clustering of ``z``

    Returns
    -------
    float > 0; 1.0 when every point sits on its centroid.
    """
    within = float(np.square(z.astype(np.float64) - init.centroids[init.labels]).sum(1).mean())
    return float(np.sqrt(WITHIN_CLUSTER_SQ_DIST / within)) if within > 0 else 1.0


def prototypes(n_clusters: int, dim: int, *, seed: int, radius: float | None = None) -> np.ndarray:
    """Fixed, well-separated starting centroids for an untrained encoder: (n_clusters, dim) float32.

    The orthonormal directions of a seeded random matrix times ``radius`` (random unit directions
    when ``n_clusters`` > ``dim``). An untrained encoder's embedding holds no clustering, so the
    means of the initial clusters in it lie nearly on top of each other; distillation instead
    teaches the encoder to carry each cluster to its own prototype.
    """
    radius = PROTOTYPE_RADIUS if radius is None else radius
    g = np.random.default_rng(seed).standard_normal((dim, n_clusters))
    if n_clusters <= dim:
        directions = np.linalg.qr(g)[0].T  # (n_clusters, dim), orthonormal rows
    else:
        directions = (g / np.linalg.norm(g, axis=0)).T
    return (radius * directions).astype(np.float32)


def kmeans_init(z: np.ndarray, n_clusters: int, *, n_init: int, seed: int) -> Initialisation:
    """k-means with ``n_init`` restarts in the embedding (paper section 3.1); no posteriors."""
    km = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(z)
    return Initialisation(km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), None)


def manifold_init(z: np.ndarray, n_clusters: int | str, *, seed: int, space: InputSpace | None = None,
                  n_neighbors: int = UMAP_NEIGHBORS, k_range: tuple[int, int] = K_RANGE, keep_map: bool = False,
                  callback=None) -> Initialisation:
    """UMAP then a Gaussian mixture (N2D, McConville et al. 2020); centroids in the embedding ``z``.

    ``umap_map`` of ``space`` (default: ``z`` itself), then ``cluster_map``: a full-covariance GMM
    with ``n_clusters`` components clusters the map; the centroids are the mean of ``z`` over each
    GMM cluster, the posteriors the GMM's responsibilities.

    Parameters
    ----------
    z : ndarray of shape (n_samples, embedding_dim)
        The encoder's embedding, where the centroids live.
    n_clusters : int or 'auto'
        'auto': :func:`choose_k` picks it in ``k_range`` on one map of :data:`MAX_MAP_DIM` components,
        which the chosen k's mixture then clusters; the scores are the result's ``k_scores``.
    seed : int
        Seeds UMAP and the GMM. A fixed seed makes UMAP's optimisation single-threaded (umap-learn's
        rule), the price of the same result on every run.
    space : InputSpace, optional
        What to map and cluster instead of ``z``: the reduced input (:func:`input_space`) when the
        encoder is not pretrained.
    n_neighbors : int, default=20
        UMAP's neighbourhood size, capped at n_samples - 1.
    k_range : (int, int), default=(2, 20)
        The smallest and largest k ``n_clusters='auto'`` considers (capped at n_samples - 1).
    keep_map : bool, default=False
        Return the map and its neighbour graph as the result's ``input_map`` (for the trust score).
    callback : Callback, optional
        Told of the sub-stages 'init/neighbours', 'init/map', 'init/k' and 'init/mixture' and their steps.
    """
    space = InputSpace(z) if space is None else space
    mapped = dict(seed=seed, n_neighbors=n_neighbors, shifted=space.shifted, callback=callback, return_graph=True)
    k, scores = n_clusters, None
    u, graph = umap_map(space.points, MAX_MAP_DIM if n_clusters == "auto" else n_clusters, **mapped)
    if n_clusters == "auto":
        k, scores = choose_k(u, *k_range, seed=seed, callback=callback)
    return dataclasses.replace(cluster_map(z, u, k, seed=seed, callback=callback), k_scores=scores,
                               input_map=InputMap(u, graph) if keep_map else None)


def initial_clustering(z: np.ndarray, n_clusters: int | str, *, init: str, seed: int, n_init: int,
                       space: InputSpace | None = None, k_range: tuple[int, int] = K_RANGE,
                       callback=None) -> tuple[Initialisation, float]:
    """``fit``'s initial clustering of the embedding ``z`` (n_samples, embedding_dim), and the factor for its scale.

    ``init='manifold'`` (:func:`manifold_init`, of ``space`` when given: the reduced input of an untrained
    encoder) or ``'kmeans'`` (:func:`kmeans_init`; also for one cluster, whose centroid is the mean). With
    ``space``, the centroids become :func:`prototypes` (the encoder learns to carry each cluster to its
    own) and the factor is 1; otherwise the factor (:func:`embedding_scale`) puts the points at the
    distance from their centroids that the Student's t kernel expects.
    """
    if init == "manifold" and (n_clusters == "auto" or n_clusters > 1):
        result = manifold_init(z, n_clusters, seed=seed, space=space, k_range=k_range, keep_map=space is not None,
                               callback=callback)
    else:
        result = kmeans_init(z, n_clusters, n_init=n_init, seed=seed)
    if space is not None and result.posteriors is not None:
        centroids = prototypes(len(result.centroids), z.shape[1], seed=seed)
        return dataclasses.replace(result, centroids=centroids), 1.0
    return result, embedding_scale(z, result)


def initial_clusters(encoder: torch.nn.Module, x: torch.Tensor, n_clusters: int | str, *, init: str, seed: int,
                     n_init: int, k_range: tuple[int, int], callback: Callback, decoder: torch.nn.Module | None = None,
                     space: tuple | None = None) -> tuple[Initialisation, float]:
    """``fit``'s stage 2: the initial clustering (``init``) of the scaled data ``x`` (n_samples, n_features), and
    the embedding's scale.

    ``space`` (raw X, offset, scale, image shape), given when the encoder is untrained, makes the manifold
    initialisation map the scaled input (reduced to 50 principal components) instead of the embedding;
    the centroids are always in the embedding.

    The encoder (and an IDEC ``decoder``) are rescaled in place so that points lie at the squared
    distance the Student's t kernel expects from their initial centroids; returns the clustering (in the
    unscaled embedding) and the factor its centroids must be multiplied by. Under torchrun the ranks
    embed their blocks of rows, rank 0 clusters the gathered embedding of all the data and broadcasts
    the clustering, so every rank starts from the same centroids.
    """
    callback.on_stage_begin("init", None)
    z = distributed.all_gather_rows(embed(encoder, x, rows=distributed.rows(x.shape[0]))).cpu().numpy()  # (n, embedding_dim)
    result = scale = None
    if distributed.is_main():
        features = None if space is None else input_space(*space[:3], image_shape=space[3], seed=seed)
        result, scale = initial_clustering(z, n_clusters, init=init, seed=seed, n_init=n_init, space=features,
                                           k_range=k_range, callback=callback)
    kept = result.input_map if result is not None else None  # rank 0's, for the trust score: not sent to every rank
    result, scale = distributed.broadcast_object((None if result is None else dataclasses.replace(result, input_map=None), scale))
    result = dataclasses.replace(result, input_map=kept)
    scale_embedding(encoder, scale, decoder)
    callback.on_stage_end("init")
    return result, scale


def k_candidates(u: np.ndarray, k_min: int, k_max: int, *, seed: int):
    """One GMM per k, scored by its silhouette: what :func:`choose_k` chose from until it cut the map along
    density valleys, kept for the criteria benchmark (bench/bench_k_criteria.py). An iterator of ``(k, silhouette, mixture,
    sample)`` for k in [k_min, min(k_max, n_samples - 1)], where ``mixture`` is the best-scoring of
    :data:`K_STARTS` full-covariance GMMs (k-means starts) fitted to one seeded subsample ``sample`` of
    :data:`K_SAMPLE` rows of the map ``u``, and ``silhouette`` its partition's mean silhouette in the map (on
    :data:`K_SILHOUETTE_SAMPLE` of those rows; -1 when it puts them all in one cluster).

    Raises ValueError at once, before any fit, unless 2 <= k_min <= k_max <= n_samples - 1.
    """
    n = u.shape[0]
    k_max = min(k_max, n - 1)
    if not 2 <= k_min <= k_max:
        raise ValueError(f"n_clusters='auto' needs 2 <= k_min <= k_max <= n_samples - 1; got k_min={k_min}, "
                         f"k_max={k_max}, n_samples={n}")
    rng = np.random.default_rng(seed)
    sample = u if n <= K_SAMPLE else u[np.sort(rng.choice(n, K_SAMPLE, replace=False))]
    scored = sample[np.sort(rng.choice(len(sample), min(K_SILHOUETTE_SAMPLE, len(sample)), replace=False))]

    def candidates():
        for k in range(k_min, k_max + 1):
            best, kept = -1.0, None
            for start in range(K_STARTS):
                gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4,
                                      random_state=(seed * 1009 + start) % 2**32).fit(sample)
                labels = gmm.predict(scored)
                score = float(silhouette_score(scored, labels)) if len(np.unique(labels)) > 1 else -1.0
                if kept is None or score > best:
                    best, kept = score, gmm
            yield k, best, kept, sample
    return candidates()


def valley_depth(projection: np.ndarray, grid: int = 101) -> float:
    """The deepest density valley of the 1-d sample ``projection``, relative to the lower of the peaks around it.

    The density is a Gaussian kernel estimate (Silverman's bandwidth, which smooths more than it splits); the
    depth is the least, over ``grid`` points spanning the sample, of the density there over the smaller of the
    highest densities to its left and to its right. 1 means no valley (one mode), 0 an empty gap.
    """
    spread = float(projection.std())
    if not np.isfinite(spread) or spread <= 0:
        return 1.0
    bandwidth = 1.06 * spread * projection.shape[0] ** -0.2
    points = np.linspace(projection.min(), projection.max(), grid)
    density = np.exp(-0.5 * ((points[:, None] - projection[None, :]) / bandwidth) ** 2).sum(1)
    left, right = np.maximum.accumulate(density), np.maximum.accumulate(density[::-1])[::-1]
    return float((density / np.maximum(np.minimum(left, right), np.finfo(float).tiny)).min())


def fisher_valley(first: np.ndarray, second: np.ndarray) -> float:
    """The :func:`valley_depth` between two groups of points (n1, m) and (n2, m), along their Fisher axis.

    The axis is the groups' mean difference whitened by their pooled within-group covariance, along which
    two groups are the furthest apart. 1 (no valley) when the axis is undefined.
    """
    means = [first.mean(0), second.mean(0)]
    within = np.cov(np.vstack([first - means[0], second - means[1]]).T).reshape(first.shape[1], -1)
    axis = np.linalg.solve(within + 1e-6 * np.eye(first.shape[1]), means[1] - means[0])
    norm = float(np.linalg.norm(axis))
    if not np.isfinite(norm) or norm == 0:
        return 1.0
    return valley_depth(np.vstack([first, second]) @ (axis / norm))


def split_in_two(points: np.ndarray, *, seed: int, starts: int = 1) -> tuple[float, np.ndarray]:
    """A two-component full-covariance GMM's split of ``points`` (n, m) and the :func:`fisher_valley` between its halves.

    The GMM is the more likely of two initialisations seeded by ``seed``. With ``starts > 1``, ``starts - 1``
    more GMMs from other seeded initialisations are fitted, and of all their splits the one with the deepest
    valley is kept, never shallower than the first's: a valley is evidence of two groups whichever start found
    it, while the most likely two-component fit to a cluster of three groups may cut through one of them.
    Returns (depth, labels in {0, 1}); the depth is 1 when a half holds fewer than two points.
    """
    best = None
    for start in range(starts):
        gmm = GaussianMixture(2, covariance_type="full", reg_covar=1e-4, n_init=2 if start == 0 else 1,
                              random_state=seed if start == 0 else (seed * 1009 + start) % 2**32)
        labels = gmm.fit_predict(points)
        depth = 1.0
        if np.bincount(labels, minlength=2).min() >= 2:
            depth = fisher_valley(points[labels == 0], points[labels == 1])
        if best is None or depth < best[0]:
            best = (depth, labels)
    return best


def valley_splits(u: np.ndarray, k_max: int, *, seed: int, starts: int = K_SPLIT_STARTS,
                  callback=None) -> tuple[dict[int, float], int]:
    """Split a seeded subsample of the map ``u`` (n_samples, m) top-down, the clearest split first, up to ``k_max`` clusters.

    Every cluster's best cut is :func:`split_in_two`'s over ``starts`` GMM starts; at each step the cluster whose cut has the
    shallowest valley is cut, unless a half would keep fewer than :data:`K_MIN_SPLIT` points (such a
    cluster stays whole).

    Returns
    -------
    ({k: valley depth of the cut that made the k-th cluster} for k = 2, 3, ... up to ``k_max`` or until no
    cluster can be cut, depths in [0, 1]; the number of *hidden* valleys: where the first cut no shallower than
    :data:`VALLEY_DEPTH` comes up, the halves of every cluster's (unsupported) cut are cut once more, and each
    half whose cut has a valley below :data:`K_HIDDEN_DEPTH` counts one)
    """
    rng = np.random.default_rng(seed)
    sample = u if u.shape[0] <= K_SAMPLE else u[np.sort(rng.choice(u.shape[0], K_SAMPLE, replace=False))]
    callback = callback or Callback()
    callback.on_stage_begin("init/k", k_max - 1)
    made: dict[bytes, tuple | None] = {}  # a cluster's cut, by its members: the tree and the look past it share them

    def cut(members: np.ndarray):
        key = members.tobytes()
        if key not in made:
            made[key] = None
            if members.shape[0] >= 2 * K_MIN_SPLIT:
                depth, labels = split_in_two(sample[members], seed=seed, starts=starts)
                if np.bincount(labels, minlength=2).min() >= K_MIN_SPLIT:
                    made[key] = depth, members[labels == 0], members[labels == 1]
        return made[key]

    cuts = [cut(np.arange(sample.shape[0]))]
    depths: dict[int, float] = {}
    unsupported = None  # the open cuts when the first cut the map does not support comes up
    for k in range(2, k_max + 1):
        open_ = [i for i, c in enumerate(cuts) if c is not None]
        if not open_:
            break
        i = min(open_, key=lambda j: cuts[j][0])  # ties: the earlier cluster
        if unsupported is None and cuts[i][0] >= VALLEY_DEPTH:
            unsupported = [cuts[j] for j in open_]
        depth, first, second = cuts.pop(i)
        depths[k] = depth
        cuts += [cut(first), cut(second)]
        callback.on_step("init/k", k - 1, {"valley_depth": depth})
    hidden = sum(1 for c in unsupported or [] for half in c[1:]
                 if (inner := cut(half)) is not None and inner[0] < K_HIDDEN_DEPTH)
    callback.on_stage_end("init/k")
    return depths, hidden


def choose_k(u: np.ndarray, k_min: int, k_max: int, *, seed: int, starts: int = K_SPLIT_STARTS,
             callback=None) -> tuple[int, dict[int, float]]:
    """The number of clusters in the map ``u`` (n_samples, m): as many as top-down cuts along density valleys make.

    :func:`valley_splits` cuts the map's clusters in two, the clearest cut first; k is the number of clusters
    before the first cut whose valley is no deeper than :data:`VALLEY_DEPTH` (the density there is at least that
    share of the lower peak's), plus the hidden valleys :func:`valley_splits` finds past that point (a group
    that every two-component split of its cluster ran past), held within [k_min, k_max]. UMAP with
    ``min_dist=0`` packs a group into a clump; two groups that touch in the map are cut where their contact
    thins out. The cut tree is one seeded subsample's; it picks k only, the chosen k's GMM then clusters the
    whole map.

    Returns
    -------
    (k, {k: valley depth of the cut that made the k-th cluster}) for k = 2..k_max while a cut was possible; a
    depth below :data:`VALLEY_DEPTH` is a cut the data supports.

    ``k_max`` is capped at n_samples - 1. Raises ValueError at once, before any work, unless 2 <= k_min <= k_max.
    """
    n = u.shape[0]
    k_max = min(k_max, n - 1)
    if not 2 <= k_min <= k_max:
        raise ValueError(f"n_clusters='auto' needs 2 <= k_min <= k_max <= n_samples - 1; got k_min={k_min}, "
                         f"k_max={k_max}, n_samples={n}")
    depths, hidden = valley_splits(u, k_max, seed=seed, starts=starts, callback=callback)
    return min(max(supported_cuts(depths) + hidden, k_min), k_max), depths


def supported_cuts(depths: dict[int, float]) -> int:
    """The number of clusters the cuts ``depths`` ({k: depth}, :func:`valley_splits`) make before the first one no
    deeper than :data:`VALLEY_DEPTH`: 1 when the first is."""
    supported = 1
    while supported + 1 in depths and depths[supported + 1] < VALLEY_DEPTH:
        supported += 1
    return supported


def describe_k_choice(k: int, depths: dict[int, float], k_min: int, k_max: int) -> str:
    """One sentence on how n_clusters='auto' came to ``k`` from the cuts ``depths`` ({k: depth}, :func:`choose_k`)
    in ``k_min..k_max``: the clusters the supported cuts make, what else moved k, and how deep the first cut the
    map does not support is (just above :data:`VALLEY_DEPTH`, it is a k worth a run of its own)."""
    supported = supported_cuts(depths)
    text = f"n_clusters=auto chose k = {k}: {supported} clusters parted by density valleys below {VALLEY_DEPTH} in the map"
    if k == k_min > supported:
        text += f", raised to k_min = {k_min}"
    elif k == k_max < supported:
        text += f", held at k_max = {k_max}"
    elif k > supported:
        text += f", plus {k - supported} inside a cut the map does not support (a valley below {K_HIDDEN_DEPTH})"
    if supported + 1 in depths:
        text += f"; the first cut it does not support, to {supported + 1} clusters, has a valley of {depths[supported + 1]:.2f}"
    return text + " (k_valley_depth, k_selection.png)"


def input_space(X: Features, offset: np.ndarray, scale: np.ndarray, *, seed: int,
                image_shape: tuple[int, ...] | None = None, n_components: int = INPUT_MAP_DIMS) -> InputSpace:
    """What the input-space map clusters: the scaled input ``(X - offset) * scale``, reduced to
    ``n_components`` principal components if wider; for image sets, their shifted views
    (:func:`shifted_images`, up to :data:`EXACT_KNN_MAX_ROWS` rows, where the neighbour search uses
    them), and under :data:`BLUR_MAX_ROWS` rows the images blurred first (:func:`blur_images`).

    The principal axes are fitted on a seeded sample of at most :data:`PCA_SAMPLE` rows; every row
    is then projected a chunk at a time, so a memory-mapped or sparse ``X`` is never copied whole.

    Returns
    -------
    InputSpace with points of shape (n_samples, min(n_features, n_components)), float32, and the
    shifted views (n_shifts, n_samples, same) or None
    """
    def prepared(block: np.ndarray) -> np.ndarray:
        block = (block - offset) * scale
        return blur_images(block, image_shape) if image_shape is not None and n < BLUR_MAX_ROWS else block

    def reduced(block: np.ndarray) -> np.ndarray:
        return (block if pca is None else pca.transform(block)).astype(np.float32)

    n, d = X.shape
    shifts = image_shape is not None and n <= EXACT_KNN_MAX_ROWS
    pca = None
    if d > n_components:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, PCA_SAMPLE), replace=False))
        sample = prepared(np.asarray(X[rows].toarray() if hasattr(X, "toarray") else X[rows], np.float32))
        pca = PCA(n_components, svd_solver="randomized", random_state=seed).fit(sample)
    points, shifted = [], []
    for block in chunks(X):
        block = prepared(block)
        points.append(reduced(block))
        if shifts:
            shifted.append(np.stack([reduced(view) for view in _shifted_views(block, image_shape)]))
    return InputSpace(np.concatenate(points), np.concatenate(shifted, axis=1) if shifted else None)


def shifted_images(block: np.ndarray, image_shape: tuple[int, ...], pixels: int = SHIFT_PIXELS) -> list[np.ndarray]:
    """Rows of flattened channels-last images, shifted by up to ``pixels`` along each side (not 0, 0).

    Each view moves every image by (dy, dx), zero filling what comes in; ``(2 * pixels + 1) ** 2 - 1`` views.
    """
    return [view.copy() for view in _shifted_views(block, image_shape, pixels)]


def _shifted_views(block: np.ndarray, image_shape: tuple[int, ...], pixels: int = SHIFT_PIXELS) -> Iterator[np.ndarray]:
    """:func:`shifted_images` one at a time in one buffer, each overwritten by the next: eight fresh arrays the
    size of full MNIST cost more in page faults than the copying (5 of 8 s of its input space at one thread)."""
    height, width, *channels = image_shape
    images = block.reshape(len(block), height, width, channels[0] if channels else 1)
    view = np.empty_like(images)
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            if dy or dx:
                view.fill(0)
                view[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
                    images[:, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
                yield view.reshape(len(block), -1)


def blur_images(block: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Rows of flattened channels-last images, each blurred by a Gaussian of :func:`blur_sigma` pixels.

    Distances between blurred images forgive small shifts and stroke widths, which raw pixel
    distances punish: the neighbours of a digit are more often digits of its class.
    """
    height, width, *channels = image_shape
    images = block.reshape(len(block), height, width, channels[0] if channels else 1)
    sigma = blur_sigma(image_shape)
    return ndimage.gaussian_filter(images, (0, sigma, sigma, 0), mode="constant").reshape(len(block), -1)


def blur_sigma(image_shape: tuple[int, ...]) -> float:
    """One pixel for a 28-pixel side, proportionally more for larger images, at least half a pixel."""
    return max(BLUR_MIN_SIGMA, min(image_shape[:2]) / 28.0)


def nearest_neighbours(f: np.ndarray, k: int, *, shifted: np.ndarray | None = None, block: int = 1024,
                       callback=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of every row of ``f`` (n, m) among all rows, itself first.

    Blocked matmuls (|b|^2 - 2 a.b is enough to rank the neighbours of a) and a top-k per block, on
    every core torch uses; the same input gives the same neighbours.

    With ``shifted`` views of the rows (n_views, n, m: :func:`input_space`'s shifted images), the
    distance of a and b is the least of |a - b| and, over the views v, of |v(a) - b| and |a - v(b)|:
    shift-invariant. Up to :data:`SHIFT_EXACT_MAX_ROWS` rows every pair is compared so (1 + 2 n_views
    times the plain cost); above, the :data:`SHIFT_CANDIDATES` plain nearest of each row are ranked by it.

    Returns
    -------
    indices : ndarray of shape (n, k), int64
    distances : ndarray of shape (n, k), float32, Euclidean, ascending
    """
    x = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
    n = x.shape[0]
    views = None if shifted is None else torch.from_numpy(np.ascontiguousarray(shifted, dtype=np.float32))
    reranked = views is not None and n > SHIFT_EXACT_MAX_ROWS
    callback = callback or Callback()
    callback.on_stage_begin("init/neighbours", 2 * n if reranked else n)
    with torch.no_grad():
        if not reranked:
            result = _all_pairs(x, k, views, block, lambda done: callback.on_step("init/neighbours", done, {}))
        else:
            candidates, _ = _all_pairs(x, min(SHIFT_CANDIDATES, n), None, block,
                                       lambda done: callback.on_step("init/neighbours", done, {}))
            result = _rerank(x, views, candidates, k, block,
                             lambda done: callback.on_step("init/neighbours", n + done, {}))
    callback.on_stage_end("init/neighbours")
    return result


def _all_pairs(x: torch.Tensor, k: int, views: torch.Tensor | None, block: int, report) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` comparing every pair, shift-invariant with ``views``."""
    n = x.shape[0]
    squares = x.pow(2).sum(1)  # (n,)
    xt = x.T.contiguous()
    view_squares = [] if views is None else [v.pow(2).sum(1) for v in views]
    indices, distances = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    for start in range(0, n, block):
        rows = x[start : start + block]
        own_sq = squares[start : start + block, None]
        rank = torch.addmm(squares.expand(rows.shape[0], n), rows, xt, alpha=-2.0)  # (b, n): d^2 - |a|^2
        if views is not None:
            rank += own_sq  # d^2: the views' distances are whole ones
            for view, view_sq in zip(views, view_squares):
                moved = view[start : start + block]  # v(a) against every b, then a against every v(b)
                rank = torch.minimum(rank, torch.addmm(squares.expand(rows.shape[0], n), moved, xt, alpha=-2.0)
                                     + view_sq[start : start + block, None])
                rank = torch.minimum(rank, torch.addmm(view_sq.expand(rows.shape[0], n), rows, view.T, alpha=-2.0) + own_sq)
            own = torch.arange(rows.shape[0])
            rank[own, own + start] = -float("inf")  # itself first, whatever rounding gave it
        value, index = torch.topk(rank, k, largest=False, sorted=True)
        indices[start : start + block] = index.numpy()
        value = torch.cat([torch.zeros_like(value[:, :1]), value[:, 1:]], 1) if views is not None else value + own_sq
        distances[start : start + block] = value.clamp_min(0).sqrt().numpy()
        report(min(n, start + block))
    return indices, distances


def _rerank(x: torch.Tensor, views: torch.Tensor, candidates: np.ndarray, k: int, block: int,
            report) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each row's ``candidates`` (n, c; itself first) by the shift-invariant distance.

    Squared distances as |a|^2 + |b|^2 - 2 a.b, the dot products batched matmuls, as :func:`_all_pairs`
    does: a and each of its views against the candidates at once, then a against each view of them.
    """
    n = x.shape[0]
    indices, distances = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    squares = x.pow(2).sum(1)  # (n,)
    view_squares = [v.pow(2).sum(1) for v in views]
    for start in range(0, n, block):
        rows = x[start : start + block]  # (b, m)
        near = torch.from_numpy(candidates[start : start + block])  # (b, c)
        own_sq = squares[start : start + block, None]  # (b, 1)
        # a and its views v(a) (b, m, 1 + n_views) against every candidate b: the least of |v(a) - b|^2
        moved = torch.stack([rows, *(view[start : start + block] for view in views)], 2)
        moved_sq = torch.cat([own_sq, *(vs[start : start + block, None] for vs in view_squares)], 1)  # (b, 1 + n_views)
        d2 = (squares[near][:, :, None] + moved_sq[:, None, :] - 2.0 * torch.bmm(x[near], moved)).amin(2)  # (b, c)
        for view, view_sq in zip(views, view_squares):  # a to v(b)
            d2 = torch.minimum(d2, view_sq[near] + own_sq - 2.0 * torch.bmm(view[near], rows[:, :, None])[..., 0])
        d2[:, 0] = -float("inf")  # itself first
        value, order = torch.topk(d2, k, largest=False, sorted=True)
        indices[start : start + block] = np.take_along_axis(candidates[start : start + block], order.numpy(), 1)
        value[:, 0] = 0.0
        distances[start : start + block] = value.clamp_min(0).sqrt().numpy()
        report(min(n, start + block))
    return indices, distances


def umap_map(z: np.ndarray, n_clusters: int, *, seed: int, n_neighbors: int = UMAP_NEIGHBORS,
             shifted: np.ndarray | None = None, return_graph: bool = False, callback=None):
    """UMAP of ``z`` (n, m) to ``min(n_clusters, m, 10)`` dimensions (at least 2), ``min_dist=0``.

    The neighbour graph is exact (:func:`nearest_neighbours`, shift-invariant with ``shifted`` views
    of the rows) up to :data:`EXACT_KNN_MAX_ROWS` rows; on more than 10,000 rows UMAP optimises for
    :data:`LARGE_MAP_EPOCHS` epochs. A
    ``callback`` that shows progress (``shows_progress``) gets UMAP's own bar of its epochs.

    Returns
    -------
    ndarray of shape (n_samples, n_components), float64; with ``return_graph``, also UMAP's weighted,
    symmetric graph of the neighbours (scipy.sparse.csr_matrix, n_samples x n_samples)
    """
    try:
        import umap
    except ImportError as e:  # an optional piece: say what to install
        raise ImportError("init='manifold' needs umap-learn: pip install umap-learn (or use init='kmeans')") from e
    n_samples = z.shape[0]
    if n_samples <= n_clusters:
        raise ValueError(f"init='manifold' needs more samples than clusters; got n_samples={n_samples}, n_clusters={n_clusters}")
    n_components = max(2, min(n_clusters, z.shape[1], MAX_MAP_DIM))
    n_neighbors = min(n_neighbors, n_samples - 1)
    knn = None
    # below 4,096 rows UMAP computes exact neighbours itself, but not shift-invariant ones
    if n_samples <= EXACT_KNN_MAX_ROWS and (n_samples > 4096 or shifted is not None):
        index, distance = nearest_neighbours(z, n_neighbors, shifted=shifted, callback=callback)
        knn = (index, distance, None)
    callback = callback or Callback()
    callback.on_stage_begin("init/map", None)
    reducer = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=0.0, random_state=seed, n_jobs=1,
                        init="spectral" if n_samples > n_components + 1 else "random", precomputed_knn=knn or (None, None, None),
                        n_epochs=LARGE_MAP_EPOCHS if n_samples > 10_000 else None,
                        tqdm_kwds={"disable": not callback.shows_progress, "desc": "init/map: UMAP epochs",
                                   "leave": False})
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # the map is never used to transform new data: UMAP's notice of it is noise
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
            u = reducer.fit_transform(np.asarray(z, np.float32)).astype(np.float64)
    finally:
        # UMAP's numba sets the OpenMP thread count, which torch shares, to every core: a process limited to
        # fewer (OMP_NUM_THREADS, torch.set_num_threads, one of several torchrun ranks) would then train on all
        torch.set_num_threads(threads)
    callback.on_stage_end("init/map")
    return (u, reducer.graph_.tocsr()) if return_graph else u


def input_map(X: Features, offset: np.ndarray, scale: np.ndarray, n_clusters: int, *, seed: int,
              image_shape: tuple[int, ...] | None = None, callback=None) -> InputMap:
    """The map of the scaled input that the default recipe's manifold initialisation clusters, with its graph.

    The same :func:`input_space` and :func:`umap_map` calls as a run without pretraining, so for such a run
    it is the map it started from; runs of other recipes (a pretrained encoder's map, the k-means start)
    compute it for their trust score.
    """
    space = input_space(X, offset, scale, seed=seed, image_shape=image_shape)
    u, graph = umap_map(space.points, n_clusters, seed=seed, shifted=space.shifted, return_graph=True, callback=callback)
    return InputMap(u, graph)


def map_gmm(u: np.ndarray, n_clusters: int, *, seed: int, n_init: int = GMM_N_INIT, callback=None) -> GaussianMixture:
    """The full-covariance Gaussian mixture of ``cluster_map`` fitted to ``u`` (n, m).

    ``n_init`` starts from k-means++ centres, each fitted to the same seeded subsample of at most
    :data:`GMM_SAMPLE` rows; the most likely on the subsample is refined on the whole of ``u``.
    """
    n = u.shape[0]
    sample = u if n <= GMM_SAMPLE else u[np.sort(np.random.default_rng(seed).choice(n, GMM_SAMPLE, replace=False))]
    best, best_score = None, -np.inf
    callback = callback or Callback()
    callback.on_stage_begin("init/mixture", n_init + 1)
    for start in range(n_init):
        gmm = GaussianMixture(n_clusters, covariance_type="full", reg_covar=1e-4, init_params="k-means++",
                              random_state=(seed * 1009 + start) % 2**32).fit(sample)
        score = gmm.score(sample)
        if score > best_score:
            best, best_score = gmm, score
        callback.on_step("init/mixture", start + 1, {"log_likelihood": best_score})
    if sample is not u:
        best = GaussianMixture(n_clusters, covariance_type="full", reg_covar=1e-4, random_state=seed, weights_init=best.weights_,
                               means_init=best.means_, precisions_init=best.precisions_).fit(u)
    callback.on_step("init/mixture", n_init + 1, {"log_likelihood": float(best.score(u))})
    callback.on_stage_end("init/mixture")
    return best


def cluster_map(z: np.ndarray, u: np.ndarray, n_clusters: int, *, seed: int, callback=None) -> Initialisation:
    """Full-covariance GMM on the map ``u`` (n_samples, m) of ``z``; centroids in ``z``'s space.

    The GMM keeps the most likely of ``GMM_N_INIT`` starts: a single start can merge two clusters.
    """
    gmm = map_gmm(u, n_clusters, seed=seed, callback=callback)
    posteriors = gmm.predict_proba(u)  # (n, k)
    labels = posteriors.argmax(1)
    centroids = np.empty((n_clusters, z.shape[1]), np.float64)
    for j in range(n_clusters):
        members = labels == j
        # a component that wins no point still has a soft share: its posterior-weighted mean
        weights = members.astype(np.float64) if members.any() else posteriors[:, j]
        centroids[j] = weights @ z / weights.sum()
    return Initialisation(centroids.astype(np.float32), labels.astype(np.int64), posteriors.astype(np.float32))
