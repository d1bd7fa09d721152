"""Figures for evaluation (confusion matrix, cluster sizes, 2-D embedding, most confident images)
and for self-training (embedding over iterations, label change / loss / accuracy curves, gradient
magnitude against soft assignment), the latter from a :class:`~dec_mlflow.callbacks.SelfTrainRecorder`.

Each function builds and returns a matplotlib Figure; logging them is the caller's business. No
input makes one fail: an embedding that t-SNE cannot lay out (no spread, NaN) gets a panel saying
so instead, with a :class:`FigureWarning` that the caller can report.
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.manifold import TSNE

from dec_mlflow.metrics import contingency


class FigureWarning(UserWarning):
    """A figure was drawn simplified because its data cannot be drawn as asked (e.g. a degenerate embedding)."""


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
    """Scatter of a 2-D t-SNE of the embedding ``z`` (n, e), coloured by cluster (PCA-initialised).

    An embedding t-SNE cannot lay out gets a panel saying why, and a :class:`FigureWarning`.
    """
    fig, ax = plt.subplots(figsize=(6, 6))
    xy = _tsne(z, random_state)
    if xy is None:
        _no_layout(ax, z)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=_cmap(labels.max() + 1), s=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Embedding, t-SNE of {len(z)} samples, coloured by cluster")
    fig.tight_layout()
    return fig


def embedding_problem(z: np.ndarray) -> str | None:
    """Why t-SNE cannot lay out the points ``z`` (n, e), or None when it can.

    Non-finite values; fewer than 3 points; or no spread: every point the same up to float32 rounding.
    scikit-learn's t-SNE starts from PCA scaled by the first component's spread, which is then 0,
    and its Barnes-Hut tree crashes the whole process (segmentation fault) on the NaN start.
    """
    z = np.asarray(z, dtype=np.float64)
    n_bad = int((~np.isfinite(z)).sum())
    if n_bad:
        return f"the embedding has {n_bad} NaN or infinite values"
    if len(z) < 3:
        return f"{len(z)} points are too few for t-SNE"
    spread = np.sqrt(np.square(z - z.mean(0)).sum(1).mean())  # RMS distance to the mean
    if spread <= 1e-6 * np.abs(z).max():  # also when all are 0
        return f"all {len(z)} points share one embedding (no spread)"
    return None


def _tsne(z: np.ndarray, random_state: int) -> np.ndarray | None:
    """2-D t-SNE of ``z`` (n, e), PCA-initialised so the layout is stable; ``z`` itself if already 2-D.

    None, with a :class:`FigureWarning`, when :func:`embedding_problem` finds a reason not to run it.
    """
    problem = embedding_problem(z)
    if problem is not None:
        warnings.warn(f"{problem}; t-SNE skipped", FigureWarning, stacklevel=3)
        return None
    if z.shape[1] == 2:
        return z
    # t-SNE's affinities do not depend on the embedding's scale (perplexity fixes each point's bandwidth); scaled to
    # unit spread in float64, PCA's start stays finite even for values near float32's limit
    z = np.asarray(z, dtype=np.float64)
    z = (z - z.mean(0)) / z.std()
    return TSNE(2, init="pca", random_state=random_state, perplexity=min(30, len(z) - 1)).fit_transform(z)


def _no_layout(ax, z: np.ndarray) -> None:
    """In place of a t-SNE panel: the reason there is none."""
    ax.text(0.5, 0.5, f"no t-SNE:\n{embedding_problem(z)}", ha="center", va="center", wrap=True,
            transform=ax.transAxes, fontsize=8)


def _cmap(n_colors: int) -> str:
    """A qualitative colormap with enough distinct colours (tab20 repeats colours past 20)."""
    return "tab10" if n_colors <= 10 else "tab20"


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


def embedding_snapshots_figure(snapshots, y: np.ndarray | None = None, n_panels: int = 4, random_state: int = 0):
    """The subsample's embedding at evenly spaced target updates, one t-SNE panel each (cf. paper Fig. 3).

    Panels are the first and the last snapshot and ``n_panels - 2`` evenly spaced between them
    (fewer when fewer were recorded; only the last when ``n_panels=1``). Each panel runs its own
    t-SNE (PCA init, ``random_state``), so a panel depends only on its snapshot and the seed; t-SNE
    axes are arbitrary, so compare cluster shapes, not positions, across panels.

    Parameters
    ----------
    snapshots : list of (int, ndarray of shape (m, d), ndarray of shape (m,))
        ``(step, z, labels)`` as in :attr:`SelfTrainRecorder.snapshots`.
    y : ndarray of shape (m,), optional
        True classes of the subsample; points are coloured by class if given, else by cluster.
    n_panels : int
        Number of panels, >= 1.
    random_state : int
        Seed of every panel's t-SNE.
    """
    if n_panels < 1:
        raise ValueError(f"n_panels must be >= 1; got n_panels={n_panels}")
    if len(snapshots) == 0:
        raise ValueError("snapshots is empty; record at least one target update")
    m = len(snapshots[0][1])
    if y is not None and np.shape(y) != (m,):
        raise ValueError(f"y must have shape (m,) = ({m},) like the snapshots; got {np.shape(y)}")
    chosen = [snapshots[i] for i in _evenly_spaced(len(snapshots), n_panels)]
    # One colour code for all panels, so a class or cluster keeps its colour from panel to panel.
    codes = [np.unique(y, return_inverse=True)[1]] * len(chosen) if y is not None else [lab for _, _, lab in chosen]
    n_colors = int(max(c.max() for c in codes)) + 1
    fig, axes = plt.subplots(1, len(chosen), figsize=(3 * len(chosen), 3.3), squeeze=False)
    for ax, (step, z, _), c in zip(axes[0], chosen, codes):
        xy = _tsne(np.asarray(z), random_state)
        if xy is None:
            _no_layout(ax, np.asarray(z))
        else:
            ax.scatter(xy[:, 0], xy[:, 1], c=c, cmap=_cmap(n_colors), vmin=0, vmax=max(n_colors - 1, 1), s=3)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"iteration {step}")
    fig.suptitle(f"Embedding during self-training, t-SNE of {m} samples, coloured by {'class' if y is not None else 'cluster'}")
    fig.tight_layout()
    return fig


def _evenly_spaced(n_items: int, n_panels: int) -> list[int]:
    """Indices of ``min(n_panels, n_items)`` items evenly spaced from the first to the last."""
    if n_panels == 1:
        return [n_items - 1]  # a single panel shows where self-training ended
    # floor(x + 0.5) rounds halves up; with spacing >= 1 the indices are distinct.
    return np.floor(np.linspace(0, n_items - 1, min(n_panels, n_items)) + 0.5).astype(int).tolist()


def self_training_curves_figure(history: dict, tol: float | None = None):
    """Label change, and KL loss and accuracy when recorded, against the self-training iteration.

    Parameters
    ----------
    history : dict of str to list
        ``"step"`` and ``"delta_label"``, optionally ``"kl_loss"`` and ``"accuracy"``, one entry per
        target update, as in :attr:`SelfTrainRecorder.history`.
    tol : float, optional
        The stopping threshold on the label change, drawn as a horizontal line.

    Returns
    -------
    Figure with one axis per series (delta_label, then kl_loss, then accuracy), sharing x.
    """
    for key in ("step", "delta_label"):
        if key not in history:
            raise ValueError(f"history must have the key {key!r}; got keys {sorted(history)}")
    steps = np.asarray(history["step"])
    series = [key for key in ("delta_label", "kl_loss", "accuracy") if key in history]
    for key in series:
        if len(history[key]) != len(steps):
            raise ValueError(f"history[{key!r}] has {len(history[key])} entries for {len(steps)} steps")
    fig, axes = plt.subplots(len(series), 1, sharex=True, figsize=(6, 1 + 1.8 * len(series)), squeeze=False)
    axes = axes[:, 0]
    _plot_delta_label(axes[0], steps, np.asarray(history["delta_label"], dtype=float), tol)
    labels = {"kl_loss": r"KL$(P\,\|\,Q)$", "accuracy": "accuracy"}
    for ax, key in zip(axes[1:], series[1:]):
        ax.plot(steps, history[key], ".-")
        ax.set_ylabel(labels[key])
    axes[-1].set_xlabel("iteration")
    axes[0].set_title("Self-training")
    fig.tight_layout()
    return fig


def _plot_delta_label(ax, steps: np.ndarray, delta: np.ndarray, tol: float | None) -> None:
    """Fraction of labels changed per update on a log axis; updates with no change get a marker at the bottom."""
    positive = delta > 0
    ax.plot(steps[positive], delta[positive], ".-", label="labels changed")
    ax.set_yscale("log")
    if (~positive).any():
        # log(0) has no place on the axis; mark those updates along its lower edge instead.
        ax.plot(steps[~positive], np.zeros((~positive).sum()), "v", color="C0", clip_on=False,
                transform=ax.get_xaxis_transform(), label="no label changed")
    if tol is not None:
        ax.axhline(tol, color="C3", linestyle="--", label=f"tol = {tol:g}")
    ax.set_ylabel("delta_label")
    ax.legend(fontsize=7)


def gradient_vs_q_figure(q: np.ndarray, grad_norm: np.ndarray, cluster: int | None = None):
    """Gradient magnitude |dL/dz_i| of each point against its soft assignment q_ij to one cluster (paper Fig. 4).

    Points assigned to the cluster (argmax_j q_ij = cluster) are coloured, the others grey.

    Parameters
    ----------
    q : ndarray of shape (n, n_clusters)
    grad_norm : ndarray of shape (n,)
        |dL/dz_i|, e.g. :attr:`SelfTrainRecorder.gradient` ``["grad_norm"]``.
    cluster : int, optional
        The cluster j; default the largest cluster by argmax.
    """
    q, grad_norm = np.asarray(q), np.asarray(grad_norm)
    if q.ndim != 2 or grad_norm.shape != (q.shape[0],):
        raise ValueError(f"q must be (n, n_clusters) and grad_norm (n,); got {q.shape} and {grad_norm.shape}")
    labels = q.argmax(1)
    k = q.shape[1]
    j = int(np.bincount(labels, minlength=k).argmax()) if cluster is None else cluster
    if not 0 <= j < k:
        raise ValueError(f"cluster must be in [0, {k}) for q with {k} clusters; got cluster={cluster}")
    member = labels == j
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(q[~member, j], grad_norm[~member], s=4, color="0.7", label="other clusters")
    ax.scatter(q[member, j], grad_norm[member], s=4, color="C0", label=f"cluster {j}")
    ax.set_xlabel(rf"$q_{{ij}}$, soft assignment to cluster $j={j}$")
    ax.set_ylabel(r"$\|\partial L / \partial z_i\|$")
    ax.set_title(f"Gradient vs soft assignment ({len(q)} samples)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def k_sweep_figure(table, recommended: int):
    """Generalizability G and (if present) the valley depth in the map and validation NMI against k (the paper's Figure 6).

    ``table`` has columns 'k', 'generalizability' and optionally 'map_valley_depth' and 'val_nmi'.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(table["k"], table["generalizability"], "o-", color="tab:blue", label="G = KL_train / KL_validation")
    ax.set_xlabel("number of clusters k")
    ax.set_ylabel("generalizability G", color="tab:blue")
    ax.axvline(recommended, color="gray", linestyle="--", label=f"recommended k = {recommended}")
    if "val_nmi" in table or "map_valley_depth" in table:
        twin = ax.twinx()
        if "map_valley_depth" in table:
            twin.plot(table["k"], table["map_valley_depth"], "^-", color="tab:green", label="valley depth of the k-th cut (map)")
        if "val_nmi" in table:
            twin.plot(table["k"], table["val_nmi"], "s-", color="tab:orange", label="NMI (validation)")
        twin.set_ylabel("valley depth (map) / NMI (validation)")
        twin.legend(loc="lower right", fontsize=8)
    ax.set_xticks(list(table["k"]))
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Choosing k")
    fig.tight_layout()
    return fig


def k_selection_figure(scores: dict[int, float], chosen: int, threshold: float, supported: int):
    """n_clusters='auto': the valley depth of the cut that made the k-th cluster (``scores``), the ``threshold`` a
    cut must stay below (``dec_mlflow.initialisation.VALLEY_DEPTH``) and the ``chosen`` k marked; when it differs
    from the clusters the cuts below the threshold make (``supported``: ``dec_mlflow.initialisation.supported_cuts``),
    through hidden valleys or the range k_min..k_max, the legend gives that number too."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ks = sorted(scores)
    ax.plot(ks, [scores[k] for k in ks], "o-", color="tab:blue")
    label = f"chosen k = {chosen}"
    if chosen != supported:
        label += f" (cuts below the line make {supported})"
    ax.axvline(chosen, color="gray", linestyle="--", label=label)
    ax.set_xlabel("number of clusters k")
    ax.axhline(threshold, color="tab:red", linestyle=":", label=f"a cut counts below {threshold}")
    ax.set_ylabel("valley depth of the k-th cut")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ks)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("n_clusters = auto")
    fig.tight_layout()
    return fig


def imbalance_figure(table):
    """Accuracy of each method against the retention rate r_min of the smallest class (Table 4).

    ``table`` has columns 'r_min', 'method' and 'acc'.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("r_min")
        ax.plot(rows["r_min"], rows["acc"], "o-", label=method)
    ax.set_xlabel("r_min (retention of the first class; the last keeps all)")
    ax.set_ylabel("ACC")
    ax.legend(fontsize=8)
    ax.set_title("Imbalanced subsamples")
    fig.tight_layout()
    return fig
