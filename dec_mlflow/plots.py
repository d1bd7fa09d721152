"""Figures for evaluation: confusion matrix, cluster sizes, 2-D embedding, most confident images.

Each function builds and returns a matplotlib Figure; logging them is the caller's business.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.manifold import TSNE

from dec_mlflow.metrics import contingency


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray):
    """Contingency table, clusters reordered to their Hungarian-matched classes (rows: clusters)."""
    c = contingency(y_true, y_pred)  # (n_clusters, n_classes)
    rows, cols = linear_sum_assignment(-c)
    order = list(rows[np.argsort(cols)]) + [r for r in range(c.shape[0]) if r not in set(rows)]
    c = c[order]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * c.shape[1], 1 + 0.5 * c.shape[0]))
    ax.imshow(c, cmap="Blues")
    for (i, j), v in np.ndenumerate(c):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > c.max() / 2 else "black")
    ax.set_xticks(range(c.shape[1]), np.unique(y_true))
    ax.set_yticks(range(c.shape[0]), [str(np.unique(y_pred)[r]) for r in order])
    ax.set_xlabel("true class")
    ax.set_ylabel("cluster")
    ax.set_title("Confusion (clusters matched to classes)")
    fig.tight_layout()
    return fig


def cluster_sizes_figure(labels: np.ndarray, n_clusters: int):
    """Bar chart of samples per cluster."""
    sizes = np.bincount(labels, minlength=n_clusters)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n_clusters), 3))
    ax.bar(range(n_clusters), sizes)
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    ax.set_title("Cluster sizes")
    fig.tight_layout()
    return fig


def embedding_figure(z: np.ndarray, labels: np.ndarray, *, random_state: int = 0):
    """Scatter of a 2-D t-SNE of the embedding ``z`` (n, e), coloured by cluster (PCA-initialised)."""
    xy = z if z.shape[1] == 2 else TSNE(2, init="pca", random_state=random_state, perplexity=min(30, len(z) - 1)).fit_transform(z)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20", s=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Embedding, t-SNE of {len(z)} samples, coloured by cluster")
    fig.tight_layout()
    return fig


def top_images_figure(x: np.ndarray, q: np.ndarray, image_shape: tuple[int, ...], n_per_cluster: int = 10):
    """The ``n_per_cluster`` most confident images of each cluster, one row per cluster (paper Fig. 3).

    Parameters
    ----------
    x : ndarray of shape (n_samples, prod(image_shape)), raw pixels
    q : ndarray of shape (n_samples, n_clusters)
    """
    labels = q.argmax(1)
    k = q.shape[1]
    fig, axes = plt.subplots(k, n_per_cluster, figsize=(n_per_cluster * 0.8, k * 0.8), squeeze=False)
    for j in range(k):
        members = np.flatnonzero(labels == j)
        top = members[np.argsort(-q[members, j])[:n_per_cluster]]
        for c, ax in enumerate(axes[j]):
            ax.axis("off")
            if c < len(top):
                ax.imshow(x[top[c]].reshape(image_shape), cmap="gray")
        axes[j][0].set_title(f"cluster {j}", fontsize=6, loc="left")
    fig.suptitle("Most confident members of each cluster")
    fig.tight_layout()
    return fig
