"""The scikit-learn compatible DEC estimator: pretrain, initialise centroids, self-train."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted

from dec_mlflow.callbacks import Callback
from dec_mlflow.checkpoint import load_tensors, save_tensors
from dec_mlflow.model import Autoencoder, DECNet
from dec_mlflow.objectives import kl_divergence, target_distribution
from dec_mlflow.training import embed, pretrain_end_to_end, pretrain_layerwise, reconstruction_error, self_train

SCALINGS = ("max", "standard", "none")
PRETRAIN_MODES = ("end_to_end", "layerwise")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
VARIANTS = ("dec", "frozen", "idec")
SELECTIONS = ("reconstruction", "inertia")


@dataclass
class PretrainedAutoencoder:
    """What pretraining produces: the autoencoder and the input scaling it was trained under."""

    autoencoder: Autoencoder
    offset: np.ndarray  # (n_features,) subtracted from raw features
    scale: np.ndarray  # (n_features,) multiplied after the offset
    loss: float  # mean reconstruction loss of the last pretraining epoch

    @property
    def n_features(self) -> int:
        return self.autoencoder.dims[0]

    def save(self, path: str | Path) -> None:
        """Write dims, weights, scaling and loss to ``path`` as tensors + JSON (no pickle, see ``load``)."""
        tensors = {f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()}
        tensors.update(offset=torch.from_numpy(np.asarray(self.offset)), scale=torch.from_numpy(np.asarray(self.scale)))
        save_tensors(path, tensors, {"dims": list(self.autoencoder.dims), "loss": float(self.loss)})

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedAutoencoder":
        """Read a checkpoint written by ``save``; a file that needs pickle to load is refused (ValueError)."""
        tensors, settings = load_tensors(path)
        prefix = "autoencoder."
        try:
            ae = Autoencoder(settings["dims"])
            ae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            offset, scale, loss = tensors["offset"].numpy(), tensors["scale"].numpy(), float(settings["loss"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a checkpoint of something else
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path} is not a pretrained autoencoder checkpoint: {detail}") from None
        return cls(ae, offset, scale, loss)


def _cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class DEC(ClusterMixin, TransformerMixin, BaseEstimator):
    """Deep Embedded Clustering (Xie, Girshick, Farhadi, ICML 2016).

    Pretrains an autoencoder, runs k-means in its embedding to place the centroids, then refines
    encoder and centroids together by minimising KL(P || Q) between the Student's t soft
    assignments Q and their sharpened target P.

    Parameters
    ----------
    n_clusters : int, default=10
    hidden_dims : tuple of int, default=(500, 500, 2000, 10)
        Encoder widths after the input; the last one is the embedding dimension.
    scaling : {'max', 'standard', 'none'}, default='standard'
        Input scaling learned at fit time and applied by predict / export: 'max' divides by the
        global max |x| (pixels / 255 for MNIST), 'standard' standardises each feature.
    pretrain_mode : {'end_to_end', 'layerwise'}, default='end_to_end'
        'layerwise' is the paper's greedy denoising pretraining followed by ``pretrain_epochs`` of
        end-to-end fine-tuning; 'end_to_end' trains the whole autoencoder from the start.
    pretrain_epochs : int, default=75
        End-to-end epochs (fine-tuning epochs in 'layerwise' mode).
    layerwise_epochs : int, default=20
        Epochs per layer in 'layerwise' mode.
    pretrain_batch_size : int, default=256
    pretrain_lr : float, default=1.0
        SGD learning rate of pretraining (MSE averaged over features, so the gradient is small).
    pretrain_momentum : float, default=0.9
    pretrain_lr_schedule : {'constant', 'cosine'}, default='constant'
    dropout : float, default=0.2
        Corruption rate of the denoising layers ('layerwise' mode only).
    precision : {'auto', 'fp32', 'bf16'}, default='auto'
        Matmul precision of pretraining; 'auto' picks bf16 on CPUs with native bf16 instructions.
        Self-training always runs in fp32.
    n_pretrain_init : int, default=1
        Autoencoders to pretrain, with seeds ``random_state``, ``random_state + 1``, ...; the one
        with the best ``pretrain_selection`` criterion is kept and its seed drives the rest of the
        fit, so the result equals ``fit`` with ``random_state`` set to the selected seed. Labels
        are never used. Costs one pretraining per candidate.
    pretrain_selection : {'reconstruction', 'inertia'}, default='reconstruction'
        Criterion among candidates, lower is better: 'reconstruction' is the mean squared
        reconstruction error over X; 'inertia' is the k-means (``n_init``) inertia in the
        embedding divided by the embedding's total sum of squares (scale-free, so embeddings of
        different autoencoders compare).
    n_init : int, default=20
        k-means restarts for the initial centroids.
    alpha : float, default=1.0
        Degrees of freedom of the Student's t kernel.
    batch_size : int, default=256
        Self-training batch size.
    lr : float, default=0.01
    momentum : float, default=0.9
        SGD settings of self-training.
    update_interval : int, default=140
        Iterations between recomputations of the target P over the whole data set.
    tol : float, default=0.001
        Stop when fewer than this fraction of labels change between two target updates.
    max_iter : int, default=20000
        Upper bound on self-training iterations.
    variant : {'dec', 'frozen', 'idec'}, default='dec'
        'dec' trains encoder and centroids on KL(P || Q); 'frozen' keeps the pretrained encoder
        fixed and moves only the centroids (the paper's "DEC w/o backprop"); 'idec' keeps the
        decoder and minimises ``reconstruction MSE + gamma * KL`` (Guo et al., IJCAI 2017).
    gamma : float, default=0.1
        Weight of the KL term in 'idec' (IDEC's paper value); ignored by the other variants.
    random_state : int, default=0
    device : str, default='auto'
        'auto' uses CUDA when available, else the CPU.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, embedding_dim)
    labels_ : ndarray of shape (n_samples,)
    init_labels_ : ndarray of shape (n_samples,)
        k-means labels in the pretrained embedding (the AE+k-means baseline).
    n_iter_ : int
    converged_ : bool
    n_features_in_ : int
    pretrain_loss_ : float
    kl_loss_ : float
        KL(P || Q) over the training data at the last target update.
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
        hidden_dims=(500, 500, 2000, 10),
        scaling="standard",
        pretrain_mode="end_to_end",
        pretrain_epochs=75,
        layerwise_epochs=20,
        pretrain_batch_size=256,
        pretrain_lr=1.0,
        pretrain_momentum=0.9,
        pretrain_lr_schedule="constant",
        dropout=0.2,
        precision="auto",
        n_pretrain_init=1,
        pretrain_selection="reconstruction",
        n_init=20,
        alpha=1.0,
        batch_size=256,
        lr=0.01,
        momentum=0.9,
        update_interval=140,
        tol=0.001,
        max_iter=20000,
        variant="dec",
        gamma=0.1,
        random_state=0,
        device="auto",
    ):
        self.n_clusters = n_clusters
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
        self.n_pretrain_init = n_pretrain_init
        self.pretrain_selection = pretrain_selection
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
        """Raise ValueError naming the first parameter that breaks its rule."""
        positive_ints = ["n_clusters", "pretrain_batch_size", "n_pretrain_init", "n_init", "batch_size", "update_interval", "max_iter"]
        for name in positive_ints:
            _check_int(name, getattr(self, name), low=1)
        for name in ["pretrain_epochs", "layerwise_epochs"]:
            _check_int(name, getattr(self, name), low=0)
        _check_int("random_state", self.random_state, low=0)
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be >= 2, got {self.n_clusters}")
        for name in ["pretrain_lr", "lr", "alpha", "gamma"]:
            _check_real(name, getattr(self, name), low=0.0, low_open=True)
        for name in ["pretrain_momentum", "momentum", "tol"]:
            _check_real(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        _check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        for name, choices in [
            ("scaling", SCALINGS),
            ("pretrain_mode", PRETRAIN_MODES),
            ("pretrain_lr_schedule", LR_SCHEDULES),
            ("precision", PRECISIONS),
            ("variant", VARIANTS),
            ("pretrain_selection", SELECTIONS),
        ]:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        dims = tuple(self.hidden_dims)
        if not dims or any(not isinstance(d, Integral) or isinstance(d, bool) or d < 1 for d in dims):
            raise ValueError(f"hidden_dims must be a non-empty sequence of positive integers; got {self.hidden_dims!r}")
        if self.pretrain_mode == "end_to_end" and self.pretrain_epochs == 0:
            raise ValueError("pretrain_epochs must be >= 1 when pretrain_mode='end_to_end'; got 0")
        _check_device(self.device)

    def _check_X(self, X, *, fitting: bool) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features); got shape {X.shape}")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X is empty: shape {X.shape}")
        bad = ~np.isfinite(X)
        if bad.any():
            raise ValueError(f"X has {int(bad.sum())} NaN or infinite values (first at row {int(np.argwhere(bad)[0][0])})")
        if fitting and X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}")
        if not fitting and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but DEC was fitted with {self.n_features_in_} features")
        return X

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self._device().type == "cpu" and _cpu_has_bf16() else "fp32"
        return self.precision

    # ------------------------------------------------------------------ stages
    def pretrain(self, X, callback: Callback | None = None, *, seed: int | None = None) -> PretrainedAutoencoder:
        """Stage 1: fit the input scaling and pretrain the autoencoder on ``X``.

        Does not fit the estimator; pass the result to ``fit(X, autoencoder=...)``. ``seed``
        (default ``random_state``) seeds the weights and batches.
        """
        self.validate_params()
        X = self._check_X(X, fitting=True)
        callback = callback or Callback()
        offset, scale = _fit_scaling(X, self.scaling)
        device = self._device()
        opt = dict(
            batch_size=self.pretrain_batch_size,
            lr=self.pretrain_lr,
            momentum=self.pretrain_momentum,
            lr_schedule=self.pretrain_lr_schedule,
            precision=self._precision(),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state if seed is None else seed)
            ae = Autoencoder((X.shape[1], *self.hidden_dims)).to(device)
            x = torch.from_numpy((X - offset) * scale).to(device)
            if self.pretrain_mode == "layerwise":
                pretrain_layerwise(ae, x, dropout=self.dropout, callback=callback, epochs=self.layerwise_epochs, **opt)
            loss = float("nan")
            if self.pretrain_epochs > 0:
                stage = "pretrain/finetune" if self.pretrain_mode == "layerwise" else "pretrain"
                loss = pretrain_end_to_end(ae, x, callback=callback, stage=stage, epochs=self.pretrain_epochs, **opt)
        return PretrainedAutoencoder(ae.cpu(), offset, scale, loss)

    def fit(self, X, y=None, *, autoencoder: PretrainedAutoencoder | None = None, callback: Callback | None = None):
        """Pretrain (unless ``autoencoder`` is given), initialise centroids by k-means, self-train.

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
        self.selected_seed_, self.pretrain_candidates_ = self.random_state, []
        if autoencoder is None:
            autoencoder = self._pretrain_and_select(X, callback)
        elif autoencoder.n_features != X.shape[1]:
            raise ValueError(
                f"autoencoder expects {autoencoder.n_features} features, but X has {X.shape[1]}"
            )
        device = self._device()
        encoder = copy.deepcopy(autoencoder.autoencoder.encoder).to(device)
        decoder = copy.deepcopy(autoencoder.autoencoder.decoder).to(device) if self.variant == "idec" else None
        x = torch.from_numpy((X - autoencoder.offset) * autoencoder.scale).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.selected_seed_)
            centroids, self.init_labels_ = self._init_centroids(encoder, x, callback)
            result = self_train(
                encoder, centroids, x, alpha=self.alpha, batch_size=self.batch_size, lr=self.lr,
                momentum=self.momentum, update_interval=self.update_interval, tol=self.tol,
                max_iter=self.max_iter, callback=callback, train_encoder=self.variant != "frozen",
                decoder=decoder, gamma=self.gamma,
            )
        self.network_ = DECNet(
            encoder.cpu(), centroids.detach().cpu(), torch.from_numpy(autoencoder.offset),
            torch.from_numpy(autoencoder.scale), self.alpha,
        ).eval()
        self.cluster_centers_ = self.network_.centroids.detach().numpy().copy()
        self.labels_ = result.labels
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self.n_features_in_ = X.shape[1]
        self.pretrain_loss_ = autoencoder.loss
        self.kl_loss_ = result.kl_loss
        return self

    def _pretrain_and_select(self, X: np.ndarray, callback: Callback) -> PretrainedAutoencoder:
        """Pretrain ``n_pretrain_init`` candidates; keep the best by ``pretrain_selection``, set selected_seed_."""
        if self.n_pretrain_init == 1:
            return self.pretrain(X, callback)
        best = None
        for seed in range(self.random_state, self.random_state + self.n_pretrain_init):
            ae = self.pretrain(X, callback, seed=seed)
            criteria = selection_criteria(ae, X, self.n_clusters, n_init=self.n_init, seed=seed)
            self.pretrain_candidates_.append({"seed": seed, **criteria})
            if best is None or criteria[self.pretrain_selection] < best[0]:
                best = (criteria[self.pretrain_selection], seed, ae)
        _, self.selected_seed_, ae = best
        return ae

    def _init_centroids(self, encoder, x, callback: Callback) -> tuple[torch.nn.Parameter, np.ndarray]:
        """Stage 2: k-means (``n_init`` restarts) in the embedding places the initial centroids."""
        callback.on_stage_begin("kmeans", None)
        z = embed(encoder, x).cpu().numpy()
        km = KMeans(self.n_clusters, n_init=self.n_init, random_state=self.selected_seed_).fit(z)
        callback.on_stage_end("kmeans")
        centers = torch.from_numpy(km.cluster_centers_.astype(np.float32)).to(x.device)
        return torch.nn.Parameter(centers), km.labels_.astype(np.int64)

    # ------------------------------------------------------------------ inference
    def _forward(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_is_fitted(self, "network_")
        X = self._check_X(X, fitting=False)
        with torch.no_grad():
            q, labels, z = self.network_(torch.from_numpy(X))
        return q.numpy(), labels.numpy(), z.numpy()

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


def selection_criteria(ae: PretrainedAutoencoder, X: np.ndarray, n_clusters: int, *, n_init: int, seed: int) -> dict:
    """Label-free quality criteria of a pretrained autoencoder on raw ``X``; lower is better.

    Returns
    -------
    dict with 'reconstruction' (mean squared error of the scaled input, per feature) and
    'inertia' (k-means inertia in the embedding / total sum of squares about the mean, in [0, 1]).
    """
    x = torch.from_numpy((np.asarray(X, np.float32) - ae.offset) * ae.scale)
    _, inertia = embedding_kmeans(ae, X, n_clusters, n_init=n_init, seed=seed)
    return {"reconstruction": reconstruction_error(ae.autoencoder, x), "inertia": inertia}


def embedding_kmeans(ae: PretrainedAutoencoder, X: np.ndarray, n_clusters: int, *, n_init: int, seed: int):
    """k-means in the pretrained embedding of raw ``X``: the AE+k-means baseline.

    Returns
    -------
    labels : ndarray of shape (n_samples,), int64
    inertia : float, k-means inertia / total sum of squares of the embedding about its mean
    """
    x = torch.from_numpy((np.asarray(X, np.float32) - ae.offset) * ae.scale)
    z = embed(ae.autoencoder.encoder, x).numpy()  # (n, d)
    km = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(z)
    total = float(((z.astype(np.float64) - z.mean(0, dtype=np.float64)) ** 2).sum())
    return km.labels_.astype(np.int64), float(km.inertia_) / total


def _fit_scaling(X: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``offset`` and ``scale`` such that ``(X - offset) * scale`` is the scaled input."""
    n_features = X.shape[1]
    offset = np.zeros(n_features, np.float32)
    scale = np.ones(n_features, np.float32)
    if scaling == "max":
        peak = float(np.abs(X).max())
        scale[:] = 1.0 / peak if peak > 0 else 1.0
    elif scaling == "standard":
        offset = X.mean(0, dtype=np.float64).astype(np.float32)
        std = X.std(0, dtype=np.float64).astype(np.float32)
        scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0).astype(np.float32)
    return offset, scale


def _check_device(device) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (a torch.device too), and CUDA only where torch can use it."""
    name = str(device) if isinstance(device, torch.device) else device
    if name in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here (no GPU or driver, or a CPU-only torch); "
                         "use device='auto' or 'cpu'")
    n_gpus = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= n_gpus:
        raise ValueError(f"device={device!r} but this machine has {n_gpus} CUDA device(s): cuda:0 to cuda:{n_gpus - 1}")


def _check_int(name, value, *, low):
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _check_real(name, value, *, low, high=None, low_open=False, high_open=False):
    ok = isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a number {lo}{hi}; got {value!r}")
