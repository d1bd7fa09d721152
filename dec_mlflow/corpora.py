"""The DEC paper's text and image corpora: file formats and the paper's preprocessing.

Xie, Girshick, Farhadi (ICML 2016), section 4.1:

- REUTERS (RCV1-v2, Lewis et al. 2004): documents with exactly one of the root categories CCAT,
  GCAT, MCAT, ECAT; tf-idf of the 2000 most frequent word stems; REUTERS-10k is a random subset
  of 10,000 of them. The details follow the authors' ``make_reuters_data`` script.
- STL-10 (Coates et al. 2011): the 13,000 labelled 96x96 colour images; HOG features concatenated
  with an 8x8 colour map.

Reads the LYRL2004 token and topic files and the STL-10 binary archive given as paths, and the
``.npz`` files that keep the features computed from them (:func:`save_features` writes to a file
object the caller opened). Functions raise ``ValueError`` naming the file, the rule and the value;
the loader in :mod:`dec_mlflow.data` adds the dataset name.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zipfile
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from scipy import sparse

# --- REUTERS ------------------------------------------------------------------------------------

# Label order of the authors' make_reuters_data (cat_to_cid), so labels match theirs.
ROOT_CATEGORIES = ("CCAT", "GCAT", "MCAT", "ECAT")
# Read in this order, as the authors did; it fixes the row order and so the REUTERS-10k sample.
REUTERS_TOKEN_FILES = tuple(f"lyrl2004_tokens_{part}.dat.gz"
                            for part in ("test_pt0", "test_pt1", "test_pt2", "test_pt3", "train"))
REUTERS_QRELS = "rcv1-v2.topics.qrels.gz"
N_WORDS = 2000  # the paper: "the 2000 most frequently occurring word stems"
REUTERS10K_SIZE, REUTERS10K_SEED = 10_000, 1234  # the authors seeded numpy with 1234
REUTERS_FEATURES_VERSION = 1  # bump when the REUTERS features change: it names their cache file
# scikit-learn CountVectorizer's default tokens, which the authors' script used.
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def _gzip_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a gzipped text file."""
    try:
        with gzip.open(path, "rt", encoding="latin-1") as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc


def read_single_label(path: Path) -> dict[int, int]:
    """Documents labelled with exactly one root category, from an RCV1-v2 topic qrels file.

    Parameters
    ----------
    path : Path
        Gzipped ``rcv1-v2.topics.qrels``: lines ``<category> <docid> 1``. Categories other than
        :data:`ROOT_CATEGORIES` are ignored.

    Returns
    -------
    labels : dict of int to int
        Document id -> index of its only root category in :data:`ROOT_CATEGORIES`.
    """
    roots: dict[int, set[int]] = {}
    for number, line in _gzip_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[1].isdigit():
            raise ValueError(f"{path}: line {number} should read '<category> <docid> 1', got {line.strip()!r}")
        if fields[0] in ROOT_CATEGORIES:
            roots.setdefault(int(fields[1]), set()).add(ROOT_CATEGORIES.index(fields[0]))
    return {doc: next(iter(cats)) for doc, cats in roots.items() if len(cats) == 1}


def read_documents(path: Path) -> Iterator[tuple[int, str]]:
    """Documents of a LYRL2004 token file, in file order.

    Parameters
    ----------
    path : Path
        Gzipped ``lyrl2004_tokens_*.dat``: each document is a line ``.I <docid>``, a line ``.W``,
        then lines of whitespace-separated tokens up to the next ``.I``.

    Yields
    ------
    docid : int
    text : str
        The token lines of the document, joined.
    """
    doc, lines = None, []
    for number, line in _gzip_lines(path):
        if line.startswith(".I"):
            if doc is not None:
                yield doc, "".join(lines)
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{path}: line {number} should read '.I <docid>', got {line.strip()!r}")
            doc, lines = int(fields[1]), []
        elif line.startswith(".W"):
            continue
        elif doc is not None:
            lines.append(line)
        elif line.strip():
            raise ValueError(f"{path}: line {number} holds text before the first '.I <docid>' line")
    if doc is not None:
        yield doc, "".join(lines)


def term_counts(texts: Iterable[str], n_words: int) -> tuple[sparse.csr_matrix, list[str]]:
    """Counts of the ``n_words`` most frequent words in each text.

    As the authors' ``CountVectorizer(max_features=2000)``: tokens are runs of two or more word
    characters of the lower-cased text (on the LYRL2004 files: the whitespace-separated stems,
    minus one-letter ones); "most frequent" ranks words by their total count over all texts; ties
    (which the authors' scikit-learn call left to an unstable sort) go to the alphabetically first
    word; columns are in alphabetical order.

    Parameters
    ----------
    texts : iterable of str
    n_words : int
        Vocabulary size; all words are kept if there are fewer.

    Returns
    -------
    counts : csr_matrix of shape (n_texts, min(n_words, n_distinct_words)), float32
    vocabulary : list of str
        The word of each column.
    """
    index: dict[str, int] = {}  # word -> id in order of first appearance
    ids, lengths = array("i"), []
    for text in texts:
        tokens = _TOKEN.findall(text.lower())
        ids.extend([index.setdefault(token, len(index)) for token in tokens])
        lengths.append(len(tokens))
    token_ids = np.frombuffer(ids, dtype=np.int32)  # (n_tokens,)
    words = np.array(list(index), dtype=str)
    totals = np.bincount(token_ids, minlength=len(words))
    top = np.lexsort((words, -totals))[:n_words]  # most frequent first, ties alphabetical
    kept = top[np.argsort(words[top], kind="stable")]  # ids of the columns, alphabetical
    column = np.full(len(words), -1, dtype=np.int32)  # word id -> column, -1 if not kept
    column[kept] = np.arange(len(kept))
    cols = column[token_ids]
    in_vocabulary = cols >= 0
    rows = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[in_vocabulary]
    counts = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols[in_vocabulary])),
                               shape=(len(lengths), len(kept)))
    counts.sum_duplicates()
    return counts, words[kept].tolist()


def tfidf(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    """The authors' tf-idf features of word counts.

    Their ``TfidfTransformer(norm='l2', sublinear_tf=True)`` then ``* sqrt(n_words)``:
    tf = 1 + ln(count) for count > 0; idf = ln((1 + n_docs) / (1 + df)) + 1 with df the number of
    documents holding the word; each row scaled to unit L2 norm (rows without words stay zero), then
    multiplied by sqrt(n_words) so that the mean squared feature of a row is 1.

    Parameters
    ----------
    counts : csr_matrix of shape (n_docs, n_words)
        Non-negative counts without explicit zeros.

    Returns
    -------
    x : csr_matrix of shape (n_docs, n_words), float32
    """
    n_docs, n_words = counts.shape
    df = np.bincount(counts.indices, minlength=n_words)  # (n_words,)
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    x = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
    x.data = (1.0 + np.log(x.data)) * idf[x.indices]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # (n_docs,)
    x.data /= np.repeat(np.where(norms > 0, norms, 1.0), np.diff(x.indptr))
    x.data *= np.sqrt(n_words)
    return x.astype(np.float32)


def parse_reuters(paths: dict[str, Path]) -> tuple[sparse.csr_matrix, np.ndarray]:
    """REUTERS as in the paper: the single-label RCV1-v2 documents as tf-idf features.

    Parameters
    ----------
    paths : dict of str to Path
        :data:`REUTERS_QRELS` and each of :data:`REUTERS_TOKEN_FILES` -> its local path.

    Returns
    -------
    x : csr_matrix of shape (n_docs, 2000), float32
        :func:`tfidf` of the :func:`term_counts` of the 2000 most frequent words; rows in the order
        of the token files (685,071 documents for the real corpus, says the paper).
    y : ndarray of shape (n_docs,), int64
        Index of the root category in :data:`ROOT_CATEGORIES`.
    """
    labels = read_single_label(paths[REUTERS_QRELS])
    kept: list[int] = []

    def texts() -> Iterator[str]:
        for name in REUTERS_TOKEN_FILES:
            for doc, text in read_documents(paths[name]):
                if doc in labels:
                    kept.append(doc)
                    yield text

    counts, _ = term_counts(texts(), N_WORDS)
    if not kept:
        raise ValueError(f"no document of the token files has exactly one root category in {REUTERS_QRELS}")
    return tfidf(counts), np.array([labels[doc] for doc in kept], dtype=np.int64)


def subsample(x: sparse.csr_matrix | np.ndarray, y: np.ndarray, n: int,
              seed: int) -> tuple[sparse.csr_matrix | np.ndarray, np.ndarray]:
    """``n`` random rows, as the authors drew REUTERS-10k.

    The first ``n`` of ``np.random.RandomState(seed).permutation(n_docs)``, the generator behind
    their ``np.random.seed(1234); np.random.permutation(N)``.

    Parameters
    ----------
    x : csr_matrix or ndarray of shape (n_docs, n_features)
    y : ndarray of shape (n_docs,)
    n, seed : int

    Returns
    -------
    x_sample : same type as ``x``, shape (n, n_features)
    y_sample : ndarray of shape (n,)

    Raises
    ------
    ValueError
        If there are fewer than ``n`` rows: a smaller "10k" sample would not be the paper's.
    """
    if x.shape[0] < n:
        raise ValueError(f"the corpus has {x.shape[0]} single-label documents, fewer than the n={n} to sample")
    rows = np.random.RandomState(seed).permutation(x.shape[0])[:n]
    return x[rows], y[rows]


# --- STL-10 -------------------------------------------------------------------------------------

STL10_ARCHIVE = "stl10_binary.tar.gz"
_STL10_MEMBERS = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")  # the labelled images
STL10_SIDE = 96
STL10_FEATURES_VERSION = 1  # bump when the STL-10 features change: it names their cache file
HOG_CELL, HOG_ORIENTATIONS, HOG_BLOCK = 8, 9, 2  # Dalal & Triggs' cells, bins and blocks
COLOUR_MAP_SIDE = 8  # the paper's "8-by-8 color map"
_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # Rec. 709 luma, as skimage's rgb2gray


def read_stl10_archive(path: Path) -> dict[str, bytes]:
    """The labelled-image members of the STL-10 binary archive, read in one pass without extracting.

    Parameters
    ----------
    path : Path
        ``stl10_binary.tar.gz`` holding ``stl10_binary/{train,test}_{X,y}.bin`` (and more, skipped).

    Returns
    -------
    members : dict of str to bytes
        ``'train_X.bin'``, ``'train_y.bin'``, ``'test_X.bin'``, ``'test_y.bin'`` -> contents.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in _STL10_MEMBERS:
                    found[name] = archive.extractfile(member).read()
                if len(found) == len(_STL10_MEMBERS):
                    break  # the 2.5 GB of unlabelled images need not be decompressed
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable .tar.gz archive ({exc})") from exc
    missing = [name for name in _STL10_MEMBERS if name not in found]
    if missing:
        raise ValueError(f"{path}: should hold stl10_binary/{{{','.join(_STL10_MEMBERS)}}}; "
                         f"missing: {', '.join(missing)}")
    return found


def stl10_images(raw: bytes, source: str) -> np.ndarray:
    """Images of an STL-10 ``*_X.bin`` file.

    The file stores each image as its red, green and blue 96x96 planes, each plane in column-major
    order (the first 96 bytes are the left column, top to bottom).

    Parameters
    ----------
    raw : bytes
    source : str
        File name for error messages.

    Returns
    -------
    images : ndarray of shape (n_images, 96, 96, 3), uint8
        Indexed (image, row, column, RGB channel).
    """
    size = 3 * STL10_SIDE * STL10_SIDE
    if len(raw) % size:
        raise ValueError(f"{source}: {len(raw)} bytes is not a whole number of 96x96x3 images ({size} bytes each)")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)  # (n, channel, col, row)
    return planes.transpose(0, 3, 2, 1)


def stl10_labels(raw: bytes, n_images: int, source: str) -> np.ndarray:
    """Labels 0..9 of an STL-10 ``*_y.bin`` file (stored as bytes 1..10), one per image.

    Returns
    -------
    y : ndarray of shape (n_images,), int64
    """
    y = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    if len(y) != n_images:
        raise ValueError(f"{source}: {len(y)} labels, should be one per image ({n_images})")
    bad = y[(y < 1) | (y > 10)]
    if bad.size:
        raise ValueError(f"{source}: labels should be 1..10, found {bad[0]}")
    return y - 1


def hog(grey: np.ndarray, cell: int = HOG_CELL, orientations: int = HOG_ORIENTATIONS,
        block: int = HOG_BLOCK) -> np.ndarray:
    """Histograms of oriented gradients (Dalal & Triggs 2005) of greyscale images.

    What ``skimage.feature.hog(image, orientations, (cell, cell), (block, block), 'L2-Hys')`` computes:
    gradients by central differences [-1, 0, 1] (zero on the border rows/columns); unsigned
    orientation atan2(d_row, d_col) mod 180 degrees, hard-assigned to ``orientations`` equal bins
    starting at 0 (a vertical edge, whose gradient is horizontal, falls in bin 0); per cell of
    ``cell`` x ``cell`` pixels the mean gradient magnitude per bin (pixels beyond the last whole cell
    are ignored); blocks of ``block`` x ``block`` cells with a stride of one cell, each
    L2-Hys-normalised (L2, clip at 0.2, L2 again; eps 1e-5).

    Parameters
    ----------
    grey : ndarray of shape (n_images, height, width)
    cell, orientations, block : int

    Returns
    -------
    features : ndarray of shape (n_images, n_block_rows * n_block_cols * block**2 * orientations), float32
        Ordered (block row, block column, cell row in block, cell column in block, bin), with
        ``n_block_rows = height // cell - block + 1``; 4,356 values for a 96x96 image.
    """
    n, height, width = grey.shape
    n_rows, n_cols = height // cell, width // cell
    if min(n_rows, n_cols) < block:
        raise ValueError(f"images of {height}x{width} pixels hold fewer than block={block} cells of {cell} pixels a side")
    grey = np.asarray(grey, dtype=np.float32)
    d_row, d_col = np.zeros_like(grey), np.zeros_like(grey)
    d_row[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
    d_col[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    crop = (slice(None), slice(0, n_rows * cell), slice(0, n_cols * cell))
    magnitude = np.hypot(d_row, d_col)[crop]
    angle = np.rad2deg(np.arctan2(d_row, d_col))[crop] % 180.0
    bins = np.minimum((angle * (orientations / 180.0)).astype(np.int64), orientations - 1)
    cells = np.empty((n, n_rows, n_cols, orientations), dtype=np.float32)
    for b in range(orientations):
        votes = np.where(bins == b, magnitude, 0.0).reshape(n, n_rows, cell, n_cols, cell)
        cells[..., b] = votes.mean(axis=(2, 4))
    n_brows, n_bcols = n_rows - block + 1, n_cols - block + 1
    blocks = np.stack([cells[:, i:i + n_brows, j:j + n_bcols] for i in range(block) for j in range(block)], axis=3)
    blocks = blocks.reshape(n, n_brows, n_bcols, -1)  # (n, block row, block col, block*block*orientations)
    eps = 1e-5
    blocks = np.minimum(blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + eps**2), 0.2)
    blocks = blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + eps**2)
    return blocks.reshape(n, -1)


def colour_map(images: np.ndarray, side: int = COLOUR_MAP_SIDE) -> np.ndarray:
    """Images shrunk to ``side`` x ``side`` pixels per colour channel, by block means.

    Parameters
    ----------
    images : ndarray of shape (n_images, height, width, n_channels)
        Height and width multiples of ``side``.
    side : int

    Returns
    -------
    colours : ndarray of shape (n_images, side * side * n_channels), float32
        Mean value of each (height/side) x (width/side) block, ordered (row, column, channel);
        in the images' units (0..255 for STL-10).
    """
    n, height, width, channels = images.shape
    if height % side or width % side:
        raise ValueError(f"images of {height}x{width} pixels cannot be split into {side}x{side} equal blocks")
    blocks = images.reshape(n, side, height // side, side, width // side, channels)
    return blocks.mean(axis=(2, 4), dtype=np.float32).reshape(n, -1)


def stl10_features(images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """The paper's STL-10 input: HOG features concatenated with an 8x8 colour map.

    :func:`hog` of the Rec. 709 grey image (RGB / 255) with 8x8-pixel cells, 9 bins and 2x2-cell
    blocks (4,356 values), then the :func:`colour_map` of the RGB image (8 * 8 * 3 = 192 values).
    This follows the paper's text; the authors' script differed: its own HOG module, and a colour
    map of the Cr and Cb channels of the image resized to 8x8 (128 values), each part rescaled.

    Parameters
    ----------
    images : ndarray of shape (n_images, 96, 96, 3), uint8
    chunk : int
        Images per HOG pass, to bound memory.

    Returns
    -------
    features : ndarray of shape (n_images, 4548), float32
    """
    parts = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        grey = batch.astype(np.float32) @ (_GREY_WEIGHTS / 255.0)  # (n, 96, 96)
        parts.append(np.concatenate([hog(grey), colour_map(batch)], axis=1))
    return np.concatenate(parts)


def parse_stl10(paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 as in the paper: the 13,000 labelled images (train then test) as :func:`stl10_features`.

    Parameters
    ----------
    paths : dict of str to Path
        :data:`STL10_ARCHIVE` -> its local path.

    Returns
    -------
    x : ndarray of shape (n_images, 4548), float32
    y : ndarray of shape (n_images,), int64
        Classes 0..9 (airplane, bird, car, cat, deer, dog, horse, monkey, ship, truck).
    """
    members = read_stl10_archive(paths[STL10_ARCHIVE])
    images, labels = [], []
    for split in ("train", "test"):
        split_images = stl10_images(members[f"{split}_X.bin"], f"{split}_X.bin")
        images.append(split_images)
        labels.append(stl10_labels(members[f"{split}_y.bin"], len(split_images), f"{split}_y.bin"))
    return stl10_features(np.concatenate(images)), np.concatenate(labels)


# --- features cache -----------------------------------------------------------------------------


def save_features(out: BinaryIO, x: np.ndarray | sparse.csr_matrix, y: np.ndarray) -> None:
    """Write features as an ``.npz`` to ``out``: ``x`` and ``y``, or a sparse ``x`` as its CSR arrays.

    Parameters
    ----------
    out : binary file object
    x : ndarray or csr_matrix of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    """
    if sparse.issparse(x):
        arrays = {"x_data": x.data, "x_indices": x.indices, "x_indptr": x.indptr, "x_shape": np.array(x.shape)}
    else:
        arrays = {"x": x}
    np.savez(out, y=y, **arrays)


def load_features(path: Path) -> tuple[np.ndarray | sparse.csr_matrix, np.ndarray]:
    """Features written by :func:`save_features`.

    Returns
    -------
    x : ndarray or csr_matrix of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    """
    try:
        with np.load(path, allow_pickle=False) as saved:
            if "x" in saved:
                return saved["x"], saved["y"]
            shape = tuple(int(n) for n in saved["x_shape"])
            return sparse.csr_matrix((saved["x_data"], saved["x_indices"], saved["x_indptr"]), shape=shape), saved["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"features cache {path} is unreadable ({exc}); delete it to compute them again") from exc
