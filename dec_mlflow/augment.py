"""Data augmentation for image-shaped inputs (DEC-DA: Guo, Zhu, Liu, Yin, ACML 2018).

Random shifts and small rotations of flattened images, as DEC-DA applies them in pretraining and
self-training. Tensors in, tensors out; the randomness comes from an explicit ``torch.Generator``.
Tabular data has no image shape and is never augmented: the estimator refuses ``augment`` without
one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

import torch
from torch.nn import functional as F

# DEC-DA's Keras ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, rotation_range=10)
MAX_SHIFT = 0.1  # fraction of the image width / height
MAX_ROTATION = 10.0  # degrees


def check_image_shape(image_shape: Sequence[int], n_features: int) -> tuple[int, int, int]:
    """``(height, width, channels)`` of ``image_shape`` after checking that it covers ``n_features``.

    ``image_shape`` is ``(height, width)`` or ``(height, width, channels)``, channels last, as a
    row-major flattened image is laid out.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"image_shape must be (height, width) or (height, width, channels) of positive integers; got {image_shape!r}")
    height, width, channels = (*shape, 1) if len(shape) == 2 else shape
    if height * width * channels != n_features:
        raise ValueError(
            f"image_shape {shape} holds {height * width * channels} values per sample, but the data has {n_features} features"
        )
    return height, width, channels


def random_shift_rotate(
    x: torch.Tensor,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
    *,
    max_shift: float = MAX_SHIFT,
    max_rotation: float = MAX_ROTATION,
) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` of its size and rotate it by up to ``max_rotation`` degrees.

    Bilinear resampling; pixels that come from outside the image repeat the border (Keras'
    'nearest' fill), so a background of any value stays that value.

    Parameters
    ----------
    x : Tensor of shape (n_samples, height * width * channels), flattened channels-last images
    image_shape : (height, width, channels), see :func:`check_image_shape`
    generator : torch.Generator on x's device, the only source of randomness

    Returns
    -------
    Tensor of the same shape and dtype as ``x``.
    """
    height, width, channels = image_shape
    n = x.shape[0]
    images = x.reshape(n, height, width, channels).permute(0, 3, 1, 2)  # (n, c, h, w)
    uniform = torch.rand((n, 3), generator=generator, device=x.device, dtype=torch.float32) * 2.0 - 1.0
    angle = uniform[:, 0] * math.radians(max_rotation)
    # affine_grid works in normalised coordinates [-1, 1]: a shift of s of the size is 2 s
    shift = uniform[:, 1:] * (2.0 * max_shift)  # (n, 2): x then y
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (n, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(n, -1)


# Image-shape inference. A row is taken for a square single-channel image only when its pixels behave like
# one: horizontally AND vertically adjacent pixels correlate (a 1-D signal folded into a square has
# neighbours along one axis only, a table's or a vocabulary's adjacent columns are unrelated), far more
# than pixels half an image apart. MNIST: about 0.8 against 0.05; digits (8x8): about 0.6 against 0.0.
MIN_IMAGE_SIDE = 5  # a 4 x 4 "image" of 16 values is more likely a table than a picture
MIN_NEIGHBOUR_CORRELATION = 0.3
MIN_CORRELATION_GAP = 0.2  # neighbour correlation minus the mean |correlation| of distant pixels
SHAPE_SAMPLE_ROWS = 2000


def infer_image_shape(X, *, seed: int = 0) -> tuple[int, int] | None:
    """``(side, side)`` when the rows of ``X`` look like square single-channel images, else None.

    The rules, each necessary: a dense matrix (sparse input is text or counts, never an image);
    ``n_features`` a perfect square with side >= :data:`MIN_IMAGE_SIDE`; every value >= 0 and
    finite; one value range (:func:`dec_mlflow.scaling.auto_scaling` chooses 'max'); and, on a
    seeded sample of up to 2,000 rows, horizontally and vertically adjacent pixels each correlated
    by at least :data:`MIN_NEIGHBOUR_CORRELATION` on average and by :data:`MIN_CORRELATION_GAP`
    more than pixels at least half a side apart.

    Parameters
    ----------
    X : ndarray, memory map or scipy.sparse matrix of shape (n_samples, n_features)
    seed : int
        Seeds the row sample and the distant pixel pairs.
    """
    from scipy import sparse

    from dec_mlflow.scaling import auto_scaling

    if sparse.issparse(X) or getattr(X, "ndim", 0) != 2 or X.shape[0] < 3:
        return None
    side = math.isqrt(X.shape[1])
    if side * side != X.shape[1] or side < MIN_IMAGE_SIDE:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(X.shape[0], size=min(SHAPE_SAMPLE_ROWS, X.shape[0]), replace=False))
    sample = np.asarray(X[rows], dtype=np.float64)  # (m, side * side); a memory map reads only these rows
    if not np.isfinite(sample).all() or sample.min() < 0 or auto_scaling(sample.astype(np.float32)) != "max":
        return None
    correlation = _pixel_correlation(sample)  # (n, n), NaN for constant pixels
    grid = np.arange(side * side).reshape(side, side)
    horizontal = np.nanmean(correlation[grid[:, :-1].ravel(), grid[:, 1:].ravel()]) if side > 1 else np.nan
    vertical = np.nanmean(correlation[grid[:-1, :].ravel(), grid[1:, :].ravel()])
    a, b = rng.integers(0, side * side, size=(2, 20000))
    (ra, ca), (rb, cb) = np.divmod(a, side), np.divmod(b, side)
    far = np.maximum(np.abs(ra - rb), np.abs(ca - cb)) >= side / 2
    distant = np.nanmean(np.abs(correlation[a[far], b[far]])) if far.any() else np.nan
    neighbour = min(horizontal, vertical)
    if not np.isfinite(neighbour) or not np.isfinite(distant):
        return None
    if neighbour >= MIN_NEIGHBOUR_CORRELATION and neighbour - distant >= MIN_CORRELATION_GAP:
        return side, side
    return None


def _pixel_correlation(sample: np.ndarray) -> np.ndarray:
    """Pearson correlation between the columns of ``sample`` (m, n); NaN where a column is constant."""
    centred = sample - sample.mean(0)
    norm = np.sqrt(np.square(centred).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = centred / np.where(norm > 0, norm, np.nan)
    return unit.T @ unit
