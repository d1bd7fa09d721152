"""Augmentation: image batches keep their shape; tabular data is never augmented."""

import numpy as np
from sklearn.datasets import make_blobs
import pytest
import torch

from dec_mlflow import DEC
from dec_mlflow.augment import check_image_shape, random_shift_rotate
from dec_mlflow.callbacks import Callback


def test_shapes_and_dtype_are_kept():
    x = torch.rand(5, 28 * 28)
    out = random_shift_rotate(x, (28, 28, 1), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_colour_images_keep_channels_apart():
    x = torch.zeros(3, 8 * 8 * 3)
    x.view(3, 8, 8, 3)[..., 1] = 1.0  # only the green channel is lit, everywhere
    out = random_shift_rotate(x, (8, 8, 3), torch.Generator().manual_seed(0))
    img = out.view(3, 8, 8, 3)
    torch.testing.assert_close(img[..., 1], torch.ones(3, 8, 8))  # the border repeats, so it stays lit
    assert img[..., 0].abs().max() == 0 and img[..., 2].abs().max() == 0


def test_no_shift_no_rotation_is_the_identity():
    x = torch.rand(4, 10 * 12)
    out = random_shift_rotate(x, (10, 12, 1), torch.Generator().manual_seed(0), max_shift=0.0, max_rotation=0.0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_a_shift_moves_the_image_and_the_seed_fixes_it():
    x = torch.zeros(64, 28 * 28)
    x.view(64, 28, 28)[:, 10:18, 10:18] = 1.0
    a = random_shift_rotate(x, (28, 28, 1), torch.Generator().manual_seed(1))
    b = random_shift_rotate(x, (28, 28, 1), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    moved = (a - x).abs().sum(1)
    assert (moved > 1.0).float().mean() > 0.9  # nearly every image moved
    # the mass of a shifted square stays about the same (bilinear resampling, no clipping at the edge)
    torch.testing.assert_close(a.sum(1), x.sum(1), rtol=0.1, atol=0)


def test_image_shape_must_cover_the_features():
    with pytest.raises(ValueError, match=r"image_shape \(28, 28\) holds 784 values per sample, but the data has 64 features"):
        check_image_shape((28, 28), 64)
    with pytest.raises(ValueError, match="image_shape must be .height, width. or .height, width, channels."):
        check_image_shape((28,), 28)


def test_augment_without_image_shape_is_refused_for_tabular_data():
    with pytest.raises(ValueError, match="augment=True needs image_shape.*never to tabular data"):
        DEC(n_clusters=2, augment=True, image_shape=None).validate_params()
    x = np.random.default_rng(0).uniform(0, 1, size=(50, 6)).astype(np.float32)  # one scale, but no image
    with pytest.raises(ValueError, match="augment=True needs image_shape, but none was given and the rows do not look"):
        DEC(n_clusters=2, augment=True, hidden_dims=(8, 2), pretrain_epochs=1).fit(x)


def test_augment_auto_distils_augmented_images_and_never_augments_tables():
    rng = np.random.default_rng(0)
    digits = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().data[:300].astype(np.float32)
    assert DEC().resolve(digits)["image_shape"] == (8, 8) and DEC().resolve(digits)["augment"] == "distill"
    table = rng.normal(size=(300, 64)).astype(np.float32)
    assert DEC().resolve(table)["image_shape"] is None and DEC().resolve(table)["augment"] is False
    assert DEC(image_shape=None).resolve(digits)["augment"] is False  # image_shape=None turns it off
    assert DEC(init="kmeans").resolve(digits)["augment"] is False  # no distillation to augment


def test_augment_with_per_feature_scaling_is_refused():
    with pytest.raises(ValueError, match="scaling must be 'auto', 'max' or 'none', not 'standard'"):
        DEC(n_clusters=2, augment=True, image_shape=(2, 3), scaling="standard").validate_params()


def test_augment_refuses_data_that_auto_scales_per_feature():
    # a 'picture' with negative values gets 'standard' from the auto rule: shifting it would be wrong
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    est = DEC(n_clusters=2, augment=True, image_shape=(2, 3), hidden_dims=(8, 2), pretrain_epochs=1)
    with pytest.raises(ValueError, match="augment=True needs one scale for every pixel"):
        est.pretrain(x)


def test_finetune_augments_self_training_but_not_pretraining():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(120, 16)).astype(np.float32)  # 4x4 'images' in [0, 1]
    small = dict(n_clusters=2, image_shape=(4, 4), hidden_dims=(8, 2), pretrain_epochs=2, update_interval=2,
                 max_iter=6, batch_size=32, pretrain_batch_size=32, init="kmeans", n_init=2, precision="fp32")
    plain_ae = DEC(**small).pretrain(x)
    finetune_ae = DEC(**small, augment="finetune").pretrain(x)
    for a, b in zip(plain_ae.autoencoder.parameters(), finetune_ae.autoencoder.parameters()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())  # pretraining saw clean images
    all_ae = DEC(**small, augment=True).pretrain(x)
    assert not np.array_equal(all_ae.autoencoder.encoder[0].weight.detach().numpy(),
                              plain_ae.autoencoder.encoder[0].weight.detach().numpy())
    plain = DEC(**small).fit(x, autoencoder=plain_ae)
    finetuned = DEC(**small, augment="finetune").fit(x, autoencoder=plain_ae)
    assert not np.array_equal(plain.network_.encoder[0].weight.detach().numpy(),
                              finetuned.network_.encoder[0].weight.detach().numpy())  # self-training saw shifted ones


@pytest.mark.parametrize("augment, distill_augmented, self_train_augmented", [
    (False, False, False), ("auto", True, False), ("distill", True, False), ("finetune", True, True), (True, True, True)])
def test_each_augment_value_augments_the_stages_it_names(monkeypatch, augment, distill_augmented, self_train_augmented):
    import dec_mlflow.training as training  # fit's stages: distill_and_self_train calls these
    seen = {}

    def recording(stage, real):
        def run(*args, **kwargs):
            seen[stage] = kwargs.get("transform") is not None
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(training, "distill", recording("distill", training.distill))
    monkeypatch.setattr(training, "self_train", recording("self_train", training.self_train))
    x = np.random.default_rng(0).uniform(0, 1, size=(120, 16)).astype(np.float32)
    DEC(n_clusters=2, image_shape=(4, 4), hidden_dims=(8, 2), pretrain_epochs=2, update_interval=2, max_iter=6,
        batch_size=32, pretrain_batch_size=32, precision="fp32", augment=augment).fit(x)
    assert seen == {"distill": distill_augmented, "self_train": self_train_augmented}


def test_distill_epochs_sets_the_length_of_distillation():
    stages = {}

    class Lengths(Callback):
        def on_stage_begin(self, stage, total):
            stages[stage] = total

    x = np.random.default_rng(0).uniform(0, 1, size=(640, 16)).astype(np.float32)
    small = dict(n_clusters=2, hidden_dims=(8, 2), pretrain_epochs=1, max_iter=4, batch_size=32, precision="fp32")
    ae = DEC(**small).pretrain(x)
    for epochs, expected in [(2, 2000), (150, 150 * 640 // 32)]:  # at least 2,000 steps, else epochs x batches per epoch
        DEC(**small, distill_epochs=epochs).fit(x, autoencoder=ae, callback=Lengths())
        assert stages["distill"] == expected


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "20"])
def test_distill_epochs_is_checked(value):
    with pytest.raises(ValueError, match=f"distill_epochs must be an integer >= 1; got {value!r}"):
        DEC(distill_epochs=value).validate_params()


def test_each_further_round_distils_the_previous_rounds_target_then_self_trains_again(monkeypatch):
    import torch

    import dec_mlflow.training as training  # fit's stages: distill_and_self_train calls these
    from dec_mlflow.objectives import target_distribution
    calls = []

    def recording(stage, real):
        def run(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append((stage, args[3].clone() if stage == "distill" else result))
            return result
        return run

    monkeypatch.setattr(training, "distill", recording("distill", training.distill))
    monkeypatch.setattr(training, "self_train", recording("self_train", training.self_train))
    x = np.random.default_rng(0).uniform(0, 1, size=(200, 16)).astype(np.float32)
    small = dict(n_clusters=3, hidden_dims=(8, 2), pretrain_epochs=1, update_interval=2, max_iter=6, batch_size=32,
                 precision="fp32", random_state=0)
    ae = DEC(**small).pretrain(x)
    est = DEC(**small, distill_rounds=3).fit(x, autoencoder=ae)
    assert [stage for stage, _ in calls] == ["distill", "self_train"] * 3
    results = [value for stage, value in calls if stage == "self_train"]
    teachers = [value for stage, value in calls if stage == "distill"]
    for previous, teacher in zip(results, teachers[1:]):  # rounds 2 and 3 learn the previous round's P
        torch.testing.assert_close(teacher, target_distribution(previous.q))
    assert len(est.round_labels_) == 3
    np.testing.assert_array_equal(est.round_labels_[-1], est.labels_)
    assert est.n_iter_ == sum(r.n_iter for r in results)
    one = DEC(**small).fit(x, autoencoder=ae)  # one round: the first round of three, to the bit
    np.testing.assert_array_equal(one.labels_, est.round_labels_[0])


def test_without_pretraining_a_further_round_distils_into_a_fresh_encoder(monkeypatch):
    import torch

    import dec_mlflow.training as training  # fit's stages: distill_and_self_train calls these
    students = []

    def recording(encoder, centroids, *args, **kwargs):
        students.append((encoder, [p.detach().clone() for p in encoder.parameters()], centroids.detach().clone()))
        return real(encoder, centroids, *args, **kwargs)

    real = training.distill
    monkeypatch.setattr(training, "distill", recording)
    x, _ = make_blobs(300, n_features=6, centers=3, random_state=0)
    small = dict(n_clusters=3, hidden_dims=(8, 2), update_interval=2, max_iter=6, batch_size=32, precision="fp32",
                 random_state=0)
    est = DEC(**small, distill_rounds=2).fit(x.astype(np.float32))
    assert est.resolved_params_["pretrain_epochs"] == 0 and len(students) == 2
    (first, first_start, first_mu), (second, second_start, second_mu) = students
    assert second is not first  # a new network, not the first round's trained on
    fresh = DEC(**small).untrained_autoencoder(x.astype(np.float32), seed=1).autoencoder.encoder  # seed + round 1
    for got, want in zip(second_start, fresh.parameters()):
        torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(second_mu, first_mu)  # both start at the same prototypes
    again = DEC(**small, distill_rounds=2).fit(x.astype(np.float32))
    np.testing.assert_array_equal(again.labels_, est.labels_)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_distill_rounds_is_checked(value):
    with pytest.raises(ValueError, match=f"distill_rounds must be an integer >= 1; got {value!r}"):
        DEC(distill_rounds=value).validate_params()


@pytest.mark.parametrize("other", [{"init": "kmeans"}, {"variant": "frozen"}])
def test_more_rounds_are_refused_where_there_is_no_distillation(other):
    with pytest.raises(ValueError, match="distill_rounds=2 repeats distillation, which only init='manifold'"):
        DEC(n_clusters=2, distill_rounds=2, **other).validate_params()


@pytest.mark.parametrize("other", [{"init": "kmeans"}, {"variant": "frozen"}])
def test_augmenting_distillation_is_refused_where_there_is_none(other):
    with pytest.raises(ValueError, match="augment='distill' augments distillation, which only init='manifold'"):
        DEC(n_clusters=2, augment="distill", image_shape=(2, 3), **other).validate_params()


def test_augment_values_are_checked():
    with pytest.raises(ValueError, match="augment must be 'auto', True, False, 'finetune' or 'distill'; got 'yes'"):
        DEC(n_clusters=2, augment="yes", image_shape=(2, 3)).validate_params()
