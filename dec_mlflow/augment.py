"""Data augmentation for image-shaped inputs (DEC-DA: Guo, Zhu, Liu, Yin, ACML 2018).

Random shifts and small rotations of flattened images, as DEC-DA applies them in pretraining and
self-training. Tensors in, tensors out; the randomness comes from an explicit ``torch.Generator``.
Tabular data has no image shape and is never augmented: the estimator refuses ``augment`` without
one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
