"""The scikit-learn compatible DEC estimator: pretrain, initialise centroids, self-train."""

from __future__ import annotations

import copy
import functools
import math
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from dec_mlflow import distributed, params, trust
from dec_mlflow.augment import check_image_shape, infer_image_shape, random_shift_rotate
from dec_mlflow.callbacks import Callback
from dec_mlflow.checkpoint import Checkpoints, PretrainCheckpoint, PretrainedAutoencoder
from dec_mlflow.initialisation import (
    K_RANGE, MAX_MAP_DIM, InputSpace, choose_k, initial_clustering, input_space, umap_map,
)
from dec_mlflow.model import Autoencoder, DECNet, scale_embedding
from dec_mlflow.objectives import kl_divergence, target_distribution
from dec_mlflow.params import DISTILL_EPOCHS, DISTILL_ROUNDS
from dec_mlflow.rows import Features, chunks, scaled, streamed
from dec_mlflow.scaling import auto_scaling, fit_scaling
from dec_mlflow.training import (
    distill_and_self_train, embed, pretrain_end_to_end, pretrain_layerwise, reconstruction_error,
)

# 'auto' budgets. The paper's schedule is counted in SGD iterations; 75 epochs of MNIST are 20,500 of
# them, and a small table at 75 epochs would get a few hundred: too few for the autoencoder to learn.
PRETRAIN_EPOCHS = 75
MIN_PRETRAIN_ITER = 5000
UPDATE_INTERVAL = 140  # the paper's value on MNIST; small data updates P at least once per epoch
# Distillation (docs/recipe.md): at least this many iterations on small data, the peak of its one-cycle
# rate, and the label smoothing of its targets.
DISTILL_MIN_ITER = 2000
DISTILL_LR = 0.1  # 'auto' from an untrained encoder
# ... and from a pretrained one at most, which 0.1 pushes past its soft targets on small data (docs/recipe.md)
PRETRAINED_DISTILL_LR = 0.01
DISTILL_SMOOTHING = 0.1
PRETRAIN_RETRIES = 3  # divergent pretraining restarts this many times, each at a quarter of the rate
# the label-free score that ranks runs best on average, and least badly on its worst dataset (docs/trust.md)
TRUST_SCORE = "balance"


def _cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class DEC(ClusterMixin, TransformerMixin, BaseEstimator):
    """Deep Embedded Clustering (Xie, Girshick, Farhadi, ICML 2016).

    Pretrains an autoencoder, clusters its embedding to place the centroids, then refines encoder
    and centroids together by minimising KL(P || Q) between the Student's t soft assignments Q and
    their sharpened target P.

    The keyword arguments are the rows of :data:`dec_mlflow.params.PARAMS` (name, default, rule and help),
    listed under Parameters below and in docs/reference/parameters.md; why the defaults are what they
    are: docs/recipe.md.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters_, embedding_dim)
    n_clusters_ : int
        The number of clusters of the fit: ``n_clusters``, or the one 'auto' chose.
    k_scores_ : dict of int to float
        With ``n_clusters='auto'``, each candidate k's silhouette in the map; empty otherwise.
    labels_ : ndarray of shape (n_samples,)
    init_labels_ : ndarray of shape (n_samples,)
        The initial clustering of the pretrained embedding (k-means: the AE+k-means baseline;
        manifold: UMAP + GMM).
    round_labels_ : list of ndarray of shape (n_samples,)
        The labels at the end of each round's self-training (``distill_rounds``); the last is
        ``labels_``.
    n_iter_ : int
        Self-training iterations, summed over the rounds.
    converged_ : bool
        Whether the last round's self-training stopped on ``tol``.
    n_features_in_ : int
    pretrain_loss_ : float
    kl_loss_ : float
        KL(P || Q) over the training data at the last target update.
    trust_scores_ : dict of str to float
        Label-free scores of the result, higher is better (:mod:`dec_mlflow.trust`):
        'balance', 'silhouette', 'init_agreement', 'confidence'.
    trust_score_ : float
        The one of them that ranks runs best, ``trust_scores_[TRUST_SCORE]``.
    resolved_params_ : dict
        What the 'auto' settings resolved to: scaling, pretrain_epochs, pretrain_lr (after any
        restart), precision, device, update_interval.
    selected_seed_ : int
        Seed of the pretrained autoencoder used (``random_state`` unless ``n_pretrain_init > 1``).
    pretrain_candidates_ : list of dict
        Per candidate autoencoder: seed, reconstruction and inertia criteria (empty when an
        autoencoder was passed to ``fit`` or ``n_pretrain_init == 1``).
    network_ : DECNet
        Scaling + encoder + centroid head, on the CPU, in eval mode.
    """

    def __init__(
        self,
        n_clusters=10,
        k_min=K_RANGE[0],
        k_max=K_RANGE[1],
        hidden_dims=(500, 500, 2000, 10),
        scaling="auto",
        pretrain_mode="end_to_end",
        pretrain_epochs="auto",
        layerwise_epochs=20,
        pretrain_batch_size=256,
        pretrain_lr=1.0,
        pretrain_momentum=0.9,
        pretrain_lr_schedule="constant",
        dropout=0.2,
        precision="auto",
        augment="auto",
        image_shape="auto",
        n_pretrain_init=1,
        pretrain_selection="reconstruction",
        init="manifold",
        distill_epochs=DISTILL_EPOCHS,
        distill_lr="auto",
        distill_rounds=DISTILL_ROUNDS,
        n_init=20,
        alpha=1.0,
        batch_size=256,
        lr=0.01,
        momentum=0.9,
        update_interval="auto",
        tol=0.001,
        max_iter=20000,
        variant="dec",
        gamma=0.1,
        random_state=0,
        device="auto",
    ):
        self.n_clusters = n_clusters
        self.k_min = k_min
        self.k_max = k_max
        self.hidden_dims = hidden_dims
        self.scaling = scaling
        self.pretrain_mode = pretrain_mode
        self.pretrain_epochs = pretrain_epochs
        self.layerwise_epochs = layerwise_epochs
        self.pretrain_batch_size = pretrain_batch_size
        self.pretrain_lr = pretrain_lr
        self.pretrain_momentum = pretrain_momentum
        self.pretrain_lr_schedule = pretrain_lr_schedule
        self.dropout = dropout
        self.precision = precision
        self.augment = augment
        self.image_shape = image_shape
        self.n_pretrain_init = n_pretrain_init
        self.pretrain_selection = pretrain_selection
        self.init = init
        self.distill_epochs = distill_epochs
        self.distill_lr = distill_lr
        self.distill_rounds = distill_rounds
        self.n_init = n_init
        self.alpha = alpha
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.update_interval = update_interval
        self.tol = tol
        self.max_iter = max_iter
        self.variant = variant
        self.gamma = gamma
        self.random_state = random_state
        self.device = device

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

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _seed(self) -> int:
        """``random_state`` as an int seed: itself, or drawn from the given RandomState (None: numpy's global one)."""
        if isinstance(self.random_state, Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self._device().type == "cpu" and _cpu_has_bf16() else "fp32"
        return self.precision

    def resolve(self, X, *, pretraining: bool = False) -> dict:
        """What the 'auto' settings resolve to on raw ``X`` (n_samples, n_features).

        Returns a dict with 'scaling', 'pretrain_epochs' (of ``fit``, or with ``pretraining`` of
        ``pretrain``, which always pretrains), 'update_interval', 'precision', 'device' ('cpu',
        'cuda' or 'cuda:N'), 'image_shape' (a tuple or None) and 'augment'; the pretraining rate
        actually used is known only after pretraining (``resolved_params_``).
        """
        n = X.shape[0]
        epochs = self.pretrain_epochs
        if epochs == "auto" and params.starts_from_input(self.get_params()) and self.n_pretrain_init == 1 and not pretraining:
            epochs = 0
        elif epochs == "auto":
            iters_per_epoch = math.ceil(n / min(self.pretrain_batch_size, n))
            epochs = max(PRETRAIN_EPOCHS, math.ceil(MIN_PRETRAIN_ITER / iters_per_epoch))
        interval = self.update_interval
        if interval == "auto":
            interval = min(UPDATE_INTERVAL, max(1, n // min(self.batch_size, n)))
        scaling = auto_scaling(X) if self.scaling == "auto" else self.scaling
        if self.image_shape == "auto":
            image_shape = infer_image_shape(X)
        else:
            image_shape = None if self.image_shape is None else tuple(int(s) for s in self.image_shape)
        augment = self.augment
        if augment == "auto":  # images on one scale (shifting a per-feature scaled image would mix pixels' scales)
            augment = "distill" if image_shape is not None and params.distills(self.get_params()) and scaling != "standard" else False
        return {"scaling": scaling, "pretrain_epochs": int(epochs), "update_interval": int(interval),
                "precision": self._precision(), "device": str(self._device()), "image_shape": image_shape,
                "augment": augment}

    def _transform(self, resolved: dict, scale: np.ndarray, device: torch.device, seed: int):
        """The augmentation of scaled batches (DEC-DA), or None; its randomness from its own generator.

        Shifting and rotating the scaled image equals doing so to the raw one only when every pixel
        has the same scale and no offset ('max' and 'none'), which is checked here.
        """
        if not resolved["augment"]:
            return None
        if resolved["image_shape"] is None:
            raise ValueError(f"augment={self.augment!r} needs image_shape, but none was given and the rows do not look "
                             "like square single-channel images (dec_mlflow.augment.infer_image_shape); give image_shape")
        shape = check_image_shape(resolved["image_shape"], scale.shape[0])
        if not np.allclose(scale, scale[0]):
            raise ValueError("augment=True needs one scale for every pixel (scaling 'max' or 'none'), but the "
                             "input is scaled per feature ('standard', chosen by 'auto' for this data or given)")
        # under torchrun each rank draws its own shifts for its own rows
        generator = torch.Generator(device=device).manual_seed(seed + distributed.rank())
        return functools.partial(random_shift_rotate, image_shape=shape, generator=generator)

    # ------------------------------------------------------------------ stages
    def pretrain(self, X, callback: Callback | None = None, *, seed: int | None = None,
                 resume: PretrainCheckpoint | None = None) -> PretrainedAutoencoder:
        """Stage 1: fit the input scaling and pretrain the autoencoder on ``X``.

        Does not fit the estimator; pass the result to ``fit(X, autoencoder=...)``. ``seed``
        (default ``random_state``) seeds the weights and batches. A pretraining whose loss stops
        being finite restarts from scratch at a quarter of the learning rate (up to 3 times,
        reported through ``callback.on_retry``); the rate that worked is the result's ``lr``.
        After every epoch ``callback.on_checkpoint`` is offered a :class:`PretrainCheckpoint`;
        ``resume`` continues from one made with the same settings, data and seed: the result is
        the one the uninterrupted pretraining would have given (exactly, on the CPU).

        Raises
        ------
        FloatingPointError
            When pretraining diverges at every rate tried.
        """
        self.validate_params()
        X = self._check_X(X, fitting=True)
        callback = callback or Callback()
        resolved = self.resolve(X, pretraining=True)
        offset, scale = fit_scaling(X, resolved["scaling"])
        device = self._device()
        seed = self._seed() if seed is None else seed
        x = scaled(X, offset, scale, device)  # (n, n_features); read a batch at a time when X is streamed
        lr, first = (self.pretrain_lr, 0) if resume is None else (resume.pretrained.lr, resume.attempt)
        if resume is not None:
            resume = self._check_resume(resume, offset, scale)
        for attempt in range(first, PRETRAIN_RETRIES + 1):
            try:
                transform = self._transform(resolved, scale, device, seed) if resolved["augment"] is True else None
                checkpoints = Checkpoints(callback, offset, scale, lr, attempt, transform)
                ae, loss = self._pretrain_once(x, lr, resolved, seed, transform, checkpoints, resume)
                return PretrainedAutoencoder(ae.cpu(), offset, scale, loss, lr)
            except FloatingPointError as e:
                if attempt == PRETRAIN_RETRIES:
                    raise FloatingPointError(
                        f"{e}: pretraining diverged at pretrain_lr={self.pretrain_lr:g} and at each of {PRETRAIN_RETRIES} "
                        f"restarts down to {lr:g}; lower pretrain_lr, or check the data for extreme values") from e
                lr, resume = lr / 4.0, None
                callback.on_retry("pretrain", attempt + 1, f"{e}; restarting at pretrain_lr={lr:g}")
        raise AssertionError("unreachable")

    def _pretrain_once(self, x, lr: float, resolved: dict, seed: int, transform, callback: "Checkpoints",
                       resume: PretrainCheckpoint | None = None):
        """One pretraining from fresh weights seeded by ``seed``, or from ``resume``; returns (autoencoder, last loss)."""
        opt = dict(batch_size=self.pretrain_batch_size, lr=lr, momentum=self.pretrain_momentum,
                   lr_schedule=self.pretrain_lr_schedule, precision=resolved["precision"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = Autoencoder((x.shape[1], *self.hidden_dims)).to(x.device)
            callback.autoencoder = ae
            state = None
            if resume is not None:
                ae.load_state_dict(resume.pretrained.autoencoder.state_dict())
                state = resume.state
                if "augment" in state.rng and transform is not None:
                    transform.keywords["generator"].set_state(state.rng["augment"])
            finetune = "pretrain/finetune" if self.pretrain_mode == "layerwise" else "pretrain"
            if self.pretrain_mode == "layerwise" and (state is None or state.stage != finetune):
                pretrain_layerwise(ae, x, dropout=self.dropout, callback=callback, epochs=self.layerwise_epochs,
                                   resume=state, **opt)
                state = None
            loss = float("nan")
            epochs = resolved["pretrain_epochs"]
            if epochs > 0:
                loss = pretrain_end_to_end(ae, x, callback=callback, stage=finetune, epochs=epochs, transform=transform,
                                           resume=state, **opt)
        return ae, loss

    def _check_resume(self, resume: PretrainCheckpoint, offset: np.ndarray, scale: np.ndarray) -> PretrainCheckpoint:
        """``resume`` if it continues a pretraining of this network on this data's scaling, else ValueError."""
        dims = (len(offset), *self.hidden_dims)
        if tuple(resume.pretrained.autoencoder.dims) != dims:
            raise ValueError(f"resume: the checkpoint is of an autoencoder {tuple(resume.pretrained.autoencoder.dims)}, "
                             f"this pretraining makes {dims}")
        if not (np.array_equal(resume.pretrained.offset, offset) and np.array_equal(resume.pretrained.scale, scale)):
            raise ValueError("resume: the checkpoint was made under another input scaling (other data or scaling)")
        return resume

    def fit(self, X, y=None, *, autoencoder: PretrainedAutoencoder | None = None, callback: Callback | None = None):
        """Pretrain (unless ``autoencoder`` is given), find the initial clusters, self-train.

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
        callback = callback or Callback()
        self.selected_seed_, self.pretrain_candidates_ = self._seed(), []
        resolved = self.resolve(X)
        if autoencoder is None and resolved["pretrain_epochs"] == 0:
            autoencoder = self.untrained_autoencoder(X, seed=self.selected_seed_, scaling=resolved["scaling"])
        elif autoencoder is None:
            autoencoder = self._pretrain_and_select(X, callback)
        elif autoencoder.n_features != X.shape[1]:
            raise ValueError(
                f"autoencoder expects {autoencoder.n_features} features, but X has {X.shape[1]}"
            )
        device = self._device()
        encoder = copy.deepcopy(autoencoder.autoencoder.encoder).to(device)
        decoder = copy.deepcopy(autoencoder.autoencoder.decoder).to(device) if self.variant == "idec" else None
        x = scaled(X, autoencoder.offset, autoencoder.scale, device)
        transform = self._transform(resolved, autoencoder.scale, device, self.selected_seed_)
        train = dict(alpha=self.alpha, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, callback=callback)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.selected_seed_)
            # an untrained encoder's embedding says nothing yet: the initial clusters come from the input itself
            space = None if autoencoder.trained else (X, autoencoder.offset, autoencoder.scale, resolved["image_shape"])
            init, scale = self._initial_clusters(encoder, decoder, x, callback, space)
            centroids = torch.nn.Parameter(torch.from_numpy(init.centroids * scale).to(device))
            distilling = params.distills(self.get_params()) and init.posteriors is not None  # one cluster: no posteriors to learn
            n_iter = max(DISTILL_MIN_ITER, self.distill_epochs * max(1, x.shape[0] // min(self.batch_size, x.shape[0])))
            distill_lr = self._distill_lr(autoencoder.trained)
            trained = distill_and_self_train(
                encoder, centroids, x, torch.from_numpy(init.posteriors).to(device) if distilling else None,
                rounds=self.distill_rounds,
                # a pretrained encoder distils as before the untrained start: constant rate, sharp targets
                distill_options=dict(n_iter=n_iter, transform=transform, one_cycle=not autoencoder.trained,
                                     smoothing=0.0 if autoencoder.trained else DISTILL_SMOOTHING, **{**train, "lr": distill_lr}),
                self_train_options=dict(update_interval=resolved["update_interval"], tol=self.tol, max_iter=self.max_iter,
                                        train_encoder=self.variant != "frozen", decoder=decoder, gamma=self.gamma,
                                        transform=None if resolved["augment"] == "distill" else transform, **train),
                # without pretraining, each round after the first trains a new encoder on the previous round's P
                fresh_student=None if autoencoder.trained else (
                    lambda round_: self._fresh_student(X.shape[1], init.centroids, round_, device)),
            )
        encoder, centroids, result = trained.encoder, trained.centroids, trained.result
        self.round_labels_, total_iter = trained.round_labels, trained.n_iter
        self.network_ = DECNet(
            encoder.cpu(), centroids.detach().cpu(), torch.from_numpy(autoencoder.offset),
            torch.from_numpy(autoencoder.scale), self.alpha,
        ).eval()
        self.cluster_centers_ = self.network_.centroids.detach().numpy().copy()
        self.init_labels_ = init.labels
        self.n_clusters_ = len(self.cluster_centers_)
        self.k_scores_ = init.k_scores or {}
        self.labels_ = result.labels
        self.n_iter_ = total_iter
        self.converged_ = result.converged
        self.n_features_in_ = X.shape[1]
        self.pretrain_loss_ = autoencoder.loss
        self.kl_loss_ = result.kl_loss
        self.resolved_params_ = {**resolved, "pretrain_lr": autoencoder.lr, "distill_lr": distill_lr}
        self.trust_scores_ = self._trust_scores(embed(self.network_.encoder, x.cpu()).numpy(), result.q.cpu().numpy())
        self.trust_score_ = self.trust_scores_[TRUST_SCORE]
        return self

    def _distill_lr(self, trained: bool) -> float:
        """``distill_lr``, its 'auto' resolved for an encoder that is pretrained (``trained``) or not."""
        if self.distill_lr != "auto":
            return float(self.distill_lr)
        return min(self.lr, PRETRAINED_DISTILL_LR) if trained else DISTILL_LR

    def _fresh_student(self, n_features: int, prototypes: np.ndarray, round_: int, device):
        """Round ``round_``'s new encoder (seeded by ``selected_seed_ + round_``) and centroids at the prototypes."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.selected_seed_ + round_)
            encoder = Autoencoder((n_features, *self.hidden_dims)).encoder.to(device)
        return encoder, torch.nn.Parameter(torch.from_numpy(prototypes.copy()).to(device))

    def untrained_autoencoder(self, X, *, seed: int | None = None, scaling: str | None = None) -> PretrainedAutoencoder:
        """The untrained autoencoder (weights seeded by ``seed``, default ``random_state``) and the input
        scaling of a fit without pretraining (``scaling`` as resolved, else resolved here); its ``trained`` is False."""
        offset, scale = fit_scaling(X, scaling or self.resolve(X)["scaling"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed() if seed is None else seed)
            ae = Autoencoder((X.shape[1], *self.hidden_dims))
        return PretrainedAutoencoder(ae, offset, scale, float("nan"), float("nan"), trained=False)

    def _initial_clusters(self, encoder, decoder, x, callback: Callback, space=None):
        """Stage 2: the initial clustering (``init``), and the embedding's scale.

        ``space`` (raw X, offset, scale), given when the encoder is untrained, makes the manifold
        initialisation map the scaled input (reduced to 50 principal components) instead of the
        embedding; the centroids are always in the embedding.

        The encoder (and an IDEC decoder) are rescaled in place so that points lie at the squared
        distance the Student's t kernel expects from their initial centroids; returns the clustering
        (in the unscaled embedding) and the factor its centroids must be multiplied by. Under
        torchrun the ranks embed their blocks of rows, rank 0 clusters the gathered embedding of all
        the data and broadcasts the clustering, so every rank starts from the same centroids.
        """
        callback.on_stage_begin("init", None)
        z = distributed.all_gather_rows(embed(encoder, x, rows=distributed.rows(x.shape[0]))).cpu().numpy()  # (n, embedding_dim)
        init = scale = None
        if distributed.is_main():
            features = None if space is None else input_space(*space[:3], image_shape=space[3], seed=self.selected_seed_)
            init, scale = initial_clustering(z, self.n_clusters, init=self.init, seed=self.selected_seed_,
                                             n_init=self.n_init, space=features, k_range=(self.k_min, self.k_max),
                                             callback=callback)
        init, scale = distributed.broadcast_object((init, scale))
        scale_embedding(encoder, scale, decoder)
        callback.on_stage_end("init")
        return init, scale

    def _trust_scores(self, z: np.ndarray, q: np.ndarray) -> dict[str, float]:
        """Label-free scores of the fitted clustering (see ``trust_scores_``)."""
        return {
            "balance": trust.size_balance(self.labels_, self.n_clusters_),
            "silhouette": trust.silhouette(z, self.labels_, seed=self.selected_seed_),
            "init_agreement": trust.agreement(self.labels_, self.init_labels_),
            "confidence": trust.confidence(q),
        }

    def _pretrain_and_select(self, X: Features, callback: Callback) -> PretrainedAutoencoder:
        """Pretrain ``n_pretrain_init`` candidates; keep the best by ``pretrain_selection``, set selected_seed_."""
        if self.n_pretrain_init == 1:
            return self.pretrain(X, callback, seed=self.selected_seed_)
        best = None
        for seed in range(self.selected_seed_, self.selected_seed_ + self.n_pretrain_init):
            ae = self.pretrain(X, callback, seed=seed)
            criteria = selection_criteria(ae, X, self.n_clusters, n_init=self.n_init, seed=seed)
            self.pretrain_candidates_.append({"seed": seed, **criteria})
            if best is None or criteria[self.pretrain_selection] < best[0]:
                best = (criteria[self.pretrain_selection], seed, ae)
        _, self.selected_seed_, ae = best
        return ae

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


def selection_criteria(ae: PretrainedAutoencoder, X: Features, n_clusters: int, *, n_init: int, seed: int) -> dict:
    """Label-free quality criteria of a pretrained autoencoder on raw ``X``; lower is better.

    Returns
    -------
    dict with 'reconstruction' (mean squared error of the scaled input, per feature) and, unless
    ``n_clusters`` is 'auto', 'inertia' (k-means inertia in the embedding / total sum of squares about
    the mean, in [0, 1]).
    """
    x = scaled(_as_features(X), ae.offset, ae.scale, torch.device("cpu"))
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
    x = scaled(_as_features(X), ae.offset, ae.scale, torch.device("cpu"))
    z = embed(ae.autoencoder.encoder, x).numpy()  # (n, d)
    km = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(z)
    total = float(((z.astype(np.float64) - z.mean(0, dtype=np.float64)) ** 2).sum())
    return km.labels_.astype(np.int64), float(km.inertia_) / total


def map_k_scores(est: DEC, X: Features, k_min: int, k_max: int, *,
                 autoencoder: PretrainedAutoencoder | None = None) -> tuple[int, dict[int, float]]:
    """What ``n_clusters='auto'`` would choose on ``X``, without fitting: (k, {k: silhouette in the map}).

    The map is the one ``est.fit`` makes: of the scaled input (reduced to 50 principal components) when
    there is no trained ``autoencoder``, else of its embedding; then :func:`choose_k` over ``k_min..k_max``.
    """
    seed = est._seed()
    if autoencoder is None or not autoencoder.trained:
        resolved = est.resolve(X)
        offset, scale = fit_scaling(X, resolved["scaling"])
        space = input_space(X, offset, scale, image_shape=resolved["image_shape"], seed=seed)
    else:
        space = InputSpace(embed(autoencoder.autoencoder.encoder, scaled(_as_features(X), autoencoder.offset,
                                                                         autoencoder.scale, torch.device("cpu"))).numpy())
    return choose_k(umap_map(space.points, MAX_MAP_DIM, seed=seed, shifted=space.shifted), k_min, k_max, seed=seed)


def _as_features(X) -> Features:
    """A memory map or sparse matrix as it is, anything else as an in-memory float32 array."""
    return X if streamed(X) else np.asarray(X, np.float32)
