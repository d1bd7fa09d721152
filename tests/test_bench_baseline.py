"""The benchmark's UMAP + GMM baseline (bench/baseline.py) runs and clusters: its code path on small data."""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs

from dec_mlflow.metrics import cluster_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
baseline = pytest.importorskip("baseline")


def test_the_baseline_clusters_digit_images():
    x, y = load_digits(return_X_y=True)
    labels = baseline.umap_gmm(x[:600], 10, image=True, seed=0)
    assert labels.shape == (600,) and labels.dtype == np.int64
    assert cluster_accuracy(y[:600], labels) > 0.8


def test_the_baseline_standardises_tables_and_is_seeded():
    x, y = make_blobs(300, n_features=6, centers=3, random_state=0)
    x[:, 0] *= 1000.0  # one column in other units: standardising keeps it from drowning the rest
    a = baseline.umap_gmm(x, 3, image=False, seed=1)
    np.testing.assert_array_equal(a, baseline.umap_gmm(x, 3, image=False, seed=1))
    assert cluster_accuracy(y, a) == 1.0


def test_the_baseline_reads_mnist_from_the_idx_files(monkeypatch):
    import os

    if not (Path(os.environ.get("DEC_DATA_DIR", "/nonexistent")) / "mnist").is_dir():
        pytest.skip("DEC_DATA_DIR/mnist is not here")
    x, y, image = baseline.load_light("mnist_test")
    assert x.shape == (10000, 784) and y.shape == (10000,) and image and x.max() == 255
