"""Input scaling: which per-feature scaling suits the data, and one global factor on top of it.

Pure NumPy: arrays in, ``(offset, scale)`` out, so that ``(X - offset) * scale`` is what the
autoencoder sees. The affine map is part of the exported model, which is therefore fed raw features.
"""

from __future__ import annotations

import numpy as np

SCALINGS = ("max", "standard", "none")
# Mean squared value of the scaled input. The default learning rates were tuned on MNIST pixels / 255,
# whose mean squared value is 0.112; SGD at pretrain_lr=1.0 diverges on data ten times larger (per-feature
# standardised data has 1.0), so every scaling but 'none' ends with one global factor that brings the
# data to this scale. The factor is a single number: it changes no feature's weight relative to another.
TARGET_MEAN_SQUARE = 0.1
# A non-negative matrix whose typical feature maxima lie within this ratio of each other is taken for
# one quantity measured on one scale (pixels, counts, tf-idf): 'max' keeps the features' relative sizes.
HOMOGENEOUS_RANGE = 10.0


def auto_scaling(X: np.ndarray) -> str:
    """The per-feature scaling that suits ``X`` (n_samples, n_features).

    'max' when every value is >= 0 and the 10th and 90th percentiles of the non-zero feature maxima
    lie within a factor :data:`HOMOGENEOUS_RANGE` (images in 0..1 or 0..255, counts, tf-idf rows):
    the features share a unit, and standardising would blow up rare ones (a pixel lit in one image
    in a thousand would reach 30 standard deviations). Otherwise 'standard' (tables of mixed units,
    data with negative values).
    """
    if X.min() < 0:
        return "standard"
    peaks = X.max(0)
    peaks = peaks[peaks > 0]
    if peaks.size == 0:
        return "max"
    low, high = np.percentile(peaks, [10, 90])
    return "max" if high <= HOMOGENEOUS_RANGE * low else "standard"


def fit_scaling(X: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
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
        peak = float(np.abs(X).max())
        scale[:] = 1.0 / peak if peak > 0 else 1.0
    elif scaling == "standard":
        offset = X.mean(0, dtype=np.float64)
        std = X.std(0, dtype=np.float64)
        scale = 1.0 / np.where(std > 0, std, 1.0)
    if scaling != "none":
        mean_square = _mean_square(X, offset, scale)
        if mean_square > 0:
            scale *= np.sqrt(TARGET_MEAN_SQUARE / mean_square)
    return offset.astype(np.float32), scale.astype(np.float32)


def _mean_square(X: np.ndarray, offset: np.ndarray, scale: np.ndarray, chunk: int = 8192) -> float:
    """Mean of ((X - offset) * scale)^2 in float64, in chunks so no scaled copy of X is made."""
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        block = (X[start : start + chunk].astype(np.float64) - offset) * scale
        total += float(np.square(block).sum())
    return total / X.size
