"""Data loading: user file formats, validation errors, MNIST from disk, and the download cache."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dec_mlflow import data
from dec_mlflow.data import KNOWN_DATASETS, DataError, Dataset, data_dirs, load_dataset

LABELS_SPEC = next(s for s in data._REGISTRY["mnist"].files if s.filename == "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache, with $DEC_DATA_DIR unset so only the cache is searched."""
    monkeypatch.delenv("DEC_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "dec_mlflow"


@pytest.fixture
def mirror(tmp_path, mnist_dir) -> Path:
    """A file:// mirror directory serving a copy of the official t10k labels."""
    root = tmp_path / "mirror"
    root.mkdir()
    shutil.copy(mnist_dir / LABELS_SPEC.filename, root)
    return root


# --- user files -------------------------------------------------------------------------------


def test_csv_string_label_column_is_removed_and_encoded_in_sorted_order(tmp_path):
    path = tmp_path / "blobs.csv"
    frame = pd.DataFrame({"a": [1, 2, 3, 4], "kind": ["dog", "cat", "emu", "cat"], "b": [0.5, 1.5, 2.5, 3.5]})
    frame.to_csv(path, index=False)
    ds = load_dataset(str(path), label_column="kind")
    assert ds.name == "blobs" and ds.image_shape is None and ds.default_scaling == "auto"
    assert ds.x.dtype == np.float32 and ds.x.shape == (4, 2)
    np.testing.assert_array_equal(ds.x[:, 1], [0.5, 1.5, 2.5, 3.5])
    assert ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.y, [1, 0, 2, 0])  # cat=0, dog=1, emu=2


def test_csv_without_label_column_has_no_labels(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(path, index=False)
    ds = load_dataset(str(path))
    assert ds.y is None
    np.testing.assert_array_equal(ds.x, [[1, 3], [2, 4]])


def test_parquet_categorical_labels_and_integer_labels(tmp_path):
    path = tmp_path / "t.parquet"
    frame = pd.DataFrame({"f": np.arange(3.0), "c": pd.Categorical(["b", "a", "b"]), "k": [7, 3, 7]})
    frame.to_parquet(path)
    by_category = load_dataset(str(path), label_column="c")
    assert by_category.x.shape == (3, 2) and by_category.x.dtype == np.float32  # f and k stay features
    np.testing.assert_array_equal(by_category.y, [1, 0, 1])
    frame.drop(columns="c").to_parquet(path)
    by_integer = load_dataset(str(path), label_column="k")
    assert by_integer.x.shape == (3, 1)
    np.testing.assert_array_equal(by_integer.y, [7, 3, 7])  # integer labels keep their values


def test_npz_with_and_without_labels(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "with.npz", x=x, y=np.array([3, 1, 3, 2]))
    np.savez(tmp_path / "without.npz", x=x)
    np.savez(tmp_path / "keyed.npz", x=x, target=np.array(["b", "a", "b", "c"]))
    with_y = load_dataset(str(tmp_path / "with.npz"))
    assert with_y.x.dtype == np.float32 and with_y.x.shape == (4, 3)
    assert with_y.y.dtype == np.int64
    np.testing.assert_array_equal(with_y.y, [3, 1, 3, 2])  # integer labels keep their values
    assert load_dataset(str(tmp_path / "without.npz")).y is None
    keyed = load_dataset(str(tmp_path / "keyed.npz"), label_column="target")
    np.testing.assert_array_equal(keyed.y, [1, 0, 1, 2])


def test_npy_loads_features_only(tmp_path):
    np.save(tmp_path / "feats.npy", np.ones((5, 2), dtype=np.int32))
    ds = load_dataset(str(tmp_path / "feats.npy"), n_clusters=5)
    assert ds.name == "feats" and ds.y is None
    assert ds.x.dtype == np.float32 and ds.x.shape == (5, 2)


# --- validation errors ------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset '.*foo\.csv': no such file"):
        load_dataset(str(tmp_path / "foo.csv"))


@pytest.mark.parametrize("dataset", ["mnst", "table.txt"])
def test_unknown_name_or_extension_lists_choices(dataset):
    with pytest.raises(DataError, match=rf"dataset '{dataset}' is not known; choose one of mnist, reuters, reuters10k, stl10, digits, wine, "
                                        r"breast_cancer, iris, "
                                        r"or give a path to a \.npy/\.npz/\.csv/\.parquet file"):
        load_dataset(dataset)


def test_absent_label_column_lists_available_columns(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(path, index=False)
    message = r"t\.csv': label_column 'label' not found; available columns: 'a', 'b'"
    with pytest.raises(DataError, match=message):
        load_dataset(str(path), label_column="label")


def test_absent_npz_arrays_are_named(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.ones((3, 2)))
    np.savez(tmp_path / "b.npz", x=np.ones((3, 2)))
    with pytest.raises(DataError, match=r"a\.npz': no array 'x'; arrays present: features"):
        load_dataset(str(tmp_path / "a.npz"))
    with pytest.raises(DataError, match=r"b\.npz': no array 'labels'; arrays present: x"):
        load_dataset(str(tmp_path / "b.npz"), label_column="labels")


def test_label_column_on_npy_is_rejected(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((3, 2)))
    with pytest.raises(DataError, match=r"a \.npy file holds no labels, so label_column='y' cannot apply"):
        load_dataset(str(tmp_path / "f.npy"), label_column="y")


def test_non_numeric_feature_columns_are_named(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2], "city": ["x", "y"], "b": [1, 2], "kind": ["p", "q"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"feature columns must be numeric; non-numeric: 'city', 'kind'"):
        load_dataset(str(path))


def test_nan_and_inf_are_counted_per_column(tmp_path):
    path = tmp_path / "t.csv"
    frame = pd.DataFrame({"a": [1.0, np.nan, np.nan], "b": [1.0, 2.0, 3.0], "c": [np.inf, 0.0, 0.0]})
    frame.to_csv(path, index=False)
    message = r"t\.csv': features must be finite; found 3 NaN or infinite values .* in 'a' \(2\), 'c' \(1\)"
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_nan_in_array_names_the_feature_index(tmp_path):
    x = np.zeros((4, 3))
    x[1, 2] = np.nan
    np.save(tmp_path / "f.npy", x)
    with pytest.raises(DataError, match=r"found 1 NaN or infinite values .* in feature 2 \(1\)"):
        load_dataset(str(tmp_path / "f.npy"))


def test_values_overflowing_float32_are_reported_as_infinite(tmp_path):
    np.save(tmp_path / "big.npy", np.array([[1.0], [1e300]]))
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match=r"found 1 NaN or infinite values"):
        load_dataset(str(tmp_path / "big.npy"))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((0, 3), r"empty, x has shape \(0, 3\); need at least 1 sample and 1 feature"),
        ((4, 0), r"empty, x has shape \(4, 0\)"),
        ((5,), r"x should be 2-D \(n_samples, n_features\), got 1-D with shape \(5,\)"),
        ((2, 3, 4), r"x should be 2-D \(n_samples, n_features\), got 3-D with shape \(2, 3, 4\)"),
    ],
)
def test_bad_array_shapes(tmp_path, shape, message):
    np.save(tmp_path / "f.npy", np.zeros(shape))
    with pytest.raises(DataError, match=r"dataset '.*f\.npy': " + message):
        load_dataset(str(tmp_path / "f.npy"))


def test_empty_csv_table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"t\.csv': empty, x has shape \(0, 2\)"):
        load_dataset(str(path))


def test_fewer_samples_than_clusters(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((5, 2)))
    with pytest.raises(DataError, match=r"n_samples=5 should be >= n_clusters=10"):
        load_dataset(str(tmp_path / "f.npy"), n_clusters=10)


def test_label_length_mismatch(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((5, 2)), y=np.arange(4))
    message = r"f\.npz': labels should have shape \(n_samples,\) = \(5,\), got \(4,\)"
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "f.npz"))


def test_missing_labels_are_counted(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2, 3], "kind": ["x", None, "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"labels must not be missing; found 1 missing"):
        load_dataset(str(path), label_column="kind")


def test_unreadable_file_names_the_dataset(tmp_path):
    (tmp_path / "f.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"f\.npy': cannot read \.npy file"):
        load_dataset(str(tmp_path / "f.npy"))


# --- MNIST ------------------------------------------------------------------------------------


def test_data_dirs_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DEC_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert data_dirs() == [tmp_path / "d", tmp_path / "c" / "dec_mlflow"]
    monkeypatch.delenv("DEC_DATA_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_dirs() == [Path.home() / ".cache" / "dec_mlflow"]


def test_scikit_learns_bundled_datasets_load_by_name_without_any_download(monkeypatch, tmp_path):
    monkeypatch.setenv("DEC_DATA_DIR", str(tmp_path))  # nothing on disk, and nothing is fetched
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("a bundled dataset was downloaded"))
    digits = load_dataset("Digits", n_clusters=10)
    assert digits.name == "digits" and digits.image_shape == (8, 8) and digits.default_scaling == "auto"
    assert digits.x.shape == (1797, 64) and digits.x.dtype == np.float32 and digits.x.max() == 16.0
    assert digits.y.dtype == np.int64 and np.bincount(digits.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert digits.source == "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    assert resolve_dataset_source(digits.source).url == digits.source  # MLflow records it as the run's input source
    shapes = {name: (ds.x.shape, ds.image_shape) for name in ("wine", "breast_cancer", "iris") for ds in [load_dataset(name)]}
    assert shapes == {"wine": ((178, 13), None), "breast_cancer": ((569, 30), None), "iris": ((150, 4), None)}
    with pytest.raises(DataError, match="iris"):  # validated like any dataset: more samples than clusters
        load_dataset("iris", n_clusters=151)


def test_mnist_loads_all_70000_raw_images_train_then_test(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DEC_DATA_DIR", str(mnist_dir.parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing may be downloaded
    ds = load_dataset("MNIST", n_clusters=10)
    assert KNOWN_DATASETS == ("mnist", "reuters", "reuters10k", "stl10", "digits", "wine", "breast_cancer", "iris")
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.image_shape == (28, 28) and ds.default_scaling == "max"
    assert ds.x.shape == (70000, 784) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 255.0
    assert ds.y.shape == (70000,) and ds.y.dtype == np.int64
    all_counts = [6903, 7877, 6990, 7141, 6824, 6313, 6876, 7293, 6825, 6958]  # 7877 ones
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    np.testing.assert_array_equal(np.bincount(ds.y), all_counts)
    np.testing.assert_array_equal(np.bincount(ds.y[:60000]), train_counts)
    np.testing.assert_array_equal(ds.y[:5], [5, 0, 4, 1, 9])  # first training digits
    np.testing.assert_allclose(ds.x[:60000].mean() / 255.0, 0.1307, atol=1e-4)  # usual normalisation mean
    assert not (tmp_path / "dec_mlflow").exists()


# --- download cache ---------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_caches(mirror, cache):
    path = data._fetch(LABELS_SPEC, [mirror.as_uri() + "/"], cache / "mnist")
    assert path == cache / "mnist" / LABELS_SPEC.filename
    assert path.read_bytes() == (mirror / LABELS_SPEC.filename).read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [LABELS_SPEC.filename]  # no temp file left
    labels = data._read_idx(path, 2049)
    assert labels.shape == (10000,) and labels[:3].tolist() == [7, 2, 1]


def test_fetch_skips_a_mirror_serving_wrong_bytes(mirror, cache, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LABELS_SPEC.filename).write_bytes(b"tampered")
    path = data._fetch(LABELS_SPEC, [bad.as_uri(), mirror.as_uri()], cache / "mnist")
    assert path.read_bytes() == (mirror / LABELS_SPEC.filename).read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [LABELS_SPEC.filename]


def test_fetch_failing_everywhere_lists_each_url_and_leaves_nothing(cache, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LABELS_SPEC.filename).write_bytes(b"tampered")
    empty = tmp_path / "empty"
    message = (
        r"could not download t10k-labels-idx1-ubyte\.gz into .*: "
        r"file://.*/bad/t10k-labels-idx1-ubyte\.gz: checksum mismatch, md5 is [0-9a-f]+, should be .*; "
        r"file://.*/empty/t10k-labels-idx1-ubyte\.gz: .*No such file"
    )
    with pytest.raises(DataError, match=message):
        data._fetch(LABELS_SPEC, [bad.as_uri(), empty.as_uri()], cache / "mnist")
    assert list((cache / "mnist").iterdir()) == []


def test_load_downloads_missing_files_into_the_cache(mnist_dir, cache, tmp_path, monkeypatch):
    mirror = tmp_path / "full-mirror"
    shutil.copytree(mnist_dir, mirror)
    monkeypatch.setattr(data, "MNIST_MIRRORS", (mirror.as_uri(),))
    ds = load_dataset("mnist")
    assert ds.x.shape == (70000, 784)
    cached = sorted(p.name for p in (cache / "mnist").iterdir())
    assert cached == sorted(spec.filename for spec in data._REGISTRY["mnist"].files)


def test_corrupt_local_file_is_named(mnist_dir, cache, monkeypatch):
    monkeypatch.setattr(data, "MNIST_MIRRORS", ())  # a download attempt would fail differently
    local = cache / "mnist"
    local.mkdir(parents=True)
    for name in os.listdir(mnist_dir):
        shutil.copy(mnist_dir / name, local)
    corrupt = local / LABELS_SPEC.filename
    corrupt.chmod(0o644)
    original = corrupt.read_bytes()
    corrupt.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    with pytest.raises(DataError, match=rf"dataset file {corrupt} is corrupt: md5 is [0-9a-f]+, "
                                        rf"should be {LABELS_SPEC.md5}; delete or replace it"):
        load_dataset("mnist")


def test_corrupt_idx_header_is_named(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\1\2"))
    with pytest.raises(DataError, match=rf"file {path}: header gives shape \(5,\) but holds 2 values"):
        data._read_idx(path, 2049)
    with pytest.raises(DataError, match=rf"dataset file {path}: IDX magic number should be 2051, got 2049"):
        data._read_idx(path, 2051)
