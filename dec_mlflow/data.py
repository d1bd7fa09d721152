"""Datasets for DEC: the MNIST benchmark and user feature files, loaded and validated.

Reads ``<data dir>/mnist/*.gz`` for each directory of :func:`data_dirs`, downloading missing
files into the user cache; or a user ``.npy``/``.npz``/``.csv``/``.parquet`` file.
Writes only to the download cache. Every path ends in one validation helper.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm


class DataError(ValueError):
    """A dataset could not be loaded or is unusable; the message names the dataset and the problem."""


@dataclass(frozen=True)
class Dataset:
    """A loaded, validated dataset.

    Attributes
    ----------
    name : str
        ``'mnist'`` or the stem of the user file.
    x : ndarray of shape (n_samples, n_features), float32
        Raw feature values, finite; MNIST pixels stay in 0..255 (the estimator scales).
    y : ndarray of shape (n_samples,), int64, or None
        Labels; strings and categories are encoded as codes in sorted order.
    image_shape : tuple of int or None
        Shape of one sample as an image, ``(28, 28)`` for MNIST, else None.
    default_scaling : str
        ``'max'`` for image datasets (divide by the global max), ``'standard'`` for user data.
    """

    name: str
    x: np.ndarray
    y: np.ndarray | None
    image_shape: tuple[int, ...] | None
    default_scaling: str


@dataclass(frozen=True)
class _FileSpec:
    filename: str
    md5: str  # the checksum published with the dataset
    sha256: str  # the stronger one, as recorded in shared/data/SOURCES.md


@dataclass(frozen=True)
class _KnownDataset:
    files: tuple[_FileSpec, ...]
    mirrors: Callable[[], Sequence[str]]  # base URLs, tried in order
    parse: Callable[[dict[str, Path]], tuple[np.ndarray, np.ndarray]]  # filename -> path in, (x, y) out
    image_shape: tuple[int, ...]
    default_scaling: str


MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_USER_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
# what a user file holds: (x, labels or None, feature column names or None)
_Raw = tuple[np.ndarray, "np.ndarray | pd.Series | None", "list[str] | None"]
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # IDX magic: 0x08 (unsigned byte) << 8 | number of dims


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Array stored in a gzipped IDX file, shape taken from its big-endian header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"dataset file {path}: not a readable gzip file ({exc})") from exc
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"dataset file {path}: IDX magic number should be {magic}, got {found}")
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"dataset file {path}: IDX header truncated, {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"dataset file {path}: header gives shape {dims} but holds {data.size} values")
    return data.reshape(dims)


def _parse_mnist(paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST digits, train then test: x (70000, 784) uint8, y (70000,) uint8."""
    xs, ys = [], []
    for split in ("train", "t10k"):
        images_path = paths[f"{split}-images-idx3-ubyte.gz"]
        images = _read_idx(images_path, _IDX_IMAGES)  # (n, 28, 28)
        if images.shape[1:] != (28, 28):
            raise DataError(f"dataset file {images_path}: images should be 28x28, got {images.shape[1:]}")
        xs.append(images.reshape(len(images), -1))
        ys.append(_read_idx(paths[f"{split}-labels-idx1-ubyte.gz"], _IDX_LABELS))
    return np.concatenate(xs), np.concatenate(ys)


_REGISTRY: dict[str, _KnownDataset] = {
    "mnist": _KnownDataset(
        files=(
            _FileSpec("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            _FileSpec("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                      "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            _FileSpec("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            _FileSpec("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
        # read at call time, not stored, so that monkeypatching MNIST_MIRRORS takes effect
        mirrors=lambda: MNIST_MIRRORS,
        parse=_parse_mnist,
        image_shape=(28, 28),
        default_scaling="max",
    ),
}
KNOWN_DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def data_dirs() -> list[Path]:
    """Directories searched for known datasets, in order.

    Returns
    -------
    dirs : list of Path
        ``$DEC_DATA_DIR`` if set, then the user cache ``($XDG_CACHE_HOME or ~/.cache)/dec_mlflow``,
        which is also where downloads go.
    """
    dirs = [Path(os.environ["DEC_DATA_DIR"]).expanduser()] if os.environ.get("DEC_DATA_DIR") else []
    cache_root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [*dirs, Path(cache_root).expanduser() / "dec_mlflow"]


def _hash_stream(
    src: BinaryIO, out: BinaryIO | None = None, progress: tqdm | None = None
) -> tuple[str, str]:
    """(md5, sha256) hex digests of ``src``, copying it to ``out`` on the way if given."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    while chunk := src.read(1 << 20):
        md5.update(chunk)
        sha256.update(chunk)
        if out is not None:
            out.write(chunk)
        if progress is not None:
            progress.update(len(chunk))
    return md5.hexdigest(), sha256.hexdigest()


def _checksum_problem(digests: tuple[str, str], spec: _FileSpec) -> str | None:
    for kind, got, want in zip(("md5", "sha256"), digests, (spec.md5, spec.sha256)):
        if got != want:
            return f"{kind} is {got}, should be {want}"
    return None


def _download(url: str, spec: _FileSpec, target: Path) -> None:
    """Download ``url`` to ``target`` via a temp file renamed only once the checksums pass."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{spec.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                      desc=spec.filename, file=sys.stderr) as bar:
                problem = _checksum_problem(_hash_stream(response, out, bar), spec)
        if problem is not None:
            raise DataError(f"checksum mismatch, {problem}")
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _fetch(spec: _FileSpec, mirrors: Sequence[str], dest_dir: Path) -> Path:
    """Download one file into ``dest_dir`` from the first mirror that serves it intact."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.filename
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.filename
        try:
            _download(url, spec, target)
            return target
        except (OSError, http.client.HTTPException, DataError) as exc:
            failures.append(f"{url}: {exc}")
    reasons = "; ".join(failures) if failures else "no mirrors configured"
    raise DataError(f"could not download {spec.filename} into {dest_dir}: {reasons}")


def _locate(name: str, spec: _FileSpec, mirrors: Sequence[str]) -> Path:
    """Path of a verified copy of ``spec``: the first found in :func:`data_dirs`, else downloaded."""
    dirs = data_dirs()
    for path in (d / name / spec.filename for d in dirs):
        if path.is_file():
            with path.open("rb") as f:
                problem = _checksum_problem(_hash_stream(f), spec)
            if problem is not None:
                raise DataError(f"dataset file {path} is corrupt: {problem}; delete or replace it")
            return path
    return _fetch(spec, mirrors, dirs[-1] / name)


def _frame_features(frame: pd.DataFrame, label_column: str | None, dataset: str) -> _Raw:
    """Split a table into (features, labels or None, feature column names)."""
    y = None
    if label_column is not None:
        if label_column not in frame.columns:
            available = ", ".join(repr(str(c)) for c in frame.columns)
            raise DataError(f"dataset {dataset!r}: label_column {label_column!r} not found; "
                            f"available columns: {available}")
        y = frame[label_column]
        frame = frame.drop(columns=[label_column])
    # a table without rows has object columns; let the shared check report it as empty instead
    numeric = pd.api.types.is_numeric_dtype
    bad = [repr(str(c)) for c in frame.columns if len(frame) and not numeric(frame[c])]
    if bad:
        raise DataError(f"dataset {dataset!r}: feature columns must be numeric; non-numeric: "
                        f"{', '.join(bad)} (pass label_column= if one of them holds labels)")
    return frame.to_numpy(dtype=np.float64), y, [str(c) for c in frame.columns]


def _read_user_file(path: Path, label_column: str | None, dataset: str) -> _Raw:
    """(x, y or None, feature column names or None) as stored in a user file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if label_column is not None:
            raise DataError(f"dataset {dataset!r}: a .npy file holds no labels, so label_column="
                            f"{label_column!r} cannot apply; use a .npz file with a labels array")
        return np.load(path, allow_pickle=False), None, None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" not in keys or (label_column is not None and label_column not in keys):
                missing = "x" if "x" not in keys else label_column
                present = ", ".join(keys)
                raise DataError(f"dataset {dataset!r}: no array {missing!r}; arrays present: {present}")
            label_key = label_column or "y"
            return archive["x"], archive[label_key] if label_key in keys else None, None
    read = pd.read_csv if suffix == ".csv" else pd.read_parquet
    return _frame_features(read(path), label_column, dataset)


def _encode_labels(y: np.ndarray | pd.Series, dataset: str) -> np.ndarray:
    """Integer labels as int64; anything else as codes in sorted order."""
    if pd.api.types.is_integer_dtype(y.dtype):
        return np.asarray(y, dtype=np.int64)
    codes, _ = pd.factorize(pd.Series(y), sort=True)
    if (codes < 0).any():
        n_missing = int((codes < 0).sum())
        raise DataError(f"dataset {dataset!r}: labels must not be missing; found {n_missing} missing")
    return codes.astype(np.int64)


def _validated(
    dataset: str, x: np.ndarray, y: np.ndarray | pd.Series | None, n_clusters: int | None,
    columns: list[str] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked (x, y): x finite float32 (n_samples, n_features), y int64 (n_samples,) or None."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"dataset {dataset!r}: x should be 2-D (n_samples, n_features), "
                        f"got {x.ndim}-D with shape {x.shape}")
    if 0 in x.shape:
        raise DataError(f"dataset {dataset!r}: empty, x has shape {x.shape}; "
                        "need at least 1 sample and 1 feature")
    if x.dtype.kind not in "biuf":
        raise DataError(f"dataset {dataset!r}: features must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    bad_per_feature = (~np.isfinite(x)).sum(axis=0)  # (n_features,)
    if bad_per_feature.any():
        names = [repr(c) for c in columns] if columns else [f"feature {j}" for j in range(x.shape[1])]
        counts = ", ".join(f"{names[j]} ({bad_per_feature[j]})" for j in np.flatnonzero(bad_per_feature)[:10])
        raise DataError(f"dataset {dataset!r}: features must be finite; found {bad_per_feature.sum()} "
                        f"NaN or infinite values (after float32 conversion) in {counts}")
    if y is not None:
        if np.ndim(y) != 1 or len(y) != len(x):
            raise DataError(f"dataset {dataset!r}: labels should have shape (n_samples,) = ({len(x)},), "
                            f"got {np.shape(y)}")
        y = _encode_labels(y, dataset)
    if n_clusters is not None and len(x) < n_clusters:
        raise DataError(f"dataset {dataset!r}: n_samples={len(x)} should be >= n_clusters={n_clusters}")
    return x, y


def load_dataset(
    dataset: str, *, label_column: str | None = None, n_clusters: int | None = None
) -> Dataset:
    """Load a known dataset by name, or a user feature file by path, and validate it.

    Parameters
    ----------
    dataset : str
        A name from :data:`KNOWN_DATASETS` (any case) or a path to a ``.npy`` (2-D features),
        ``.npz`` (array ``x``, optional labels ``y``), ``.csv`` or ``.parquet`` (numeric columns) file.
    label_column : str, optional
        Table column holding the labels, removed from the features; for ``.npz`` the array key
        of the labels instead of ``'y'``.
    n_clusters : int, optional
        If given, require at least this many samples.

    Returns
    -------
    Dataset
        ``x`` of shape (n_samples, n_features) float32, ``y`` of shape (n_samples,) int64 or None.

    Raises
    ------
    DataError
        If the dataset is unknown, missing, unreadable, corrupt or fails validation.
    """
    entry = _REGISTRY.get(dataset.lower())
    if entry is not None:
        name = dataset.lower()
        mirrors = entry.mirrors()
        x, y = entry.parse({spec.filename: _locate(name, spec, mirrors) for spec in entry.files})
        x, y = _validated(name, x, y, n_clusters, None)
        return Dataset(name, x, y, entry.image_shape, entry.default_scaling)
    path = Path(dataset).expanduser()
    if path.suffix.lower() not in _USER_SUFFIXES:
        raise DataError(f"dataset {dataset!r} is not known; choose one of {', '.join(KNOWN_DATASETS)}, "
                        f"or give a path to a {'/'.join(_USER_SUFFIXES)} file")
    if not path.is_file():
        raise DataError(f"dataset {dataset!r}: no such file")
    try:
        x, y, columns = _read_user_file(path, label_column, dataset)
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # malformed files; DataError above is already precise
        raise DataError(f"dataset {dataset!r}: cannot read {path.suffix} file ({exc})") from exc
    x, y = _validated(dataset, x, y, n_clusters, columns)
    return Dataset(path.stem, x, y, None, "standard")
