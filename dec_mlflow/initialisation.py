"""Initial clusterings of the pretrained embedding: k-means (the paper) or a manifold clustering (N2D).

NumPy in, NumPy out: the embedding ``z`` (n_samples, embedding_dim) and a seed; no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

INITS = ("manifold", "kmeans")
# N2D (McConville et al. 2020; what was measured: docs/recipe.md, step 4): UMAP with min_dist=0
# packs each cluster tightly; 20 neighbours keep the local structure of digits while joining a class's
# sub-styles, and a full-covariance GMM on the UMAP output follows elongated clusters k-means would cut.
UMAP_NEIGHBORS = 20
# GMM starts on the UMAP map, the best by likelihood kept (label-free). A single start fell into a local
# optimum that merges two digits for 8 of 50 seeds over five MNIST maps (ACC 0.83 against 0.97, always at a
# lower log-likelihood per point); ten cost ~5 s there and raised digits' initial ACC from 0.860 to 0.936
# (BENCHMARKS.md, "Manifold initialisation: GMM starts")
GMM_N_INIT = 10
# Mean squared distance of a point to its initial centroid once the embedding is rescaled. The Student's
# t kernel (alpha=1) is not scale-free: in an embedding 100 times too small every q_ij is 1/k and
# self-training merges clusters. MNIST autoencoders land at 9.3 to 9.4 unscaled (measured on seeds 0
# and 2), the regime DEC's kernel and learning rate were designed in; every embedding is brought there.
WITHIN_CLUSTER_SQ_DIST = 9.0


@dataclass
class Initialisation:
    """A clustering of the embedding that self-training starts from."""

    centroids: np.ndarray  # (n_clusters, embedding_dim) float32, in the embedding
    labels: np.ndarray  # (n_samples,) int64
    posteriors: np.ndarray | None  # (n_samples, n_clusters) float32 soft labels to distil, or None


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


def kmeans_init(z: np.ndarray, n_clusters: int, *, n_init: int, seed: int) -> Initialisation:
    """k-means with ``n_init`` restarts in the embedding (paper section 3.1); no posteriors."""
    km = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(z)
    return Initialisation(km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), None)


def manifold_init(z: np.ndarray, n_clusters: int, *, seed: int, n_neighbors: int = UMAP_NEIGHBORS) -> Initialisation:
    """UMAP of the embedding, then a Gaussian mixture on it (N2D, McConville et al. 2020).

    ``umap_map`` then ``cluster_map``: a full-covariance GMM with ``n_clusters`` components
    clusters the UMAP map of ``z``; the centroids are the mean embedding of each GMM cluster, the
    posteriors the GMM's responsibilities.

    Parameters
    ----------
    z : ndarray of shape (n_samples, embedding_dim)
    n_clusters : int
    seed : int
        Seeds UMAP and the GMM. A fixed seed makes UMAP single-threaded (umap-learn's rule), the
        price of the same result on every run.
    n_neighbors : int, default=20
        UMAP's neighbourhood size, capped at n_samples - 1.
    """
    return cluster_map(z, umap_map(z, n_clusters, seed=seed, n_neighbors=n_neighbors), n_clusters, seed=seed)


def umap_map(z: np.ndarray, n_clusters: int, *, seed: int, n_neighbors: int = UMAP_NEIGHBORS) -> np.ndarray:
    """UMAP of ``z`` to ``min(n_clusters, embedding_dim)`` dimensions (at least 2), ``min_dist=0``.

    Returns
    -------
    ndarray of shape (n_samples, n_components), float64
    """
    try:
        import umap
    except ImportError as e:  # an optional piece: say what to install
        raise ImportError("init='manifold' needs umap-learn: pip install umap-learn (or use init='kmeans')") from e
    n_samples = z.shape[0]
    if n_samples <= n_clusters:
        raise ValueError(f"init='manifold' needs more samples than clusters; got n_samples={n_samples}, n_clusters={n_clusters}")
    n_components = max(2, min(n_clusters, z.shape[1]))
    reducer = umap.UMAP(n_components=n_components, n_neighbors=min(n_neighbors, n_samples - 1), min_dist=0.0,
                        random_state=seed, n_jobs=1, init="spectral" if n_samples > n_components + 1 else "random")
    return reducer.fit_transform(z).astype(np.float64)


def map_gmm(u: np.ndarray, n_clusters: int, *, seed: int, n_init: int = GMM_N_INIT) -> GaussianMixture:
    """The full-covariance Gaussian mixture of ``cluster_map``, fitted to ``u``: the most likely of ``n_init`` starts."""
    return GaussianMixture(n_clusters, covariance_type="full", random_state=seed, reg_covar=1e-4, n_init=n_init).fit(u)


def cluster_map(z: np.ndarray, u: np.ndarray, n_clusters: int, *, seed: int) -> Initialisation:
    """Full-covariance GMM on the map ``u`` (n_samples, m) of ``z``; centroids in ``z``'s space.

    The GMM keeps the most likely of ``GMM_N_INIT`` starts: a single start can merge two clusters.
    """
    gmm = map_gmm(u, n_clusters, seed=seed)
    posteriors = gmm.predict_proba(u)  # (n, k)
    labels = posteriors.argmax(1)
    centroids = np.empty((n_clusters, z.shape[1]), np.float64)
    for j in range(n_clusters):
        members = labels == j
        # a component that wins no point still has a soft share: its posterior-weighted mean
        weights = members.astype(np.float64) if members.any() else posteriors[:, j]
        centroids[j] = weights @ z / weights.sum()
    return Initialisation(centroids.astype(np.float32), labels.astype(np.int64), posteriors.astype(np.float32))
