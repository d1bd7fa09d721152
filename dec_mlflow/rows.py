"""Feature matrices larger than memory: dense float32 rows read a chunk or a batch at a time.

A dataset's features (:class:`dec_mlflow.data.Dataset` ``x``) are one of

- an in-memory ndarray;
- a read-only ``np.memmap`` over a file (a ``.npy`` file, or the spill file a ``.parquet`` is written
  to row group by row group): pages are read when a chunk or batch touches them and belong to the
  page cache, not to the process;
- a ``scipy.sparse`` CSR matrix (REUTERS tf-idf): it stays sparse, and only the rows of one chunk or
  batch are made dense.

The functions here read any of them as dense float32 rows a piece at a time, so that the two latter
are never copied whole. An in-memory ndarray is read as it always was (one chunk, the array itself),
which keeps results on in-memory data bit-identical to those before streaming existed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from scipy import sparse

Features = np.ndarray | sparse.csr_matrix  # (n_samples, n_features); np.memmap is an ndarray
CHUNK_BYTES = 32 << 20  # dense float32 bytes per chunk of a streamed pass: small next to any data worth streaming


def streamed(x: Features) -> bool:
    """True when ``x`` must be read in pieces: a memory map or a sparse matrix."""
    return sparse.issparse(x) or isinstance(x, np.memmap)


def chunk_rows(n_features: int) -> int:
    """Rows per chunk of a streamed pass: :data:`CHUNK_BYTES` of float32."""
    return max(1, CHUNK_BYTES // (4 * n_features))


def dense(x: Features, index: slice | np.ndarray) -> np.ndarray:
    """Rows ``x[index]`` (a slice or integer positions) as a dense float32 ndarray (b, n_features).

    Rows of a memory map are read into memory (a writable array of their own); rows of an in-memory
    float32 array are a view when ``index`` is a slice.
    """
    block = x[index]
    if sparse.issparse(block):
        return block.toarray().astype(np.float32, copy=False)
    if isinstance(block, np.memmap):
        return np.array(block, dtype=np.float32)
    return np.asarray(block, dtype=np.float32)


def chunks(x: Features, size: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive blocks of rows of ``x`` as dense float32 (b, n_features), in order.

    ``size`` rows per block; by default the whole matrix at once when it is in memory (no copy if
    it is float32 already), else :func:`chunk_rows` rows.
    """
    n = x.shape[0]
    if size is None:
        size = chunk_rows(x.shape[1]) if streamed(x) else n
    for start in range(0, n, size):
        yield dense(x, slice(start, start + size))


class ScaledRows:
    """``(x - offset) * scale`` of a streamed ``x``, computed per batch on ``device``.

    Indexes like the scaled tensor an in-memory ``x`` becomes (:func:`scaled`): ``rows[a:b]`` or
    ``rows[index_tensor]`` is a float32 tensor (b, n_features) on ``device``, and ``shape``,
    ``device``, ``numel()`` and ``cpu()`` answer as a tensor's would; so the training loops read
    the same for both. Nothing of ``x`` is kept but the batch being read.
    """

    def __init__(self, x: Features, offset: np.ndarray, scale: np.ndarray, device: torch.device):
        self.x, self.offset, self.scale = x, np.asarray(offset, np.float32), np.asarray(scale, np.float32)
        self.device = torch.device(device)
        self.shape = torch.Size(x.shape)
        # 'max' and 'none' scaling have no offset: x - 0 is x exactly, so that pass over the rows is skipped
        self._shifts = bool(self.offset.any())

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def cpu(self) -> ScaledRows:
        return ScaledRows(self.x, self.offset, self.scale, torch.device("cpu"))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            block = self._scaled(self.x[index])
        else:
            positions = np.asarray(index.cpu(), dtype=np.int64)
            order = np.argsort(positions, kind="stable")  # read the file forwards
            block = self._scaled(self.x[positions[order]])
            block = block[np.argsort(order)]  # rows back in batch order
        return torch.from_numpy(block).to(self.device)

    def _scaled(self, rows) -> np.ndarray:
        """``(rows - offset) * scale`` as a new float32 array, in as few passes over the rows as the
        arithmetic allows: the read of a memory map is the first operation's input, never a copy of its own."""
        if sparse.issparse(rows):
            rows = rows.toarray().astype(np.float32, copy=False)
            if self._shifts:
                rows -= self.offset
            rows *= self.scale
            return rows
        if self._shifts:
            block = np.subtract(rows, self.offset, dtype=np.float32)
            block *= self.scale
            return block
        return np.multiply(rows, self.scale, dtype=np.float32)


class MappedRows:
    """``fn`` of each batch of ``rows``, computed when read, without autograd (a lazily mapped matrix).

    Stands for the output of already trained layers over the whole data (layer-wise pretraining)
    when that output would be too large to keep.
    """

    def __init__(self, rows: ScaledRows | MappedRows, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.rows, self.fn, self.device = rows, fn, rows.device
        with torch.no_grad():
            width = fn(rows[0:1]).shape[1]
        self.shape = torch.Size((rows.shape[0], width))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(self.rows[index])


def scaled(x: Features, offset: np.ndarray, scale: np.ndarray, device: torch.device) -> torch.Tensor | ScaledRows:
    """``(x - offset) * scale`` as the training loops read it.

    An in-memory float32 ``x`` becomes one tensor on ``device`` (as fast to index as it gets); a
    streamed one a :class:`ScaledRows` that scales each batch as it is read. Both give the same values.
    """
    if streamed(x):
        return ScaledRows(x, offset, scale, device)
    return torch.from_numpy((x - offset) * scale).to(device)
