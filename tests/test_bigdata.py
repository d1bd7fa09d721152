"""Data larger than memory: memory-mapped .npy, parquet read by record batches, sparse REUTERS-like input.

Each streamed path must give the in-memory path's result, and must never hold the dense matrix whole.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from scipy import sparse

from dec_mlflow import DEC, rows, trust
from dec_mlflow.data import load_dataset
from dec_mlflow.pretraining import selection_criteria
from dec_mlflow.rows import MappedRows, ScaledRows, scaled
from dec_mlflow.scaling import auto_scaling, fit_scaling
from dec_mlflow.tracking import data_digest

from conftest import SMALL

FAST = {**SMALL, "init": "kmeans", "pretrain_epochs": 5, "max_iter": 60}


def _sparse_blobs(blobs) -> np.ndarray:
    """The blobs with small values set to zero, so that a CSR copy is really sparse (about 70 % zeros)."""
    x = blobs[0]
    return np.where(np.abs(x) < 4.0, 0.0, x).astype(np.float32)


def _as(kind: str, x: np.ndarray, tmp_path):
    """``x`` as loaded from a .npy (memory map) or .parquet (spill), or as a CSR matrix."""
    if kind == "npy":
        np.save(tmp_path / "x.npy", x)
        return load_dataset(str(tmp_path / "x.npy")).x
    if kind == "parquet":
        pd.DataFrame(x, columns=[f"f{j}" for j in range(x.shape[1])]).to_parquet(tmp_path / "x.parquet", row_group_size=97)
        return load_dataset(str(tmp_path / "x.parquet")).x
    return sparse.csr_matrix(x)


# ---------------------------------------------------------------- loading
def test_npy_is_memory_mapped_and_parquet_spilled_to_a_memory_map(tmp_path, blobs):
    for kind in ("npy", "parquet"):
        x = _as(kind, blobs[0], tmp_path)
        assert isinstance(x, np.memmap) and x.dtype == np.float32 and not x.flags.writeable
        np.testing.assert_array_equal(x, blobs[0])


def test_parquet_is_read_a_record_batch_at_a_time(tmp_path, monkeypatch):
    frame = pd.DataFrame({"a": np.arange(1000.0), "b": np.ones(1000), "y": np.arange(1000) % 3})
    frame.to_parquet(tmp_path / "t.parquet", row_group_size=100)
    monkeypatch.setattr(rows, "CHUNK_BYTES", 8 * 64)  # 64 rows of 2 float32 features per record batch
    seen = []
    original = pd.DataFrame.to_numpy
    monkeypatch.setattr(pd.DataFrame, "to_numpy", lambda self, *a, **k: seen.append(len(self)) or original(self, *a, **k))
    ds = load_dataset(str(tmp_path / "t.parquet"), label_column="y")
    assert max(seen) == 64 and sum(seen) == 1000
    np.testing.assert_array_equal(ds.x, frame[["a", "b"]].to_numpy(np.float32))
    np.testing.assert_array_equal(ds.y, frame["y"])


def test_parquet_non_finite_value_is_reported_with_its_column(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.0, np.nan, 1.0]})
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"found 1 NaN or infinite values .* in 'b' \(1\)"):
        load_dataset(str(tmp_path / "t.parquet"))


def test_npy_of_another_dtype_becomes_a_float32_memory_map(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(6, dtype=np.int64).reshape(3, 2))
    x = load_dataset(str(tmp_path / "f.npy")).x
    assert isinstance(x, np.memmap) and x.dtype == np.float32
    np.testing.assert_array_equal(x, [[0, 1], [2, 3], [4, 5]])


def test_digest_is_that_of_the_dense_matrix_whatever_the_representation(tmp_path, blobs, monkeypatch):
    x = _sparse_blobs(blobs)
    monkeypatch.setattr(rows, "CHUNK_BYTES", 4 * 20 * 50)  # 50 rows per chunk
    digests = {kind: data_digest(_as(kind, x, tmp_path)) for kind in ("npy", "parquet", "sparse")}
    assert set(digests.values()) == {data_digest(x)}


# ---------------------------------------------------------------- streamed passes give the in-memory results
@pytest.mark.parametrize("kind", ["npy", "parquet", "sparse"])
def test_statistics_in_many_chunks_match_the_in_memory_ones(tmp_path, blobs, monkeypatch, kind):
    x = _sparse_blobs(blobs)
    streamed = _as(kind, x, tmp_path)
    monkeypatch.setattr(rows, "CHUNK_BYTES", 4 * 20 * 50)  # 12 chunks of 50 rows
    assert auto_scaling(streamed) == auto_scaling(x) == "standard"
    nonneg = np.abs(x)
    assert auto_scaling(sparse.csr_matrix(nonneg)) == auto_scaling(nonneg)
    for scaling in ("max", "standard", "none"):
        for got, want in zip(fit_scaling(streamed, scaling), fit_scaling(x, scaling)):
            np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["npy", "parquet", "sparse"])
def test_fit_on_streamed_data_equals_the_in_memory_fit(tmp_path, blobs, kind):
    x = _sparse_blobs(blobs)
    streamed = _as(kind, x, tmp_path)
    in_memory, out_of_core = DEC(**FAST).fit(x), DEC(**FAST).fit(streamed)
    np.testing.assert_array_equal(out_of_core.labels_, in_memory.labels_)
    np.testing.assert_allclose(out_of_core.cluster_centers_, in_memory.cluster_centers_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_of_core.transform(streamed), in_memory.transform(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_of_core.predict(streamed), in_memory.predict(x))
    assert out_of_core.trust_scores_ == pytest.approx(in_memory.trust_scores_, rel=1e-5)


def test_layerwise_pretraining_on_streamed_data_matches_in_memory(tmp_path, blobs):
    est = DEC(**{**FAST, "pretrain_mode": "layerwise", "layerwise_epochs": 2, "pretrain_epochs": 2})
    in_memory, out_of_core = est.pretrain(blobs[0]), est.pretrain(_as("npy", blobs[0], tmp_path))
    assert out_of_core.loss == pytest.approx(in_memory.loss, rel=1e-4)
    for a, b in zip(out_of_core.autoencoder.parameters(), in_memory.autoencoder.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_selection_criteria_on_streamed_data_match_in_memory(tmp_path, blobs):
    ae = DEC(**FAST).pretrain(blobs[0])
    streamed = _as("sparse", blobs[0], tmp_path)
    got = selection_criteria(ae, streamed, 4, n_init=2, seed=0)
    assert got == pytest.approx(selection_criteria(ae, blobs[0], 4, n_init=2, seed=0), rel=1e-5)


def test_scaled_rows_index_like_the_scaled_tensor(tmp_path, blobs):
    x = blobs[0]
    offset, scale = fit_scaling(x, "standard")
    tensor, lazy = scaled(x, offset, scale, torch.device("cpu")), scaled(_as("npy", x, tmp_path), offset, scale, torch.device("cpu"))
    assert isinstance(tensor, torch.Tensor) and isinstance(lazy, ScaledRows)
    assert lazy.shape == tensor.shape and lazy.numel() == tensor.numel()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:77]
    torch.testing.assert_close(lazy[idx], tensor[idx], rtol=0, atol=0)  # the same float32 arithmetic
    torch.testing.assert_close(lazy[10:30], tensor[10:30], rtol=0, atol=0)
    layer = torch.nn.Linear(20, 3)
    mapped = MappedRows(lazy, layer)
    assert mapped.shape == (600, 3)
    torch.testing.assert_close(mapped[idx], layer(tensor[idx]).detach())


@pytest.mark.parametrize("kind", ["npy", "sparse"])
@pytest.mark.parametrize("scaling", ["max", "standard"])
def test_scaled_rows_are_bit_identical_with_and_without_an_offset(tmp_path, blobs, kind, scaling):
    # 'max' has no offset and skips the subtraction; 'standard' subtracts: both must equal (x - offset) * scale
    x = _sparse_blobs(blobs)
    offset, scale = fit_scaling(x, scaling)
    assert offset.any() == (scaling == "standard")
    tensor, lazy = scaled(x, offset, scale, torch.device("cpu")), scaled(_as(kind, x, tmp_path), offset, scale, torch.device("cpu"))
    idx = torch.tensor([599, 3, 3, 250, 0, 17])  # unsorted, a repeat, both ends
    for got, want in ((lazy[idx], tensor[idx]), (lazy[100:357], tensor[100:357]), (lazy[590:700], tensor[590:])):
        assert got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------- the dense matrix is never held whole
def _peak_traced_bytes(fn) -> int:
    """Peak of the bytes traced by tracemalloc (NumPy's allocations among them) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _big_blobs(n: int, d: int, density: float) -> np.ndarray:
    """(n, d) float32: 4 clusters of non-negative values, a fraction ``density`` of them non-zero."""
    rng = np.random.default_rng(0)
    centres = rng.random((4, d), dtype=np.float32) * 4
    x = centres[rng.integers(0, 4, n)] + rng.random((n, d), dtype=np.float32)
    return np.where(rng.random((n, d), dtype=np.float32) < density, x, np.float32(0))


@pytest.mark.parametrize("kind", ["npy", "sparse"])
def test_loading_and_fitting_never_hold_the_dense_matrix(tmp_path, monkeypatch, kind):
    n, d = 50_000, 640  # 128 MB as dense float32; a batch of 4,096 rows is 10 MB
    dense_bytes = n * d * 4
    x = _big_blobs(n, d, density=1.0 if kind == "npy" else 0.02)
    if kind == "npy":
        np.save(tmp_path / "big.npy", x)
        source = lambda: load_dataset(str(tmp_path / "big.npy")).x  # noqa: E731
    else:
        matrix = sparse.csr_matrix(x)
        source = lambda: matrix  # noqa: E731
    del x
    monkeypatch.setattr(rows, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(trust, "MAP_SAMPLE", 500)  # the trust score's map: a sample whose size does not grow with n
    est = DEC(n_clusters=4, hidden_dims=(16, 4), pretrain_epochs=1, pretrain_batch_size=1024, pretrain_lr=0.1,
              batch_size=1024, update_interval=20, max_iter=40, init="kmeans", n_init=1, precision="fp32",
              scaling="max")
    est.fit(source()[:2000])  # imports what the first fit imports, whose objects tracemalloc would count
    # control: the measure sees a dense copy when one is made
    assert _peak_traced_bytes(lambda: np.asarray(source().toarray() if kind == "sparse" else np.array(source()))) >= dense_bytes
    fitted = {}
    # sklearn's silhouette (a trust score, on 5,000 points whatever n) takes ~140 MB of distances at its default
    # working memory; bounded here, since that cost does not grow with the data
    with sklearn.config_context(working_memory=8):
        peak = _peak_traced_bytes(lambda: fitted.update(est=est.fit(source())))
    assert peak < dense_bytes / 4, f"peak {peak / 1e6:.0f} MB traced for {dense_bytes / 1e6:.0f} MB of data"
    assert fitted["est"].labels_.shape == (n,) and np.isfinite(fitted["est"].kl_loss_)
