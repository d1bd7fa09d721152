"""Datasets for DEC: the paper's benchmarks and user feature files, loaded and validated.

Reads the files of a known dataset (MNIST, REUTERS, REUTERS-10k, STL-10) from
``<data dir>/<folder>/`` for each directory of :func:`data_dirs`, downloading missing files into
the user cache; or a user ``.npy``/``.npz``/``.csv``/``.parquet`` file. Writes only to the user
cache: downloads, ``<file>.sha256`` records of checksums trusted on first use, and the features of
datasets whose preprocessing is slow. Every path ends in one validation helper.

Data larger than memory (:mod:`dec_mlflow.rows`): a ``.npy`` file is memory-mapped, a ``.parquet``
file is read a record batch at a time into a float32 spill file (a nameless temporary file in
``$TMPDIR``) that is memory-mapped, and REUTERS stays a sparse matrix; none is ever dense in memory
as a whole.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import sparse
from tqdm import tqdm

from dec_mlflow import corpora
from dec_mlflow.rows import Features, chunk_rows, chunks, streamed


class DataError(ValueError):
    """A dataset could not be loaded or is unusable; the message names the dataset and the problem."""


@dataclass(frozen=True)
class Dataset:
    """A loaded, validated dataset.

    Attributes
    ----------
    name : str
        The known dataset's name or the stem of the user file.
    x : ndarray, np.memmap or scipy.sparse.csr_matrix of shape (n_samples, n_features), float32
        Raw feature values, finite; MNIST pixels stay in 0..255 (the estimator scales); REUTERS and
        STL-10 hold the paper's features (tf-idf, a sparse matrix; HOG and colour map). A ``.npy``
        or ``.parquet`` file gives a read-only memory map: read it through :mod:`dec_mlflow.rows`.
    y : ndarray of shape (n_samples,), int64, or None
        Labels; strings and categories are encoded as codes in sorted order.
    image_shape : tuple of int or None
        Shape of one sample as an image, ``(28, 28)`` for MNIST, ``(8, 8)`` for digits, else None.
    default_scaling : str
        ``'max'`` for MNIST and REUTERS (one factor for every feature), ``'standard'`` for STL-10,
        ``'auto'`` for user data and scikit-learn's bundled datasets (the estimator's rule,
        :func:`dec_mlflow.scaling.auto_scaling`).
    source : str
        Where the data came from: the absolute path of a user file, the first download mirror
        of a known dataset ('' when unknown), or the UCI page of a dataset scikit-learn bundles.
    """

    name: str
    x: Features
    y: np.ndarray | None
    image_shape: tuple[int, ...] | None
    default_scaling: str
    source: str = ""


@dataclass(frozen=True)
class _FileSpec:
    filename: str
    md5: str | None  # the checksum published with the dataset; None if none is
    # the stronger one, of copies that match the published MD5; None: not recorded yet, so the first
    # copy's is kept in <user cache>/<folder>/<filename>.sha256 for later ones (trust on first use)
    sha256: str | None
    url_dir: str = ""  # folder of the file below each mirror's base URL, ending in '/'


_Features = np.ndarray | sparse.csr_matrix  # (n_samples, n_features)


@dataclass(frozen=True)
class _KnownDataset:
    folder: str  # sub-folder of each data dir holding the files; REUTERS and REUTERS-10k share one
    files: tuple[_FileSpec, ...]
    mirrors: Callable[[], Sequence[str]]  # base URLs, tried in order
    parse: Callable[[dict[str, Path]], tuple[_Features, np.ndarray]]  # filename -> path in, (x, y) out
    image_shape: tuple[int, ...] | None
    default_scaling: str
    # .npz in <user cache>/<folder>/ keeping parse's output when parsing is slow; its name carries
    # the preprocessing version, so a new version is computed afresh
    features_cache: str | None = None
    subset: Callable[[_Features, np.ndarray], tuple[_Features, np.ndarray]] | None = None  # rows kept


MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# the RCV1-v2 appendices of Lewis et al. (JMLR 5, 2004), where the authors' script says to get them
REUTERS_MIRRORS: tuple[str, ...] = (
    "http://www.ai.mit.edu/projects/jmlr/papers/volume5/lewis04a/",
    "http://jmlr.csail.mit.edu/papers/volume5/lewis04a/",
)
STL10_MIRRORS: tuple[str, ...] = (
    "http://ai.stanford.edu/~acoates/stl10/",
    "https://cs.stanford.edu/~acoates/stl10/",
)

_USER_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
# what a user file holds: (x, labels or None, feature column names or None)
_Raw = tuple[np.ndarray, "np.ndarray | pd.Series | None", "list[str] | None"]
_SPILL_PREFIX = "dec-mlflow-spill-"
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


_REUTERS = _KnownDataset(
    folder="reuters",
    # no checksums are published for these files and none has been recorded here yet: trusted on first use
    files=(*(_FileSpec(name, None, None, "a12-token-files/") for name in corpora.REUTERS_TOKEN_FILES),
           _FileSpec(corpora.REUTERS_QRELS, None, None, "a08-topic-qrels/")),
    mirrors=lambda: REUTERS_MIRRORS,
    parse=corpora.parse_reuters,
    image_shape=None,
    # 'max': one factor for every word, so the tf-idf rows keep their shape as the paper fed them (unit norm
    # times sqrt(2000)) and only their overall scale is brought to the learning rates'; standardising would
    # inflate rare words
    default_scaling="max",
    features_cache=f"reuters-tfidf-v{corpora.REUTERS_FEATURES_VERSION}.npz",
)
_REGISTRY: dict[str, _KnownDataset] = {
    "mnist": _KnownDataset(
        folder="mnist",
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
    "reuters": _REUTERS,
    "reuters10k": replace(_REUTERS, subset=partial(corpora.subsample, n=corpora.REUTERS10K_SIZE,
                                                   seed=corpora.REUTERS10K_SEED)),
    "stl10": _KnownDataset(
        folder="stl10",
        # md5 as published by torchvision's STL10 class; sha256 not yet recorded: trusted on first use
        files=(_FileSpec(corpora.STL10_ARCHIVE, "91f7769df0f17e558f3565bffb0c7dfb", None),),
        mirrors=lambda: STL10_MIRRORS,
        parse=corpora.parse_stl10,
        image_shape=None,  # the features are not an image
        # 'standard': HOG values lie in 0..1 and colours in 0..255; per-feature standardising puts
        # both on one scale (the authors rescaled each part by hand for the same reason)
        default_scaling="standard",
        features_cache=f"stl10-hog-colour-v{corpora.STL10_FEATURES_VERSION}.npz",
    ),
}
# small labelled datasets that ship inside scikit-learn (nothing to download): name -> (loader in
# sklearn.datasets, image shape, the UCI page of the data scikit-learn bundles: the source MLflow records, as a
# known dataset's is where it is published); a first run on a laptop, and the bench's data beside MNIST
_UCI = "https://archive.ics.uci.edu/dataset/"
_BUNDLED: dict[str, tuple[str, tuple[int, ...] | None, str]] = {
    # 1,797 8x8 handwritten digits, pixel values 0..16
    "digits": ("load_digits", (8, 8), _UCI + "80/optical+recognition+of+handwritten+digits"),
    "wine": ("load_wine", None, _UCI + "109/wine"),
    "breast_cancer": ("load_breast_cancer", None, _UCI + "17/breast+cancer+wisconsin+diagnostic"),
    "iris": ("load_iris", None, _UCI + "53/iris"),
}
KNOWN_DATASETS: tuple[str, ...] = (*_REGISTRY, *_BUNDLED)


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


@contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A temp file next to ``target``, renamed to it only if the ``with`` block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _recorded_sha256(record: Path) -> str:
    """The sha256 kept in a ``<file>.sha256`` record (``sha256sum`` format)."""
    digest = record.read_text(encoding="ascii", errors="replace")[:64]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DataError(f"checksum record {record} should start with a 64-digit hex sha256, got {digest!r}; "
                        "delete it to record the file's checksum again")
    return digest


def _checksum_problem(digests: tuple[str, str], spec: _FileSpec, record: Path) -> str | None:
    """What is wrong with (md5, sha256) ``digests`` given ``spec``'s pins and the ``record``, or None."""
    wanted = [("md5", digests[0], spec.md5, ""), ("sha256", digests[1], spec.sha256, "")]
    if spec.sha256 is None and record.is_file():
        wanted[1] = ("sha256", digests[1], _recorded_sha256(record), f" (recorded on first use in {record})")
    for kind, got, want, origin in wanted:
        if want is not None and got != want:
            return f"{kind} is {got}, should be {want}{origin}"
    return None


def _trust_on_first_use(path: Path, sha256: str, spec: _FileSpec, record: Path) -> None:
    """Record the sha256 of a verified ``path`` in ``record`` if it is pinned nowhere yet."""
    if spec.sha256 is not None or record.is_file():
        return
    with _atomic_file(record) as out:
        out.write(f"{sha256}  {spec.filename}\n".encode("ascii"))
    print(f"{path}: checksum not pinned; got sha256 {sha256}, recorded in {record}; "
          "later loads verify against it", file=sys.stderr)


def _download(url: str, spec: _FileSpec, target: Path) -> None:
    """Download ``url`` to ``target`` via a temp file renamed only once the checksums pass."""
    record = target.with_name(f"{spec.filename}.sha256")
    with _atomic_file(target) as out, urllib.request.urlopen(url, timeout=60) as response:
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                  desc=spec.filename, file=sys.stderr) as bar:
            digests = _hash_stream(response, out, bar)
        problem = _checksum_problem(digests, spec, record)
        if problem is not None:
            raise DataError(f"checksum mismatch, {problem}")
    _trust_on_first_use(target, digests[1], spec, record)


def _fetch(spec: _FileSpec, mirrors: Sequence[str], dest_dir: Path) -> Path:
    """Download one file into ``dest_dir`` from the first mirror that serves it intact."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.filename
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.url_dir + spec.filename
        try:
            _download(url, spec, target)
            return target
        except (OSError, http.client.HTTPException, DataError) as exc:
            failures.append(f"{url}: {exc}")
    reasons = "; ".join(failures) if failures else "no mirrors configured"
    raise DataError(f"could not download {spec.filename} into {dest_dir}: {reasons}")


def _locate(folder: str, spec: _FileSpec, mirrors: Sequence[str]) -> Path:
    """Path of a verified copy of ``spec``: the first found in :func:`data_dirs`, else downloaded."""
    dirs = data_dirs()
    record = dirs[-1] / folder / f"{spec.filename}.sha256"
    for path in (d / folder / spec.filename for d in dirs):
        if path.is_file():
            with path.open("rb") as f:
                digests = _hash_stream(f)
            problem = _checksum_problem(digests, spec, record)
            if problem is not None:
                raise DataError(f"dataset file {path} is corrupt: {problem}; delete or replace it")
            _trust_on_first_use(path, digests[1], spec, record)
            return path
    return _fetch(spec, mirrors, dirs[-1] / folder)


def _load_known(name: str, entry: _KnownDataset) -> tuple[_Features, np.ndarray]:
    """(x, y) of a known dataset, x as parsed (dense, or sparse for REUTERS): from its features cache
    if kept, else parsed from its files."""
    cache = data_dirs()[-1] / entry.folder / entry.features_cache if entry.features_cache else None
    if cache is not None and cache.is_file():
        x, y = corpora.load_features(cache)
    else:
        mirrors = entry.mirrors()
        paths = {spec.filename: _locate(entry.folder, spec, mirrors) for spec in entry.files}
        if cache is not None:
            print(f"{name}: computing the features once; they will be kept in {cache}", file=sys.stderr)
        x, y = entry.parse(paths)
        if cache is not None:
            with _atomic_file(cache) as out:
                corpora.save_features(out, x, y)
    if entry.subset is not None:
        x, y = entry.subset(x, y)
    return x, y


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
        return np.load(path, mmap_mode="r", allow_pickle=False), None, None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" not in keys or (label_column is not None and label_column not in keys):
                missing = "x" if "x" not in keys else label_column
                present = ", ".join(keys)
                raise DataError(f"dataset {dataset!r}: no array {missing!r}; arrays present: {present}")
            label_key = label_column or "y"
            return archive["x"], archive[label_key] if label_key in keys else None, None
    if suffix == ".csv":
        return _frame_features(pd.read_csv(path), label_column, dataset)
    return _read_parquet(path, label_column, dataset)


def _read_parquet(path: Path, label_column: str | None, dataset: str) -> _Raw:
    """A parquet table read one record batch at a time, its features written to a float32 spill file.

    Random mini-batches need random access to rows, which a parquet file gives only a row group at
    a time; the memory-mapped spill gives it a row at a time while holding no more of the table in
    memory than one record batch.
    """
    table = pq.ParquetFile(path)
    index_columns = (table.schema_arrow.pandas_metadata or {}).get("index_columns", [])
    columns = [c for c in table.schema_arrow.names if c not in index_columns]  # a stored pandas index is no feature
    n_features = len(columns) - (label_column in columns)
    x = _spill((table.metadata.num_rows, n_features)) if table.metadata.num_rows and n_features else None
    start, labels, names = 0, [], None
    for batch in table.iter_batches(batch_size=chunk_rows(max(n_features, 1)), columns=columns):
        features, y, names = _frame_features(batch.to_pandas(), label_column, dataset)
        x[start : start + len(features)] = features  # float64 -> float32, as astype(float32) would
        start += len(features)
        if y is not None:
            labels.append(y)
    if x is None:  # no rows or no feature columns: the table as it is, for the usual checks to describe
        return _frame_features(table.read(columns=columns).to_pandas(), label_column, dataset)
    x.flush()
    x.setflags(write=False)
    return x, (pd.concat(labels, ignore_index=True) if label_column is not None else None), names


def _spill(shape: tuple[int, int]) -> np.memmap:
    """A writable float32 memory map of ``shape`` on a nameless temporary file in ``$TMPDIR``.

    The file has no name from the start (it is unlinked at creation), so its disk space is given
    back when the map is garbage-collected or the process ends, however it ends.
    """
    with tempfile.TemporaryFile(prefix=_SPILL_PREFIX) as f:  # the map keeps its own handle on the file
        return np.memmap(f, np.float32, "w+", shape=shape)


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
    dataset: str, x: _Features, y: np.ndarray | pd.Series | None, n_clusters: int | None,
    columns: list[str] | None,
) -> tuple[Features, np.ndarray | None]:
    """Checked (x, y): x finite float32 (n_samples, n_features), y int64 (n_samples,) or None.

    A memory map or sparse ``x`` is checked chunk by chunk and stays one: a map of another dtype is
    converted chunk by chunk into a float32 spill file, a sparse matrix into float32 CSR.
    """
    if not streamed(x):
        x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"dataset {dataset!r}: x should be 2-D (n_samples, n_features), "
                        f"got {x.ndim}-D with shape {x.shape}")
    if 0 in x.shape:
        raise DataError(f"dataset {dataset!r}: empty, x has shape {x.shape}; "
                        "need at least 1 sample and 1 feature")
    if x.dtype.kind not in "biuf":
        raise DataError(f"dataset {dataset!r}: features must be numeric, got dtype {x.dtype}")
    if sparse.issparse(x):
        x = x.tocsr().astype(np.float32, copy=False)
        bad_per_feature = np.bincount(x.indices[~np.isfinite(x.data)], minlength=x.shape[1])  # zeros are finite
    else:
        if isinstance(x, np.memmap) and x.dtype != np.float32:
            spill, size = _spill(x.shape), chunk_rows(x.shape[1])
            for start, block in zip(range(0, x.shape[0], size), chunks(x, size)):
                spill[start : start + len(block)] = block
            x = spill
            x.setflags(write=False)
        else:
            x = x.astype(np.float32, copy=False)
        bad_per_feature = sum((~np.isfinite(block)).sum(axis=0) for block in chunks(x))  # (n_features,)
    if bad_per_feature.any():
        names = [repr(c) for c in columns] if columns else [f"feature {j}" for j in range(x.shape[1])]
        counts = ", ".join(f"{names[j]} ({bad_per_feature[j]})" for j in np.flatnonzero(bad_per_feature)[:10])
        raise DataError(f"dataset {dataset!r}: features must be finite; found {bad_per_feature.sum()} "
                        f"NaN or infinite values (after float32 conversion) in {counts}")
    if y is not None:
        if np.ndim(y) != 1 or len(y) != x.shape[0]:
            raise DataError(f"dataset {dataset!r}: labels should have shape (n_samples,) = ({x.shape[0]},), "
                            f"got {np.shape(y)}")
        y = _encode_labels(y, dataset)
    if n_clusters is not None and x.shape[0] < n_clusters:
        raise DataError(f"dataset {dataset!r}: n_samples={x.shape[0]} should be >= n_clusters={n_clusters}")
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
        ``'reuters'`` (685,071 x 2000 per the paper; about 5.5 GB as float32) and ``'reuters10k'`` (its
        10,000 rows drawn with seed 1234) follow :func:`dec_mlflow.corpora.parse_reuters`, ``'stl10'``
        (13,000 x 4548) :func:`dec_mlflow.corpora.parse_stl10`. ``'digits'``, ``'wine'``,
        ``'breast_cancer'`` and ``'iris'`` are scikit-learn's bundled datasets (nothing is downloaded).
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
    if dataset.lower() in _BUNDLED:
        from sklearn import datasets as bundled  # scikit-learn is a dependency; its import costs a second

        name = dataset.lower()
        loader, image_shape, source = _BUNDLED[name]
        x, y = getattr(bundled, loader)(return_X_y=True)
        x, y = _validated(name, x.astype(np.float32), y.astype(np.int64), n_clusters, None)
        return Dataset(name, x, y, image_shape, "auto", source)
    entry = _REGISTRY.get(dataset.lower())
    if entry is not None:
        name = dataset.lower()
        try:
            x, y = _load_known(name, entry)
        except DataError:
            raise
        except ValueError as exc:  # a file breaks its format; corpora names the file, rule and value
            raise DataError(f"dataset {name!r}: {exc}") from exc
        x, y = _validated(name, x, y, n_clusters, None)
        return Dataset(name, x, y, entry.image_shape, entry.default_scaling, next(iter(entry.mirrors()), ""))
    path = Path(dataset).expanduser()
    if path.suffix.lower() not in _USER_SUFFIXES:
        raise DataError(f"dataset {dataset!r} is not known; choose one of {', '.join(KNOWN_DATASETS)}, "
                        f"or give a path to a {'/'.join(_USER_SUFFIXES)} file")
    if not path.is_file():
        raise DataError(f"dataset {dataset!r}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"dataset {dataset!r}: the file is empty (0 bytes)")
    try:
        x, y, columns = _read_user_file(path, label_column, dataset)
    except DataError:
        raise
    # malformed files (numpy raises EOFError for a truncated header); DataError above is already precise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"dataset {dataset!r}: cannot read {path.suffix} file ({exc})") from exc
    x, y = _validated(dataset, x, y, n_clusters, columns)
    return Dataset(path.stem, x, y, None, "auto", str(path.resolve()))
