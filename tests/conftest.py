"""Fixtures shared across concerns: small blob data and a DEC fitted on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from dec_mlflow import DEC

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BLOB_FEATURES, BLOB_CLUSTERS = 20, 4
# A network small enough that a fit takes a second or two.
SMALL = dict(n_clusters=BLOB_CLUSTERS, hidden_dims=(32, 16, 4), pretrain_epochs=20, pretrain_lr=0.1, update_interval=10,
             batch_size=64, pretrain_batch_size=64, n_init=5, precision="fp32", scaling="standard")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matmuls run much faster on one thread than with two threads contending on a busy machine."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="session")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (600, 20), y (600,)): four well-separated clusters."""
    x, y = make_blobs(600, n_features=BLOB_FEATURES, centers=BLOB_CLUSTERS, cluster_std=1.0, random_state=0)
    return x.astype(np.float32), y


@pytest.fixture(scope="session")
def fitted(blobs) -> DEC:
    """DEC fitted on ``blobs`` with the SMALL settings."""
    return DEC(**SMALL).fit(blobs[0])


@pytest.fixture
def mnist_dir() -> Path:
    """The official MNIST .gz files: under $DEC_DATA_DIR if set, else the repo's sibling shared/data.

    Skips where they are absent: tests must not download (no network here)."""
    root = Path(os.environ.get("DEC_DATA_DIR") or SHARED_DATA)
    if not (root / "mnist").is_dir():
        pytest.skip(f"no MNIST files under {root}")
    return root / "mnist"
