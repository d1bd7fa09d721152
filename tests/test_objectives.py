"""The DEC objective (paper eq. 1-4) on tiny cases computed by hand and against autograd."""

import math

import pytest
import torch

from dec_mlflow.objectives import (
    kl_divergence,
    kl_gradient_wrt_z,
    soft_assignment,
    target_distribution,
)


def test_soft_assignment_matches_hand_computed_student_t():
    z = torch.tensor([[0.0, 0.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # squared distances 1 and 4 -> kernels 1/2 and 1/5 (alpha=1) -> normalised 5/7 and 2/7
    q = soft_assignment(z, mu)
    assert torch.allclose(q, torch.tensor([[5 / 7, 2 / 7]]))


def test_soft_assignment_alpha_changes_kernel_exponent():
    z = torch.tensor([[0.0]])
    mu = torch.tensor([[1.0], [2.0]])
    # alpha=2: (1 + d/2)^(-3/2) for d = 1, 4
    k = torch.tensor([1.5 ** -1.5, 3.0 ** -1.5])
    assert torch.allclose(soft_assignment(z, mu, alpha=2.0), (k / k.sum())[None])


def test_soft_assignment_rows_sum_to_one_and_nearest_centroid_wins():
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(50, 4, generator=g), torch.randn(6, 4, generator=g)
    q = soft_assignment(z, mu)
    assert q.shape == (50, 6)
    assert torch.allclose(q.sum(1), torch.ones(50))
    assert torch.equal(q.argmax(1), torch.cdist(z, mu).argmin(1))


def test_target_distribution_hand_computed():
    q = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    f = q.sum(0)  # 1.2, 0.8
    w = q**2 / f
    expected = w / w.sum(1, keepdim=True)
    p = target_distribution(q)
    assert torch.allclose(p, expected)
    assert math.isclose(float(p[0, 0]), (0.64 / 1.2) / (0.64 / 1.2 + 0.04 / 0.8), rel_tol=1e-6)


def test_target_distribution_sharpens_confident_assignments():
    q = torch.tensor([[0.7, 0.3], [0.3, 0.7]])  # balanced clusters: f_j equal
    p = target_distribution(q)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert p[0, 0] > q[0, 0] and p[1, 1] > q[1, 1]


def test_target_distribution_divides_by_cluster_frequency():
    # Both rows are equally unsure, but cluster 0 is larger overall: P moves mass to cluster 1.
    q = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    p = target_distribution(q)
    assert p[0, 1] > 0.5


def test_kl_zero_iff_equal():
    q = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert float(kl_divergence(q, q)) == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    # only row 0 differs; mean over 2 rows
    expected = (0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)) / 2
    assert float(kl_divergence(p, q)) == pytest.approx(expected, rel=1e-6)
    assert float(kl_divergence(p, q)) > 0


def test_kl_gradient_flows_to_centroids():
    z = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    mu = torch.tensor([[0.5, 0.0], [2.0, 3.0]], requires_grad=True)
    q = soft_assignment(z, mu)
    loss = kl_divergence(target_distribution(q).detach(), q)
    loss.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_kl_gradient_wrt_z_is_n_times_autograd_of_the_mean_kl(alpha):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = target_distribution(soft_assignment(z, mu, alpha)).detach()  # held fixed, as in self-training
    (autograd,) = torch.autograd.grad(kl_divergence(p, soft_assignment(z, mu, alpha)), z)
    # kl_divergence averages over the 30 samples; eq. 4 is the gradient of the sum
    closed = kl_gradient_wrt_z(z.detach(), mu, p, alpha)
    assert closed.shape == (30, 3)
    torch.testing.assert_close(closed, 30 * autograd, rtol=1e-5, atol=0.0)


def test_kl_gradient_wrt_z_hand_computed_single_point():
    # one point at 0, centroids at 1 and -1 (alpha=1): q = (1/2, 1/2), (1 + |z - mu_j|^2)^-1 = 1/2
    z = torch.tensor([[0.0]])
    mu = torch.tensor([[1.0], [-1.0]])
    p = torch.tensor([[1.0, 0.0]])
    # 2 * [1/2 * (1 - 1/2) * (0 - 1) + 1/2 * (0 - 1/2) * (0 + 1)] = 2 * (-1/4 - 1/4) = -1:
    # descent moves z towards mu_0, where P puts all the mass
    assert torch.allclose(kl_gradient_wrt_z(z, mu, p), torch.tensor([[-1.0]]))


def test_kl_gradient_wrt_z_is_zero_when_p_equals_q():
    g = torch.Generator().manual_seed(2)
    z, mu = torch.randn(10, 2, generator=g), torch.randn(3, 2, generator=g)
    grad = kl_gradient_wrt_z(z, mu, soft_assignment(z, mu))
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)


def test_kl_gradient_wrt_z_rejects_p_of_the_wrong_shape_and_bad_alpha():
    z, mu = torch.zeros(5, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"p must have shape \(n_samples, n_clusters\) = \(5, 3\); got \(5, 2\)"):
        kl_gradient_wrt_z(z, mu, torch.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="alpha must be > 0; got alpha=0"):
        kl_gradient_wrt_z(z, mu, torch.full((5, 3), 1 / 3), alpha=0)
