"""Input scaling: which per-feature scaling suits the data, and one global factor on top of it.

Pure NumPy: arrays in, ``(offset, scale)`` out, so that ``(X - offset) * scale`` is what the
autoencoder sees. The affine map is part of the exported model, which is therefore fed raw features.
Every statistic is accumulated over chunks of rows (:func:`dec_mlflow.rows.chunks`), so a memory-mapped
or sparse ``X`` is read once per statistic and never copied; an in-memory ``X`` is one chunk.
"""

from __future__ import annotations

import numpy as np

from dec_mlflow.rows import Features, chunk_rows, chunks, streamed

SCALINGS = ("max", "standard", "none")
# Mean squared value of the scaled input. The default learning rates were tuned on MNIST pixels / 255,
# whose mean squared value is 0.112; SGD at pretrain_lr=1.0 diverges on data ten times larger (per-feature
# standardised data has 1.0), so every scaling but 'none' ends with one global factor that brings the
# data to this scale. The factor is a single number: it changes no feature's weight relative to another.
TARGET_MEAN_SQUARE = 0.1
# A non-negative matrix whose typical feature maxima lie within this ratio of each other is taken for
# one quantity measured on one scale (pixels, counts, tf-idf): 'max' keeps the features' relative sizes.
HOMOGENEOUS_RANGE = 10.0


def auto_scaling(X: Features) -> str:
    """The per-feature scaling that suits ``X`` (n_samples, n_features).

    'max' when every value is >= 0 and the 10th and 90th percentiles of the non-zero feature maxima
    lie within a factor :data:`HOMOGENEOUS_RANGE` (images in 0..1 or 0..255, counts, tf-idf rows):
    the features share a unit, and standardising would blow up rare ones (a pixel lit in one image
    in a thousand would reach 30 standard deviations). Otherwise 'standard' (tables of mixed units,
    data with negative values).
    """
    low = np.inf
    peaks = np.full(X.shape[1], -np.inf, np.float32)  # (n_features,) column maxima
    for block in chunks(X):
        low = min(low, float(block.min()))
        np.maximum(peaks, block.max(0), out=peaks)
    if low < 0:
        return "standard"
    peaks = peaks[peaks > 0]
    if peaks.size == 0:
        return "max"
    low, high = np.percentile(peaks, [10, 90])
    return "max" if high <= HOMOGENEOUS_RANGE * low else "standard"


def fit_scaling(X: Features, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``offset`` and ``scale``, each (n_features,) float32, for ``scaling``.

    'max' divides by the global max |x|, 'standard' standardises each feature (constant features
    keep scale 1), 'none' is the identity. After 'max' and 'standard' one global factor brings the
    mean squared value of ``(X - offset) * scale`` to :data:`TARGET_MEAN_SQUARE`.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    n_features = X.shape[1]
    offset = np.zeros(n_features, np.float64)
    scale = np.ones(n_features, np.float64)
    if scaling == "max":
        peak = max(float(np.abs(block).max()) for block in chunks(X))
        scale[:] = 1.0 / peak if peak > 0 else 1.0
    elif scaling == "standard":
        offset, std = _mean_std(X)
        scale = 1.0 / np.where(std > 0, std, 1.0)
    if scaling != "none":
        mean_square = _mean_square(X, offset, scale)
        if mean_square > 0:
            scale *= np.sqrt(TARGET_MEAN_SQUARE / mean_square)
    return offset.astype(np.float32), scale.astype(np.float32)


def _mean_std(X: Features) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation, (n_features,) float64, in two passes over the chunks.

    Two passes (the mean, then squares about it) as ``np.std`` does: one pass of sum and sum of
    squares loses the digits of features whose mean is large next to their spread.
    """
    n = X.shape[0]
    total = np.zeros(X.shape[1], np.float64)
    for block in chunks(X):
        total += block.sum(0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(X.shape[1], np.float64)
    for block in chunks(X):
        deviation = block - mean  # float64
        squares += np.multiply(deviation, deviation).sum(0)
    return mean, np.sqrt(squares / n)


def _mean_square(X: Features, offset: np.ndarray, scale: np.ndarray) -> float:
    """Mean of ((X - offset) * scale)^2 in float64, in chunks so no scaled copy of X is made."""
    # in memory, the 8192 rows a chunk has always had (a sum in other chunks differs in its last bits)
    size = chunk_rows(X.shape[1]) if streamed(X) else 8192
    total = 0.0
    for block in chunks(X, size):
        total += float(np.square((block.astype(np.float64) - offset) * scale).sum())
    return total / (X.shape[0] * X.shape[1])
