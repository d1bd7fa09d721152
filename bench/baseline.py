"""The baseline a practitioner tries first: UMAP of the raw features, then a Gaussian mixture.

Fixed settings, whatever the product's own initialisation becomes: images scaled to [0, 1] (divided by
their largest value), tables standardised per feature; `umap.UMAP(n_components=10, n_neighbors=20,
min_dist=0.0, random_state=seed)` (seeded, so one thread); `GaussianMixture(k, covariance_type="full",
n_init=10, random_state=seed)`, the most likely of its ten starts kept.

    python bench/baseline.py digits 0      # prints ACC, NMI and seconds
"""

from __future__ import annotations

import sys
import time

import numpy as np


def umap_gmm(x: np.ndarray, n_clusters: int, *, image: bool, seed: int) -> np.ndarray:
    """Labels of the baseline on raw ``x`` (n_samples, n_features): (n_samples,) int64."""
    import umap
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, np.float64)
    features = x / x.max() if image else StandardScaler().fit_transform(x)
    u = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, random_state=seed).fit_transform(features)
    gmm = GaussianMixture(n_clusters, covariance_type="full", n_init=10, random_state=seed).fit(u)
    return gmm.predict(u).astype(np.int64)


def load_light(dataset: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, y, is_image) read with numpy and scikit-learn alone, as a practitioner's script would: MNIST from the
    IDX files under $DEC_DATA_DIR/mnist, the rest from bench_quality's loaders."""
    import gzip
    import os
    from pathlib import Path

    if dataset in ("mnist", "mnist_test"):
        folder = Path(os.environ["DEC_DATA_DIR"]) / "mnist"

        def idx(name: str, offset: int) -> np.ndarray:
            return np.frombuffer(gzip.open(folder / name).read(), np.uint8, offset=offset)

        parts = ["t10k"] if dataset == "mnist_test" else ["train", "t10k"]
        x = np.concatenate([idx(f"{p}-images-idx3-ubyte.gz", 16).reshape(-1, 784) for p in parts]).astype(np.float32)
        y = np.concatenate([idx(f"{p}-labels-idx1-ubyte.gz", 8) for p in parts]).astype(np.int64)
        return x, y, True
    from bench_quality import IMAGE_SHAPES, load

    x, y = load(dataset)
    return x, y, dataset in IMAGE_SHAPES


def main() -> None:
    dataset, seed = sys.argv[1], int(sys.argv[2])
    x, y, image = load_light(dataset)
    start = time.perf_counter()
    labels = umap_gmm(x, len(np.unique(y)), image=image, seed=seed)
    seconds = time.perf_counter() - start
    from sklearn.metrics import normalized_mutual_info_score
    from scipy.optimize import linear_sum_assignment

    count = np.zeros((labels.max() + 1, y.max() + 1), np.int64)
    np.add.at(count, (labels, y), 1)
    rows, cols = linear_sum_assignment(-count)
    acc = count[rows, cols].sum() / len(y)
    print(f"{dataset} seed {seed}: ACC {acc:.4f} NMI {normalized_mutual_info_score(y, labels):.4f} in {seconds:.1f} s "
          "(UMAP + GMM; the process's whole time includes loading)")


if __name__ == "__main__":
    main()
