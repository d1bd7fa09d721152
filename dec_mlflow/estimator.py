"""The scikit-learn compatible DEC estimator: pretrain, initialise centroids, self-train."""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

from dec_mlflow import distributed, params, settings, trust
from dec_mlflow.augment import check_image_shape
from dec_mlflow.callbacks import Callback
from dec_mlflow.checkpoint import PretrainCheckpoint, PretrainedAutoencoder
from dec_mlflow.initialisation import (
    K_RANGE, MAX_MAP_DIM, InputSpace, choose_k, describe_k_choice, initial_clusters, input_space, umap_map,
)
from dec_mlflow.model import DECNet
from dec_mlflow.objectives import kl_divergence, target_distribution
from dec_mlflow.params import DISTILL_EPOCHS, DISTILL_ROUNDS
from dec_mlflow.pretraining import as_features, fit_autoencoder, fresh_students, pretrain, untrained_autoencoder
from dec_mlflow.rows import Features, chunks, scaled, streamed
from dec_mlflow.scaling import auto_scaling, fit_scaling
from dec_mlflow.training import distill_and_self_train, embed

# what trust_score is, in the words the CLI and the run's tag use (docs/trust.md)
TRUST_SCORE = "agreement of mixture reruns x modularity on the neighbour graph x share of clusters parted by density valleys"


class DEC(ClusterMixin, TransformerMixin, BaseEstimator):
    """Deep Embedded Clustering (Xie, Girshick, Farhadi, ICML 2016).

    Pretrains an autoencoder (or, by default, starts from an untrained one and clusters the input),
    clusters its embedding to place the centroids, then refines encoder and centroids together by
    minimising KL(P || Q) between the Student's t soft assignments Q and their sharpened target P.
    ``fit`` runs these stages, each a function of its own module: :func:`dec_mlflow.settings.resolve`,
    :func:`dec_mlflow.pretraining.fit_autoencoder`, :func:`dec_mlflow.initialisation.initial_clusters`,
    :func:`dec_mlflow.training.distill_and_self_train`, then the scores of :mod:`dec_mlflow.trust`.

    The keyword arguments are the rows of :data:`dec_mlflow.params.PARAMS` (name, default, rule and help),
    listed under Parameters below and in docs/reference/parameters.md; why the defaults are what they
    are: docs/recipe.md.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters_, embedding_dim)
    n_clusters_ : int
        The number of clusters of the fit: ``n_clusters``, or the one 'auto' chose.
    k_scores_ : dict of int to float
        With ``n_clusters='auto'``, {k: valley depth of the cut that made the k-th cluster in the map}
        (:func:`dec_mlflow.initialisation.choose_k`); empty otherwise.
    k_choice_ : str or None
        With ``n_clusters='auto'``, one sentence on how k came about and how deep the first cut the map does not support is
        (:func:`dec_mlflow.initialisation.describe_k_choice`); None otherwise.
    labels_ : ndarray of shape (n_samples,)
    init_labels_ : ndarray of shape (n_samples,)
        The initial clustering (k-means: the AE+k-means baseline; manifold: UMAP + GMM).
    round_labels_ : list of ndarray of shape (n_samples,)
        The labels at the end of each round's self-training (``distill_rounds``); the last is ``labels_``.
    n_iter_ : int
        Self-training iterations, summed over the rounds.
    converged_ : bool
        Whether the last round's self-training stopped on ``tol``.
    n_features_in_ : int
    pretrain_loss_ : float
    kl_loss_ : float
        KL(P || Q) over the training data at the last target update.
    trust_score_ : float
        Label-free, in [0, 1], higher is better: ``agreement`` x ``modularity`` x ``valleys``
        (:func:`dec_mlflow.trust.trust_scores`). Compare it between runs on the same data.
    trust_scores_ : dict of str to float
        Its three parts: 'agreement', the share of points on which independent Gaussian mixtures of the input's
        map agree with the labels; 'modularity', of the labels on the input's neighbour graph; 'valleys', the
        share of points in clusters the map shows as one clump parted from its nearest neighbour by a valley.
    resolved_params_ : dict
        What the 'auto' settings resolved to (:func:`dec_mlflow.settings.resolve`), with pretrain_lr
        (after any restart) and distill_lr.
    selected_seed_ : int
        Seed of the pretrained autoencoder used (``random_state`` unless ``n_pretrain_init > 1``).
    pretrain_candidates_ : list of dict
        Per candidate autoencoder: seed, reconstruction and inertia criteria (empty when an
        autoencoder was passed to ``fit`` or ``n_pretrain_init == 1``).
    network_ : DECNet
        Scaling + encoder + centroid head, on the CPU, in eval mode.
    """

    def __init__(
        self, n_clusters=10, k_min=K_RANGE[0], k_max=K_RANGE[1], hidden_dims=(500, 500, 2000, 10), scaling="auto",
        pretrain_mode="end_to_end", pretrain_epochs="auto", layerwise_epochs=20, pretrain_batch_size=256,
        pretrain_lr=1.0, pretrain_momentum=0.9, pretrain_lr_schedule="constant", dropout=0.2, precision="auto",
        augment="auto", image_shape="auto", n_pretrain_init=1, pretrain_selection="reconstruction", init="manifold",
        distill_epochs=DISTILL_EPOCHS, distill_lr="auto", distill_rounds=DISTILL_ROUNDS, n_init=20, alpha=1.0,
        batch_size=256, lr=0.01, momentum=0.9, update_interval="auto", tol=0.001, min_iter="auto", max_iter=20000,
        variant="dec", gamma=0.1, random_state=0, device="auto",
    ):  # the defaults of dec_mlflow.params.PARAMS (a test keeps them equal)
        self.n_clusters, self.k_min, self.k_max, self.hidden_dims = n_clusters, k_min, k_max, hidden_dims
        self.scaling, self.pretrain_mode, self.pretrain_epochs = scaling, pretrain_mode, pretrain_epochs
        self.layerwise_epochs, self.pretrain_batch_size, self.pretrain_lr = layerwise_epochs, pretrain_batch_size, pretrain_lr
        self.pretrain_momentum, self.pretrain_lr_schedule = pretrain_momentum, pretrain_lr_schedule
        self.dropout, self.precision, self.augment, self.image_shape = dropout, precision, augment, image_shape
        self.n_pretrain_init, self.pretrain_selection, self.init = n_pretrain_init, pretrain_selection, init
        self.distill_epochs, self.distill_lr, self.distill_rounds = distill_epochs, distill_lr, distill_rounds
        self.n_init, self.alpha, self.batch_size, self.lr, self.momentum = n_init, alpha, batch_size, lr, momentum
        self.update_interval, self.tol, self.min_iter, self.max_iter = update_interval, tol, min_iter, max_iter
        self.variant, self.gamma, self.random_state, self.device = variant, gamma, random_state, device

    # ------------------------------------------------------------------ validation
    def validate_params(self) -> None:
        """Raise ValueError naming the first parameter that breaks its rule (:func:`dec_mlflow.params.validate`)."""
        params.validate(self.get_params())

    def _check_X(self, X, *, fitting: bool) -> Features:
        """``X`` as float32 (n_samples, n_features), checked; a memory map or sparse matrix is checked
        chunk by chunk and returned as it is (:mod:`dec_mlflow.rows`), never copied whole."""
        if sparse.issparse(X):  # any scipy.sparse format becomes CSR (rows are read a batch at a time), sparse still
            X = check_array(X, accept_sparse="csr", dtype=np.float32, ensure_all_finite=False, estimator=self)
        elif streamed(X):
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D (n_samples, n_features); got shape {X.shape}")
            if X.shape[0] == 0 or X.shape[1] == 0:
                raise ValueError(f"X is empty: shape {X.shape}")
        else:
            # scikit-learn's own messages for 1-D, sparse, complex and empty input (its estimator checks match them)
            X = check_array(X, dtype=np.float32, ensure_all_finite=False, estimator=self)
        n_bad, first, start = 0, 0, 0
        low, high = np.full(X.shape[1], np.inf, np.float32), np.full(X.shape[1], -np.inf, np.float32)  # (n_features,)
        for block in chunks(X):
            bad = ~np.isfinite(block)
            if bad.any():
                first = first if n_bad else start + int(np.argwhere(bad)[0][0])
                n_bad += int(bad.sum())
            if fitting:
                np.minimum(low, block.min(0), out=low)
                np.maximum(high, block.max(0), out=high)
            start += len(block)
        if n_bad:
            raise ValueError(f"X has {n_bad} NaN or infinite values (first at row {first})")
        if fitting:
            self._check_fit_data(X, no_spread=bool((low == high).all()))
        if not fitting and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but DEC is expecting {self.n_features_in_} features as input")
        return X

    def _check_fit_data(self, X: Features, *, no_spread: bool) -> None:
        """Refuse, before any training, data that ``fit`` with these parameters could not train on."""
        n = X.shape[0]
        if self.n_clusters == "auto" and n <= self.k_max:
            raise ValueError(f"n_clusters='auto' needs k_max < n_samples; got k_max={self.k_max}, n_samples={n} "
                             f"(give a smaller k_max)")
        if self.n_clusters != "auto" and n < self.n_clusters:
            raise ValueError(f"n_samples={n} should be >= n_clusters={self.n_clusters}")
        if no_spread and n > 1:
            # the autoencoder would learn one point and every later stage divide by a zero spread
            raise ValueError(f"X has no spread: all {n} rows are identical (every feature is constant); there is "
                             "nothing to cluster")
        if self.init == "manifold" and self.n_clusters != "auto" and 1 < self.n_clusters and n <= self.n_clusters:  # UMAP + GMM, after pretraining
            raise ValueError(f"init='manifold' needs more samples than clusters; got n_samples={n}, "
                             f"n_clusters={self.n_clusters} (use fewer clusters, or init='kmeans')")
        if self.image_shape not in (None, "auto"):
            check_image_shape(self.image_shape, X.shape[1])
        if params.augments_explicitly(self.get_params()) and self.scaling == "auto" and auto_scaling(X) == "standard":  # else found after pretraining
            raise ValueError(f"augment={self.augment!r} needs one scale for every pixel, but scaling='auto' chooses "
                             "'standard' (per feature) for this data; give scaling='max' or 'none'")

    def check_fit_data(self, X) -> None:
        """Raise ValueError, naming the rule and the value, if ``fit`` could not train on ``X`` with these parameters.

        ``fit`` and ``pretrain`` run the same checks first; callers that start other work before them (a
        tracked run, a pretraining) call this so that the refusal comes before it: bad parameters, too few
        samples for ``n_clusters`` (more than clusters for ``init='manifold'``), data with no spread at all,
        a wrong ``image_shape``, or ``augment`` on data that 'auto' scales per feature.
        """
        self.validate_params()
        self._check_X(X, fitting=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # scipy.sparse input stays sparse and is densified a batch at a time
        return tags

    def resolve(self, X, *, pretraining: bool = False) -> dict:
        """What the 'auto' settings resolve to on raw ``X`` (:func:`dec_mlflow.settings.resolve`; ``pretraining``:
        for ``pretrain``, which always pretrains)."""
        return settings.resolve(self.get_params(), X, pretraining=pretraining)

    def untrained_autoencoder(self, X, *, seed: int | None = None, scaling: str | None = None) -> PretrainedAutoencoder:
        """The untrained autoencoder (weights seeded by ``seed``, default ``random_state``) and the input
        scaling of a fit without pretraining (``scaling`` as resolved, else resolved here); its ``trained`` is False."""
        return untrained_autoencoder(X, self.hidden_dims, scaling or self.resolve(X)["scaling"],
                                     seed=settings.seed(self.random_state) if seed is None else seed)

    # ------------------------------------------------------------------ stages
    def pretrain(self, X, callback: Callback | None = None, *, seed: int | None = None,
                 resume: PretrainCheckpoint | None = None) -> PretrainedAutoencoder:
        """Stage 1: fit the input scaling and pretrain the autoencoder on ``X`` (:func:`dec_mlflow.pretraining.pretrain`).

        Does not fit the estimator; pass the result to ``fit(X, autoencoder=...)``. ``seed`` (default
        ``random_state``) seeds the weights and batches. A diverging pretraining restarts at a quarter of the
        rate (up to 3 times, reported through ``callback.on_retry``); the rate that worked is the result's
        ``lr``. After every epoch ``callback.on_checkpoint`` is offered a :class:`PretrainCheckpoint`;
        ``resume`` continues from one made with the same settings, data and seed: the result is the one the
        uninterrupted pretraining would have given (exactly, on the CPU).

        Raises
        ------
        FloatingPointError
            When pretraining diverges at every rate tried.
        """
        self.validate_params()
        X = self._check_X(X, fitting=True)
        seed = settings.seed(self.random_state) if seed is None else seed
        return pretrain(self.get_params(), X, callback or Callback(), seed=seed, resume=resume)

    def fit(self, X, y=None, *, autoencoder: PretrainedAutoencoder | None = None, callback: Callback | None = None):
        """Resolve the settings, pretrain (unless ``autoencoder`` is given), find the initial clusters, distil and
        self-train in rounds, score. Each stage is a function a test can call alone.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), raw features
        y : ignored
        autoencoder : PretrainedAutoencoder, optional
            Reuse a pretrained autoencoder (it is copied, not modified).
        callback : Callback, optional

        Returns
        -------
        self
        """
        self.validate_params()
        X = self._check_X(X, fitting=True)
        callback, p = callback or Callback(), self.get_params()
        # 1. settings: what the 'auto' parameters resolve to on this data
        resolved = settings.resolve(p, X)
        # 2. the autoencoder: the given one, an untrained one (no pretraining), or the best pretrained candidate
        autoencoder, self.selected_seed_, self.pretrain_candidates_ = fit_autoencoder(
            p, X, resolved, callback, seed=settings.seed(self.random_state), given=autoencoder)
        seed, on, trained = self.selected_seed_, torch.device(resolved["device"]), autoencoder.trained
        encoder = copy.deepcopy(autoencoder.autoencoder.encoder).to(on)
        decoder = copy.deepcopy(autoencoder.autoencoder.decoder).to(on) if self.variant == "idec" else None
        x = scaled(X, autoencoder.offset, autoencoder.scale, on)  # (n_samples, n_features)
        distill_options, self_train_options = settings.training_options(
            p, resolved, n_samples=x.shape[0], trained=trained, decoder=decoder, callback=callback,
            transform=settings.augmentation(resolved, self.augment, autoencoder.scale, on, seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # 3. initial clustering; an untrained encoder's embedding says nothing yet: then of the input itself
            init, scale = initial_clusters(
                encoder, x, self.n_clusters, init=self.init, seed=seed, n_init=self.n_init, k_range=(self.k_min, self.k_max),
                callback=callback, decoder=decoder,
                space=None if trained else (X, autoencoder.offset, autoencoder.scale, resolved["image_shape"]))
            centroids = torch.nn.Parameter(torch.from_numpy(init.centroids * scale).to(on))  # (n_clusters, embedding_dim)
            distilling = params.distills(p) and init.posteriors is not None  # one cluster: no posteriors to learn
            # 4-5. distillation rounds towards the initial clustering, each followed by self-training on KL(P || Q)
            rounds = distill_and_self_train(
                encoder, centroids, x, torch.from_numpy(init.posteriors).to(on) if distilling else None,
                rounds=self.distill_rounds, distill_options=distill_options, self_train_options=self_train_options,
                # without pretraining, each round after the first trains a new encoder on the previous round's P
                fresh_student=None if trained else fresh_students(X.shape[1], self.hidden_dims, init.centroids,
                                                                  seed=seed, on=on))
        self._set_fitted(X, autoencoder, init, rounds, {**resolved, "pretrain_lr": autoencoder.lr,
                                                        "distill_lr": distill_options["lr"]})
        # 6. label-free scores of the result
        self.trust_scores_ = self._trust_scores(X, autoencoder, init, resolved["image_shape"], callback)
        self.trust_score_ = self.trust_scores_.pop("score")
        return self

    def _set_fitted(self, X: Features, autoencoder: PretrainedAutoencoder, init, rounds, resolved: dict) -> None:
        """The fitted attributes, from the autoencoder, the initial clustering and the rounds of training."""
        self.network_ = DECNet(rounds.encoder.cpu(), rounds.centroids.detach().cpu(), torch.from_numpy(autoencoder.offset),
                               torch.from_numpy(autoencoder.scale), self.alpha).eval()
        self.cluster_centers_ = self.network_.centroids.detach().numpy().copy()
        self.labels_, self.init_labels_, self.round_labels_ = rounds.result.labels, init.labels, rounds.round_labels
        self.n_clusters_, self.k_scores_ = len(self.cluster_centers_), init.k_scores or {}
        self.n_iter_, self.converged_, self.kl_loss_ = rounds.n_iter, rounds.result.converged, rounds.result.kl_loss
        self.n_features_in_, self.pretrain_loss_, self.resolved_params_ = X.shape[1], autoencoder.loss, resolved


    @property
    def k_choice_(self) -> str | None:
        """With ``n_clusters='auto'``, the sentence on how k came about (see the class's Attributes); else None."""
        return describe_k_choice(self.n_clusters_, self.k_scores_, self.k_min, self.k_max) if self.k_scores_ else None

    def _trust_scores(self, X: Features, autoencoder: PretrainedAutoencoder, init, image_shape, callback: Callback) -> dict:
        """Stage 6: the label-free trust score and its three parts (:func:`dec_mlflow.trust.trust_scores`).

        They read the map of the input and its neighbour graph: the initial clustering's, when the run
        started from the input (the default recipe), else one :func:`dec_mlflow.trust.run_scores` makes.
        Rank 0 computes them under torchrun.
        """
        scores = None
        if distributed.is_main():
            callback.on_stage_begin("trust", None)
            scores = trust.run_scores(X, self.labels_, self.n_clusters_, seed=self.selected_seed_, offset=autoencoder.offset,
                                      scale=autoencoder.scale, image_shape=image_shape, mapped=init.input_map,
                                      callback=callback)
            callback.on_stage_end("trust")
        return distributed.broadcast_object(scores)

    # ------------------------------------------------------------------ inference
    def _forward(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_is_fitted(self, "network_")
        X = self._check_X(X, fitting=False)
        with torch.no_grad():
            out = [self.network_(torch.from_numpy(block)) for block in chunks(X)]  # one chunk when X is in memory
        q, labels, z = (torch.cat(parts).numpy() for parts in zip(*out))
        return q, labels, z

    def predict(self, X) -> np.ndarray:
        """Hard cluster labels, (n_samples,) int64."""
        return self._forward(X)[1]

    def predict_proba(self, X) -> np.ndarray:
        """Soft assignments q, (n_samples, n_clusters); rows sum to 1."""
        return self._forward(X)[0]

    def transform(self, X) -> np.ndarray:
        """Embedding z, (n_samples, embedding_dim)."""
        return self._forward(X)[2]

    def kl_loss(self, X) -> float:
        """KL(P || Q) on ``X`` with the target P computed from X's own soft assignments.

        The loss self-training minimises, evaluated on any data; on held-out data it gives the
        denominator of the paper's generalizability G = L_train / L_validation (section 5.3).
        """
        q = torch.from_numpy(self.predict_proba(X))
        return float(kl_divergence(target_distribution(q), q))


# help(DEC) lists the parameters from their table, before the fitted attributes
DEC.__doc__ = DEC.__doc__.replace("    Attributes\n", params.numpydoc(indent="    ") + "\n\n    Attributes\n", 1)


def map_k_scores(est: DEC, X: Features, k_min: int, k_max: int, *,
                 autoencoder: PretrainedAutoencoder | None = None) -> tuple[int, dict[int, float]]:
    """What ``n_clusters='auto'`` would choose on ``X``, without fitting: (k, {k: valley depth of the k-th cut}).

    The map is the one ``est.fit`` makes: of the scaled input (reduced to 50 principal components) when
    there is no trained ``autoencoder``, else of its embedding; then :func:`choose_k` over ``k_min..k_max``.
    """
    seed = settings.seed(est.random_state)
    if autoencoder is None or not autoencoder.trained:
        resolved = est.resolve(X)
        offset, scale = fit_scaling(X, resolved["scaling"])
        space = input_space(X, offset, scale, image_shape=resolved["image_shape"], seed=seed)
    else:
        space = InputSpace(embed(autoencoder.autoencoder.encoder, scaled(as_features(X), autoencoder.offset,
                                                                         autoencoder.scale, torch.device("cpu"))).numpy())
    return choose_k(umap_map(space.points, MAX_MAP_DIM, seed=seed, shifted=space.shifted), k_min, k_max, seed=seed)
