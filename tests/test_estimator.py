"""The scikit-learn DEC estimator on small, well-separated data."""

import copy
import inspect
import os

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError

from dec_mlflow import DEC, PretrainedAutoencoder, params, settings
from dec_mlflow.callbacks import Callback
from dec_mlflow.initialisation import VALLEY_DEPTH, initial_clusters
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.pretraining import fit_autoencoder, fresh_students
from dec_mlflow.rows import scaled
from dec_mlflow.training import distill_and_self_train

from conftest import SMALL



def test_recovers_well_separated_blobs(fitted, blobs):
    assert cluster_accuracy(blobs[1], fitted.labels_) > 0.99
    assert cluster_accuracy(blobs[1], fitted.init_labels_) > 0.99


def test_predict_matches_labels_and_proba_rows_sum_to_one(fitted, blobs):
    np.testing.assert_array_equal(fitted.predict(blobs[0]), fitted.labels_)
    q = fitted.predict_proba(blobs[0])
    assert q.shape == (600, 4)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(q.argmax(1), fitted.labels_)
    assert fitted.transform(blobs[0]).shape == (600, 4)
    assert fitted.cluster_centers_.shape == (4, 4)
    assert fitted.n_features_in_ == 20


def test_same_seed_same_labels_and_weights(blobs):
    a = DEC(**SMALL, random_state=3).fit(blobs[0])
    b = DEC(**SMALL, random_state=3).fit(blobs[0])
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.n_iter_ == b.n_iter_


@pytest.mark.parametrize("recipe", [
    {},  # the default recipe: no pretraining, the input's manifold clustering, distilled into fresh students
    {"pretrain_epochs": 5, "init": "kmeans", "variant": "idec"},  # the paper's start, IDEC's decoder
])
def test_the_stages_called_one_after_another_give_the_labels_of_fit(recipe):
    """Same seed, same labels: fit is its stages, and each can be called alone."""
    x, _ = make_blobs(240, n_features=12, centers=3, cluster_std=1.5, random_state=4)
    x = x.astype(np.float32)
    est = DEC(n_clusters=3, hidden_dims=(16, 8, 3), batch_size=32, pretrain_batch_size=32, pretrain_lr=0.1,
              update_interval=10, distill_epochs=1, distill_rounds=2 if not recipe else 1, max_iter=40, n_init=3,
              precision="fp32", device="cpu", random_state=5, **recipe)
    p, callback, cpu = est.get_params(), Callback(), torch.device("cpu")
    resolved = settings.resolve(p, x)
    ae, seed, _ = fit_autoencoder(p, x, resolved, callback, seed=5)
    encoder = copy.deepcopy(ae.autoencoder.encoder)
    decoder = copy.deepcopy(ae.autoencoder.decoder) if p["variant"] == "idec" else None
    xs = scaled(x, ae.offset, ae.scale, cpu)
    distill_options, self_train_options = settings.training_options(
        p, resolved, n_samples=len(x), trained=ae.trained, transform=None, decoder=decoder, callback=callback)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        space = None if ae.trained else (x, ae.offset, ae.scale, resolved["image_shape"])  # the input, untrained
        init, scale = initial_clusters(encoder, xs, 3, init=p["init"], seed=seed, n_init=3, k_range=(2, 20),
                                       callback=callback, decoder=decoder, space=space)
        centroids = torch.nn.Parameter(torch.from_numpy(init.centroids * scale))
        teacher = None if init.posteriors is None else torch.from_numpy(init.posteriors)
        students = None if ae.trained else fresh_students(12, (16, 8, 3), init.centroids, seed=seed, on=cpu)
        rounds = distill_and_self_train(encoder, centroids, xs, teacher, rounds=p["distill_rounds"], fresh_student=students,
                                        distill_options=distill_options, self_train_options=self_train_options)
    fitted = est.fit(x)
    assert len(fitted.round_labels_) == (2 if not recipe else 1)
    np.testing.assert_array_equal(rounds.result.labels, fitted.labels_)
    np.testing.assert_array_equal(init.labels, fitted.init_labels_)
    np.testing.assert_array_equal(rounds.centroids.detach().numpy(), fitted.cluster_centers_)


@pytest.mark.parametrize("n_samples, trained, distill_lr, expected", [
    (70_000, False, "auto", (25 * 273, 0.2)),  # full MNIST: 25 epochs set the length, at the higher peak
    (10_000, False, "auto", (2000, 0.1)),  # the 2,000-step minimum (51 epochs of 39 steps): the lower peak
    (20_480, False, "auto", (2000, 0.1)),  # 25 epochs of 80 steps are exactly the minimum
    (20_736, False, "auto", (25 * 81, 0.2)),  # one step an epoch more: epochs set it
    (70_000, True, "auto", (25 * 273, 0.01)),  # a pretrained encoder: min(lr, 0.01) whatever the length
    (70_000, False, 0.05, (25 * 273, 0.05)),  # a rate given is kept
])
def test_distillation_length_and_peak_rate_follow_the_data_size(n_samples, trained, distill_lr, expected):
    p = {**params.DEFAULTS, "distill_lr": distill_lr}
    resolved = {"update_interval": 140, "min_iter": 0, "augment": False}
    distill_options, _ = settings.training_options(p, resolved, n_samples=n_samples, trained=trained, transform=None,
                                                   decoder=None, callback=Callback())
    assert (distill_options["n_iter"], distill_options["lr"]) == expected


def test_the_keyword_arguments_are_the_rows_of_the_parameter_table():
    """DEC's keyword arguments, their defaults and its docstring's Parameters are dec_mlflow.params.PARAMS."""
    assert list(inspect.signature(DEC).parameters) == [p.name for p in params.PARAMS]
    assert DEC().get_params() == params.DEFAULTS
    for p in params.PARAMS:
        assert f"\n    {p.name} : {p.rule}, default={p.default!r}\n" in DEC.__doc__, p.name


def test_different_seed_changes_weights(blobs):
    a = DEC(**SMALL, random_state=1).pretrain(blobs[0])
    b = DEC(**SMALL, random_state=2).pretrain(blobs[0])
    assert not np.allclose(a.autoencoder.encoder[0].weight.detach(), b.autoencoder.encoder[0].weight.detach())


def test_fit_reuses_given_autoencoder_without_pretraining(blobs, tmp_path):
    est = DEC(**SMALL)
    ae = est.pretrain(blobs[0])
    ae.save(tmp_path / "ae.pt")
    loaded = PretrainedAutoencoder.load(tmp_path / "ae.pt")
    stages = []

    class Stages(Callback):
        def on_stage_begin(self, stage, total):
            stages.append(stage)

    est.fit(blobs[0], autoencoder=loaded, callback=Stages())
    assert [s for s in stages if "/" not in s] == ["init", "distill", "self_train", "trust"]  # init/map etc. are parts
    assert est.pretrain_loss_ == pytest.approx(ae.loss)
    # the given autoencoder is copied, not trained in place
    np.testing.assert_array_equal(loaded.autoencoder.encoder[0].weight.detach(), ae.autoencoder.encoder[0].weight.detach())
    assert cluster_accuracy(blobs[1], est.labels_) > 0.99


def test_layerwise_pretraining_reports_each_layer_then_finetune(blobs):
    seen = []

    class Stages(Callback):
        def on_stage_begin(self, stage, total):
            seen.append((stage, total))

    est = DEC(**{**SMALL, "pretrain_mode": "layerwise", "layerwise_epochs": 3, "pretrain_epochs": 5}).fit(blobs[0], callback=Stages())
    assert seen[:4] == [("pretrain/layer1", 3), ("pretrain/layer2", 3), ("pretrain/layer3", 3), ("pretrain/finetune", 5)]
    assert cluster_accuracy(blobs[1], est.labels_) > 0.95


def test_self_training_stops_at_tol_and_reports_updates(blobs):
    updates = []

    class Updates(Callback):
        def on_update(self, step, labels, metrics):
            updates.append((step, metrics["delta_label"]))

    est = DEC(**SMALL).fit(blobs[0], callback=Updates())
    assert est.converged_ and est.n_iter_ == updates[-1][0]
    assert all(step % SMALL["update_interval"] == 0 for step, _ in updates)
    assert updates[-1][1] < 0.001 and all(delta >= 0.001 for _, delta in updates[1:-1])


def test_max_iter_bounds_self_training(blobs):
    est = DEC(**{**SMALL, "tol": 0.0, "max_iter": 25}).fit(blobs[0])  # tol=0 never converges
    assert est.n_iter_ == 25 and not est.converged_


def test_standard_scaling_is_part_of_the_model(blobs):
    est = DEC(**SMALL).fit(blobs[0] * 1000 + 50)
    assert cluster_accuracy(blobs[1], est.labels_) > 0.99


def test_sklearn_clone_and_params_round_trip():
    est = DEC(**SMALL)
    assert clone(est).get_params() == est.get_params()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_clusters": 0}, "n_clusters must be an integer >= 1 or 'auto'; got 0"),
        ({"n_clusters": 2.5}, "n_clusters must be an integer >= 1 or 'auto'; got 2.5"),
        ({"pretrain_lr": 0.0}, r"pretrain_lr must be a number > 0.0; got 0.0"),
        ({"momentum": 1.0}, r"momentum must be a number >= 0.0 and < 1.0; got 1.0"),
        ({"tol": -0.1}, r"tol must be a number >= 0.0 and < 1.0; got -0.1"),
        ({"scaling": "minmax"}, "scaling must be one of auto, max, standard, none; got 'minmax'"),
        ({"pretrain_mode": "greedy"}, "pretrain_mode must be one of end_to_end, layerwise; got 'greedy'"),
        ({"hidden_dims": (10, 0)}, r"hidden_dims must be a non-empty sequence of positive integers; got \(10, 0\)"),
        ({"update_interval": 0}, "update_interval must be an integer >= 1 or 'auto'; got 0"),
        ({"min_iter": -1}, "min_iter must be an integer >= 0 or 'auto'; got -1"),
        ({"min_iter": 500, "max_iter": 400}, "min_iter must be <= max_iter; got min_iter=500, max_iter=400"),
        ({"pretrain_epochs": 0, "init": "kmeans"}, "pretrain_epochs=0 \\(no pretraining\\) needs init='manifold'"),
        ({"pretrain_epochs": "many"}, "pretrain_epochs must be an integer >= 0 or 'auto'; got 'many'"),
        ({"init": "spectral"}, "init must be one of manifold, kmeans; got 'spectral'"),
        ({"augment": "yes"}, "augment must be 'auto', True, False, 'finetune' or 'distill'; got 'yes'"),
        ({"n_clusters": "many"}, "n_clusters must be an integer >= 1 or 'auto'; got 'many'"),
        ({"n_clusters": "auto", "init": "kmeans"}, "n_clusters='auto' chooses k on the manifold initialisation's map, so it needs init='manifold'; got init='kmeans'"),
        ({"n_clusters": "auto", "k_min": 5, "k_max": 4}, "k_max must be >= k_min; got k_min=5, k_max=4"),
        ({"n_clusters": "auto", "k_min": 1}, "k_min must be an integer >= 2; got 1"),
        ({"n_clusters": "auto", "n_pretrain_init": 2, "pretrain_selection": "inertia"}, "pretrain_selection='inertia' compares k-means at n_clusters"),
    ],
)
def test_bad_params_are_named(blobs, params, message):
    with pytest.raises(ValueError, match=message):
        DEC(**{**SMALL, **params}).fit(blobs[0])


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:0 ", 0])
def test_device_must_be_auto_cpu_cuda_or_cuda_n(device):
    with pytest.raises(ValueError, match=rf"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}$"):
        DEC(device=device).validate_params()


def test_cuda_device_is_refused_where_cuda_is_absent_or_the_index_is_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available here .*use device='auto' or 'cpu'$"):
        DEC(device="cuda").validate_params()
    DEC(device="auto").validate_params()
    DEC(device=torch.device("cpu")).validate_params()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    DEC(device="cuda:1").validate_params()
    with pytest.raises(ValueError, match=r"device='cuda:2' but this machine has 2 CUDA device\(s\): cuda:0 to cuda:1$"):
        DEC(device="cuda:2").validate_params()


def test_bad_input_is_rejected_before_training():
    with pytest.raises(ValueError, match="n_samples=3 should be >= n_clusters=4"):
        DEC(**SMALL).fit(np.ones((3, 5)))
    x = np.ones((10, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        DEC(**SMALL).fit(x)
    with pytest.raises(ValueError, match=r"Expected 2D array, got 1D array instead"):
        DEC(**SMALL).fit(np.ones(10))


class _NoPretraining(Callback):
    def on_stage_begin(self, stage, total):
        raise AssertionError(f"stage {stage!r} began: the data should have been refused before any training")


@pytest.mark.parametrize("params, make, message", [
    ({}, lambda x: np.ones((400, 12)), r"^X has no spread: all 400 rows are identical \(every feature is constant\); "
                                       r"there is nothing to cluster$"),
    ({"n_clusters": 400}, lambda x: x[:400], r"^init='manifold' needs more samples than clusters; got n_samples=400, "
                                             r"n_clusters=400 \(use fewer clusters, or init='kmeans'\)$"),
    ({"augment": "distill", "image_shape": (4, 5), "scaling": "auto"}, lambda x: x,
     r"^augment='distill' needs one scale for every pixel, but scaling='auto' chooses 'standard' \(per feature\) for "
     r"this data; give scaling='max' or 'none'$"),
], ids=["identical-rows", "n_clusters-for-manifold", "augment-per-feature-scaling"])
def test_data_fit_cannot_train_on_is_refused_before_pretraining(blobs, params, make, message):
    est = DEC(**{**SMALL, "init": "manifold", **params})
    with pytest.raises(ValueError, match=message):
        est.check_fit_data(make(blobs[0]))
    with pytest.raises(ValueError, match=message):  # fit and pretrain check the same, before their first stage
        est.fit(make(blobs[0]), callback=_NoPretraining())
    with pytest.raises(ValueError, match=message):
        est.pretrain(make(blobs[0]), callback=_NoPretraining())


def test_data_with_spread_in_one_feature_only_is_accepted(blobs):
    x = np.ones((100, 5), np.float32)
    x[:50, 3] = 2.0
    DEC(**{**SMALL, "n_clusters": 2}).check_fit_data(x)
    DEC(**{**SMALL, "n_clusters": 1}).check_fit_data(x[:1])  # one row, one cluster: nothing to spread


def test_predict_checks_fitted_and_width(fitted):
    with pytest.raises(NotFittedError):
        DEC(**SMALL).predict(np.ones((2, 20)))
    with pytest.raises(ValueError, match="X has 5 features, but DEC is expecting 20 features as input"):
        fitted.predict(np.ones((2, 5)))


def test_autoencoder_width_must_match_data(blobs):
    ae = DEC(**SMALL).pretrain(blobs[0])
    with pytest.raises(ValueError, match="autoencoder expects 20 features, but X has 10"):
        DEC(**SMALL).fit(blobs[0][:, :10], autoencoder=ae)


# ---------------------------------------------------------------- variants and pretraining selection
def test_frozen_variant_moves_only_centroids(blobs):
    est = DEC(**SMALL)
    ae = est.pretrain(blobs[0])
    frozen = DEC(**SMALL, variant="frozen").fit(blobs[0], autoencoder=ae)
    fitted = [p.detach().numpy() for p in frozen.network_.encoder.parameters()]
    pretrained = [p.detach().numpy() for p in ae.autoencoder.encoder.parameters()]
    for a, b in zip(fitted[:-2], pretrained[:-2]):  # every layer but the embedding's exactly as pretrained
        np.testing.assert_array_equal(a, b)
    # the embedding layer only rescaled (one factor for weight and bias: the initialisation's embedding scale)
    factor = fitted[-1][0] / pretrained[-1][0]
    np.testing.assert_allclose(fitted[-2], factor * pretrained[-2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted[-1], factor * pretrained[-1], rtol=1e-5)
    init = DEC(**SMALL, max_iter=1, variant="frozen").fit(blobs[0], autoencoder=ae)
    assert not np.array_equal(frozen.cluster_centers_, init.cluster_centers_)  # the centroids did move
    assert cluster_accuracy(blobs[1], frozen.labels_) > 0.99


def test_idec_trains_encoder_and_differs_from_dec(blobs):
    est = DEC(**SMALL)
    ae = est.pretrain(blobs[0])
    dec = DEC(**SMALL).fit(blobs[0], autoencoder=ae)
    idec = DEC(**SMALL, variant="idec", gamma=0.1).fit(blobs[0], autoencoder=ae)
    w_dec = dec.network_.encoder[0].weight.detach().numpy()
    w_idec = idec.network_.encoder[0].weight.detach().numpy()
    assert not np.allclose(w_dec, w_idec)
    assert not np.allclose(w_idec, ae.autoencoder.encoder[0].weight.detach().numpy())
    assert cluster_accuracy(blobs[1], idec.labels_) > 0.99


def test_kl_loss_matches_the_last_self_training_update(fitted, blobs):
    # labels_ and kl_loss_ come from the last target update, which ran on the final weights
    assert fitted.kl_loss(blobs[0]) == pytest.approx(fitted.kl_loss_, rel=1e-4)
    assert fitted.kl_loss(blobs[0][:100]) > 0


def test_pretrain_selection_equals_the_fit_of_the_selected_seed(blobs):
    params = {**SMALL, "pretrain_epochs": 3}  # short pretraining so candidates differ
    sel = DEC(**params, n_pretrain_init=3, random_state=5, pretrain_selection="reconstruction").fit(blobs[0])
    seeds = [c["seed"] for c in sel.pretrain_candidates_]
    assert seeds == [5, 6, 7]
    recon = [c["reconstruction"] for c in sel.pretrain_candidates_]
    assert sel.selected_seed_ == seeds[int(np.argmin(recon))]
    assert all(0 <= c["inertia"] <= 1 for c in sel.pretrain_candidates_)
    alone = DEC(**params, random_state=sel.selected_seed_).fit(blobs[0])
    np.testing.assert_array_equal(sel.labels_, alone.labels_)
    np.testing.assert_array_equal(sel.cluster_centers_, alone.cluster_centers_)


def test_inertia_selection_picks_the_lowest_inertia(blobs):
    params = {**SMALL, "pretrain_epochs": 3}
    sel = DEC(**params, n_pretrain_init=2, pretrain_selection="inertia").fit(blobs[0])
    inertia = [c["inertia"] for c in sel.pretrain_candidates_]
    assert sel.selected_seed_ == int(np.argmin(inertia))


@pytest.mark.parametrize("name, value, message", [
    ("variant", "vade", "variant must be one of dec, frozen, idec; got 'vade'"),
    ("gamma", 0.0, "gamma must be a number > 0"),
    ("n_pretrain_init", 0, "n_pretrain_init must be an integer >= 1; got 0"),
    ("pretrain_selection", "labels", "pretrain_selection must be one of reconstruction, inertia"),
])
def test_new_parameters_are_validated(blobs, name, value, message):
    with pytest.raises(ValueError, match=message):
        DEC(**{**SMALL, name: value}).fit(blobs[0])


def test_the_manifold_initialisation_leaves_the_torch_thread_count_as_it_was(blobs):
    """UMAP's numba resets the OpenMP thread count torch shares; a limited process must stay limited."""
    before, limit = torch.get_num_threads(), os.cpu_count() + 1  # not what numba would set (every core)
    torch.set_num_threads(limit)
    try:
        DEC(**SMALL, init="manifold").fit(blobs[0])
        assert torch.get_num_threads() == limit
    finally:
        torch.set_num_threads(before)


def test_auto_n_clusters_finds_the_groups_and_keeps_the_scores():
    # four groups of unequal sizes; the default recipe (no pretraining) with a short self-training
    x, y = make_blobs(n_samples=[80, 120, 160, 240], n_features=12, center_box=(-10, 10), cluster_std=1.5, random_state=1)
    est = DEC(n_clusters="auto", k_max=8, hidden_dims=(32, 16, 4), batch_size=64, update_interval=10, distill_epochs=1,
              max_iter=50).fit(x.astype(np.float32))
    assert est.n_clusters_ == 4 and est.cluster_centers_.shape == (4, 4)
    assert sorted(est.k_scores_) == list(range(2, 9))  # the depth of the cut that made the k-th cluster
    assert max(est.k_scores_[k] for k in (2, 3, 4)) < VALLEY_DEPTH <= est.k_scores_[5]
    assert est.k_choice_.startswith("n_clusters=auto chose k = 4: 4 clusters parted by density valleys")
    assert f"the first cut it does not support, to 5 clusters, has a valley of {est.k_scores_[5]:.2f}" in est.k_choice_
    assert cluster_accuracy(y, est.labels_) > 0.99
    assert est.predict_proba(x[:5].astype(np.float32)).shape == (5, 4)
    assert est.get_params()["n_clusters"] == "auto"  # the parameter stays as given; the fit's k is n_clusters_


def test_auto_n_clusters_needs_k_max_below_the_samples_before_any_work():
    with pytest.raises(ValueError, match="n_clusters='auto' needs k_max < n_samples; got k_max=20, n_samples=15"):
        DEC(n_clusters="auto").check_fit_data(np.random.default_rng(0).normal(size=(15, 4)))
    DEC(n_clusters="auto", k_max=14).check_fit_data(np.random.default_rng(0).normal(size=(15, 4)))


def test_a_number_of_clusters_is_kept_as_given_and_has_no_scores(fitted):
    assert fitted.n_clusters_ == fitted.n_clusters and fitted.k_scores_ == {} and fitted.k_choice_ is None


def test_min_iter_auto_lengthens_self_training_only_where_distillation_runs_by_epochs():
    large = np.random.default_rng(0).normal(size=(21_000, 4)).astype(np.float32)
    resolved = DEC().resolve(large)
    assert resolved["update_interval"] == 82 and resolved["min_iter"] == 410  # 25 epochs of 82 steps pass 2,000
    assert DEC().resolve(large[:5000])["min_iter"] == 0  # distillation runs its 2,000-step minimum: the paper's rule
    assert DEC(init="kmeans", pretrain_epochs=5).resolve(large)["min_iter"] == 0  # nothing distilled
    assert DEC(max_iter=300).resolve(large)["min_iter"] == 300  # never past max_iter
    assert DEC(min_iter=7).resolve(large[:5000])["min_iter"] == 7
