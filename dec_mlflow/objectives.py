"""The DEC objective as pure functions (Xie, Girshick, Farhadi, ICML 2016, section 3.1).

Tensors in, tensors out: no device choice, seeding, I/O or logging here.
"""

from __future__ import annotations

import torch


def soft_assignment(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Student's t similarity between embedded points and centroids (paper eq. 1).

    q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha + 1) / 2), normalised over j.

    Parameters
    ----------
    z : Tensor of shape (n_samples, n_features)
    centroids : Tensor of shape (n_clusters, n_features)
    alpha : float
        Degrees of freedom of the Student's t kernel; the paper uses 1.

    Returns
    -------
    q : Tensor of shape (n_samples, n_clusters), rows sum to 1.
    """
    kernel = (1.0 + _sq_dist(z, centroids) / alpha).pow(-(alpha + 1.0) / 2.0)
    return kernel / kernel.sum(1, keepdim=True)


def _sq_dist(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """|z_i - mu_j|^2 of shape (n_samples, n_clusters)."""
    # |z - mu|^2 expanded as |z|^2 - 2 z.mu + |mu|^2 keeps the work in one matmul instead of
    # materialising an (n, k, d) difference tensor; clamp guards the rounding below zero.
    return (z.pow(2).sum(1, keepdim=True) - 2.0 * z @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0.0)


def target_distribution(q: torch.Tensor, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """Auxiliary target distribution P (paper eq. 3).

    p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), with soft cluster frequencies f_j = sum_i q_ij.
    Squaring sharpens confident assignments; dividing by f_j keeps large clusters from taking over.
    The frequencies must be taken over the whole data set: pass the full q, or the rows of q of one
    part of the data together with the ``frequencies`` of the whole.

    Parameters
    ----------
    q : Tensor of shape (n_samples, n_clusters)
    frequencies : Tensor of shape (n_clusters,), optional
        f_j over the whole data set; default ``q.sum(0)``.

    Returns
    -------
    p : Tensor of shape (n_samples, n_clusters), rows sum to 1.
    """
    weight = q.pow(2) / (q.sum(0) if frequencies is None else frequencies)  # (n_samples, n_clusters)
    return weight / weight.sum(1, keepdim=True)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij), averaged over samples (paper eq. 2).

    Averaging over the batch instead of summing keeps the gradient scale independent of the
    batch size, so one learning rate serves every batch size.

    Parameters
    ----------
    p, q : Tensor of shape (n_samples, n_clusters)

    Returns
    -------
    Scalar tensor, >= 0, zero iff p equals q.
    """
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(1).mean()


def kl_gradient_wrt_z(z: torch.Tensor, centroids: torch.Tensor, p: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Closed-form gradient of KL(P || Q) with respect to each embedded point, P held fixed (paper eq. 4).

    dL/dz_i = (alpha + 1) / alpha * sum_j (1 + |z_i - mu_j|^2 / alpha)^-1 (p_ij - q_ij) (z_i - mu_j),
    with q = ``soft_assignment(z, centroids, alpha)``.

    This is the gradient of the loss SUMMED over samples, L = sum_i sum_j p_ij log(p_ij / q_ij), as in
    the paper, so row i depends on point i alone and not on how many points there are.
    :func:`kl_divergence` averages over samples, so the autograd gradient of
    ``kl_divergence(p, soft_assignment(z, centroids, alpha))`` is this result divided by n_samples
    (up to its ``eps``).

    Parameters
    ----------
    z : Tensor of shape (n_samples, n_features)
    centroids : Tensor of shape (n_clusters, n_features)
    p : Tensor of shape (n_samples, n_clusters)
        Target distribution (:func:`target_distribution`), treated as a constant.
    alpha : float
        Degrees of freedom of the Student's t kernel, > 0.

    Returns
    -------
    grad : Tensor of shape (n_samples, n_features)
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got alpha={alpha}")
    if p.shape != (z.shape[0], centroids.shape[0]):
        raise ValueError(
            f"p must have shape (n_samples, n_clusters) = ({z.shape[0]}, {centroids.shape[0]}); got {tuple(p.shape)}"
        )
    inv_kernel = 1.0 / (1.0 + _sq_dist(z, centroids) / alpha)  # (n_samples, n_clusters)
    w = inv_kernel * (p - soft_assignment(z, centroids, alpha))  # (n_samples, n_clusters)
    # sum_j w_ij (z_i - mu_j) = z_i sum_j w_ij - (w @ mu)_i: one matmul, no (n, k, d) tensor.
    return (alpha + 1.0) / alpha * (w.sum(1, keepdim=True) * z - w @ centroids)
