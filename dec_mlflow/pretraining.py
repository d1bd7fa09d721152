"""Fit's autoencoder: pretrained (restarting at a lower rate when it diverges), chosen among candidates, or untrained.

Functions of a full parameter set (``DEC.get_params()``) and checked data; :meth:`DEC.pretrain
<dec_mlflow.estimator.DEC.pretrain>` and ``DEC.fit`` call them, and so can a test.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans

from dec_mlflow.callbacks import Callback
from dec_mlflow.checkpoint import Checkpoints, PretrainCheckpoint, PretrainedAutoencoder
from dec_mlflow.model import Autoencoder
from dec_mlflow.rows import Features, scaled, streamed
from dec_mlflow.scaling import fit_scaling
from dec_mlflow.settings import augmentation, device, resolve
from dec_mlflow.training import embed, pretrain_end_to_end, pretrain_layerwise, reconstruction_error

PRETRAIN_RETRIES = 3  # divergent pretraining restarts this many times, each at a quarter of the rate


def pretrain(p: Mapping, X: Features, callback: Callback, *, seed: int,
             resume: PretrainCheckpoint | None = None) -> PretrainedAutoencoder:
    """Fit the input scaling and pretrain the autoencoder of the parameters ``p`` on checked ``X``.

    ``seed`` seeds the weights and batches. A pretraining whose loss stops being finite restarts from
    scratch at a quarter of the learning rate (up to ``PRETRAIN_RETRIES`` times, reported through
    ``callback.on_retry``); the rate that worked is the result's ``lr``. After every epoch
    ``callback.on_checkpoint`` is offered a :class:`PretrainCheckpoint`; ``resume`` continues from one.

    Raises
    ------
    FloatingPointError
        When pretraining diverges at every rate tried.
    """
    resolved = resolve(p, X, pretraining=True)
    offset, scale = fit_scaling(X, resolved["scaling"])
    on = device(p["device"])
    x = scaled(X, offset, scale, on)  # (n, n_features); read a batch at a time when X is streamed
    lr, first = (p["pretrain_lr"], 0) if resume is None else (resume.pretrained.lr, resume.attempt)
    if resume is not None:
        resume = check_resume(resume, offset, scale, p["hidden_dims"])
    for attempt in range(first, PRETRAIN_RETRIES + 1):
        try:
            transform = augmentation(resolved, p["augment"], scale, on, seed) if resolved["augment"] is True else None
            checkpoints = Checkpoints(callback, offset, scale, lr, attempt, transform)
            ae, loss = _pretrain_once(p, x, lr, resolved, seed, transform, checkpoints, resume)
            return PretrainedAutoencoder(ae.cpu(), offset, scale, loss, lr)
        except FloatingPointError as e:
            if attempt == PRETRAIN_RETRIES:
                raise FloatingPointError(
                    f"{e}: pretraining diverged at pretrain_lr={p['pretrain_lr']:g} and at each of {PRETRAIN_RETRIES} "
                    f"restarts down to {lr:g}; lower pretrain_lr, or check the data for extreme values") from e
            lr, resume = lr / 4.0, None
            callback.on_retry("pretrain", attempt + 1, f"{e}; restarting at pretrain_lr={lr:g}")
    raise AssertionError("unreachable")


def _pretrain_once(p: Mapping, x, lr: float, resolved: dict, seed: int, transform, callback: Checkpoints,
                   resume: PretrainCheckpoint | None = None):
    """One pretraining from fresh weights seeded by ``seed``, or from ``resume``; returns (autoencoder, last loss)."""
    opt = dict(batch_size=p["pretrain_batch_size"], lr=lr, momentum=p["pretrain_momentum"],
               lr_schedule=p["pretrain_lr_schedule"], precision=resolved["precision"])
    layerwise = p["pretrain_mode"] == "layerwise"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = Autoencoder((x.shape[1], *p["hidden_dims"])).to(x.device)
        callback.autoencoder = ae
        state = None
        if resume is not None:
            ae.load_state_dict(resume.pretrained.autoencoder.state_dict())
            state = resume.state
            if "augment" in state.rng and transform is not None:
                transform.keywords["generator"].set_state(state.rng["augment"])
        finetune = "pretrain/finetune" if layerwise else "pretrain"
        if layerwise and (state is None or state.stage != finetune):
            pretrain_layerwise(ae, x, dropout=p["dropout"], callback=callback, epochs=p["layerwise_epochs"],
                               resume=state, **opt)
            state = None
        loss = float("nan")
        epochs = resolved["pretrain_epochs"]
        if epochs > 0:
            loss = pretrain_end_to_end(ae, x, callback=callback, stage=finetune, epochs=epochs, transform=transform,
                                       resume=state, **opt)
    return ae, loss


def check_resume(resume: PretrainCheckpoint, offset: np.ndarray, scale: np.ndarray, hidden_dims) -> PretrainCheckpoint:
    """``resume`` if it continues a pretraining of this network on this data's scaling, else ValueError."""
    dims = (len(offset), *hidden_dims)
    if tuple(resume.pretrained.autoencoder.dims) != dims:
        raise ValueError(f"resume: the checkpoint is of an autoencoder {tuple(resume.pretrained.autoencoder.dims)}, "
                         f"this pretraining makes {dims}")
    if not (np.array_equal(resume.pretrained.offset, offset) and np.array_equal(resume.pretrained.scale, scale)):
        raise ValueError("resume: the checkpoint was made under another input scaling (other data or scaling)")
    return resume


def fit_autoencoder(p: Mapping, X: Features, resolved: dict, callback: Callback, *, seed: int,
                    given: PretrainedAutoencoder | None = None) -> tuple[PretrainedAutoencoder, int, list[dict]]:
    """``fit``'s autoencoder: ``given`` (checked against the width of ``X``), an untrained one when the
    settings ``resolved`` (:func:`dec_mlflow.settings.resolve`) skip pretraining, else the best of the
    ``n_pretrain_init`` candidates (:func:`pretrain_and_select`). Returns it, the seed that drives the rest
    of the fit and each candidate's criteria."""
    if given is not None:
        if given.n_features != X.shape[1]:
            raise ValueError(f"autoencoder expects {given.n_features} features, but X has {X.shape[1]}")
        return given, seed, []
    if resolved["pretrain_epochs"] == 0:
        return untrained_autoencoder(X, p["hidden_dims"], resolved["scaling"], seed=seed), seed, []
    return pretrain_and_select(p, X, callback, seed=seed)


def pretrain_and_select(p: Mapping, X: Features, callback: Callback, *, seed: int
                        ) -> tuple[PretrainedAutoencoder, int, list[dict]]:
    """Pretrain ``n_pretrain_init`` candidates, seeded ``seed``, ``seed + 1``, ...; keep the best by
    ``pretrain_selection``. Returns it, its seed and each candidate's criteria (none for one candidate)."""
    if p["n_pretrain_init"] == 1:
        return pretrain(p, X, callback, seed=seed), seed, []
    best, candidates = None, []
    for candidate in range(seed, seed + p["n_pretrain_init"]):
        ae = pretrain(p, X, callback, seed=candidate)
        criteria = selection_criteria(ae, X, p["n_clusters"], n_init=p["n_init"], seed=candidate)
        candidates.append({"seed": candidate, **criteria})
        if best is None or criteria[p["pretrain_selection"]] < best[0]:
            best = (criteria[p["pretrain_selection"]], candidate, ae)
    _, selected, ae = best
    return ae, selected, candidates


def untrained_autoencoder(X: Features, hidden_dims, scaling: str, *, seed: int) -> PretrainedAutoencoder:
    """The untrained autoencoder (weights seeded by ``seed``) and the input scaling (``scaling`` resolved) of a
    fit without pretraining; its ``trained`` is False."""
    offset, scale = fit_scaling(X, scaling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = Autoencoder((X.shape[1], *hidden_dims))
    return PretrainedAutoencoder(ae, offset, scale, float("nan"), float("nan"), trained=False)


def fresh_students(n_features: int, hidden_dims, prototypes: np.ndarray, *, seed: int, on: torch.device):
    """The ``fresh_student`` of :func:`dec_mlflow.training.distill_and_self_train` for a fit without pretraining:
    round ``r``'s new encoder, seeded by ``seed + r``, and centroids at the ``prototypes`` (n_clusters, dim)."""
    def fresh_student(round_: int) -> tuple[torch.nn.Module, torch.nn.Parameter]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + round_)
            encoder = Autoencoder((n_features, *hidden_dims)).encoder.to(on)
        return encoder, torch.nn.Parameter(torch.from_numpy(prototypes.copy()).to(on))
    return fresh_student


def selection_criteria(ae: PretrainedAutoencoder, X: Features, n_clusters: int, *, n_init: int, seed: int) -> dict:
    """Label-free quality criteria of a pretrained autoencoder on raw ``X``; lower is better.

    Returns
    -------
    dict with 'reconstruction' (mean squared error of the scaled input, per feature) and, unless
    ``n_clusters`` is 'auto', 'inertia' (k-means inertia in the embedding / total sum of squares about
    the mean, in [0, 1]).
    """
    x = scaled(as_features(X), ae.offset, ae.scale, torch.device("cpu"))
    criteria = {"reconstruction": reconstruction_error(ae.autoencoder, x)}
    if n_clusters != "auto":  # k-means needs a k: with n_clusters='auto' only the reconstruction
        criteria["inertia"] = embedding_kmeans(ae, X, n_clusters, n_init=n_init, seed=seed)[1]
    return criteria


def embedding_kmeans(ae: PretrainedAutoencoder, X: Features, n_clusters: int, *, n_init: int, seed: int):
    """k-means in the pretrained embedding of raw ``X``: the AE+k-means baseline.

    Returns
    -------
    labels : ndarray of shape (n_samples,), int64
    inertia : float, k-means inertia / total sum of squares of the embedding about its mean
    """
    x = scaled(as_features(X), ae.offset, ae.scale, torch.device("cpu"))
    z = embed(ae.autoencoder.encoder, x).numpy()  # (n, d)
    km = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(z)
    total = float(((z.astype(np.float64) - z.mean(0, dtype=np.float64)) ** 2).sum())
    return km.labels_.astype(np.int64), float(km.inertia_) / total


def as_features(X) -> Features:
    """A memory map or sparse matrix as it is, anything else as an in-memory float32 array."""
    return X if streamed(X) else np.asarray(X, np.float32)
