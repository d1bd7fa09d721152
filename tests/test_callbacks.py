"""SelfTrainRecorder keeps what the self-training figures need, in order, from the live model."""

import numpy as np
import pytest
import torch
from torch import nn

from dec_mlflow.callbacks import CallbackList, SelfTrainRecorder
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.objectives import (
    kl_gradient_wrt_z,
    soft_assignment,
    target_distribution,
)
from dec_mlflow.training import self_train

M, N_FULL, N_FEATURES, DIM, K = 60, 100, 5, 3, 4
STEPS = (0, 10, 20)


def _model(seed=0):
    """A tiny linear encoder and centroids: (encoder, centroids (K, DIM))."""
    torch.manual_seed(seed)
    return nn.Linear(N_FEATURES, DIM).eval(), nn.Parameter(torch.randn(K, DIM))


def _run_by_hand(recorder):
    """Play three target updates, moving the encoder in between as training would.

    Returns the embeddings (M, DIM) and centroids the recorder saw at each update, and the full
    labels passed to on_update.
    """
    encoder, centroids = _model()
    x = recorder.x
    seen, full_labels = [], []
    rng = np.random.default_rng(0)
    for i, step in enumerate(STEPS):
        with torch.no_grad():
            encoder.weight.add_(0.3 * torch.randn_like(encoder.weight))
            seen.append((encoder(x).clone(), centroids.detach().clone()))
        labels = rng.integers(0, K, N_FULL)
        full_labels.append(labels)
        recorder.on_update(step, labels, {"kl_loss": 1.0 / (i + 1), "delta_label": 0.5**i})
        recorder.on_state(step, encoder, centroids)
    return seen, full_labels


@pytest.fixture
def x():
    return torch.randn(M, N_FEATURES, generator=torch.Generator().manual_seed(1))


def test_recorder_appends_metrics_and_snapshots_in_update_order(x):
    rec = SelfTrainRecorder(x, alpha=1.0)
    _run_by_hand(rec)
    assert rec.history == {"step": list(STEPS), "kl_loss": [1.0, 0.5, 1 / 3], "delta_label": [1.0, 0.5, 0.25]}
    assert [s for s, _, _ in rec.snapshots] == list(STEPS)


def test_snapshot_z_is_exactly_the_encoder_output_and_labels_its_argmax_q(x):
    rec = SelfTrainRecorder(x, alpha=2.0)
    seen, _ = _run_by_hand(rec)
    for (_, z, labels), (z_seen, mu) in zip(rec.snapshots, seen):
        assert z.dtype == np.float32 and z.shape == (M, DIM)
        np.testing.assert_array_equal(z, z_seen.numpy())
        np.testing.assert_array_equal(labels, soft_assignment(z_seen, mu, 2.0).argmax(1).numpy())


def test_gradient_is_recorded_at_the_first_update_only_and_matches_eq4(x):
    rec = SelfTrainRecorder(x, alpha=2.0)
    seen, _ = _run_by_hand(rec)
    z0, mu = seen[0]
    q = soft_assignment(z0, mu, 2.0)
    p = target_distribution(q)  # f_j from the subsample
    expected = kl_gradient_wrt_z(z0, mu, p, 2.0).norm(dim=1).numpy()
    assert rec.gradient["step"] == STEPS[0]
    np.testing.assert_allclose(rec.gradient["q"], q.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rec.gradient["p"], p.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rec.gradient["grad_norm"], expected, rtol=1e-6)
    assert rec.gradient["grad_norm"].shape == (M,) and rec.gradient["grad_norm"].dtype == np.float32


def test_accuracy_is_recorded_only_when_y_full_is_given(x):
    y_full = np.arange(N_FULL) % K
    with_y = SelfTrainRecorder(x, y_full=y_full)
    _, full_labels = _run_by_hand(with_y)
    assert with_y.history["accuracy"] == [cluster_accuracy(y_full, lab) for lab in full_labels]
    without = SelfTrainRecorder(x)
    _run_by_hand(without)
    assert "accuracy" not in without.history


def test_y_full_of_the_wrong_length_is_rejected_at_the_update(x):
    rec = SelfTrainRecorder(x, y_full=np.zeros(N_FULL + 1, dtype=int))
    with pytest.raises(ValueError, match="y_full must label the whole training data: 101 labels for 100 samples"):
        rec.on_update(0, np.zeros(N_FULL, dtype=int), {"kl_loss": 0.0, "delta_label": 1.0})


def test_a_new_self_train_stage_starts_a_new_recording(x):
    rec = SelfTrainRecorder(x)
    _run_by_hand(rec)
    rec.on_stage_begin("kmeans", None)  # other stages leave the recording alone
    assert len(rec.snapshots) == len(STEPS)
    rec.on_stage_begin("self_train", 100)
    assert rec.history["step"] == [] and rec.snapshots == [] and rec.gradient is None


def test_recorder_rejects_bad_inputs_naming_the_parameter(x):
    with pytest.raises(ValueError, match=r"x must be a non-empty 2-D tensor \(m, n_features\); got shape \(60,\)"):
        SelfTrainRecorder(x[:, 0])
    with pytest.raises(ValueError, match=r"y must have shape \(m,\) = \(60,\) like x; got \(59,\)"):
        SelfTrainRecorder(x, np.zeros(59))
    with pytest.raises(ValueError, match="alpha must be > 0; got alpha=-1"):
        SelfTrainRecorder(x, alpha=-1)


def test_recorder_follows_a_real_self_training_run(x):
    encoder, centroids = _model()
    x_full = torch.cat([x, torch.randn(40, N_FEATURES, generator=torch.Generator().manual_seed(2))])
    rec = SelfTrainRecorder(x, alpha=1.0)
    result = self_train(encoder, centroids, x_full, alpha=1.0, batch_size=20, lr=0.01, momentum=0.9,
                        update_interval=5, tol=0.0, max_iter=15, callback=CallbackList([rec]))
    assert rec.history["step"] == [0, 5, 10, 15]
    assert rec.history["kl_loss"][-1] == pytest.approx(result.kl_loss)
    with torch.no_grad():
        np.testing.assert_array_equal(rec.snapshots[-1][1], encoder.eval()(x).numpy())
    assert rec.gradient["step"] == 0
