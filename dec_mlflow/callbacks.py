"""How training reports progress: a small callback protocol, its terminal implementation and a
recorder of self-training for the paper's figures.

Training code never logs or prints; it calls these hooks. The MLflow implementation lives in
``dec_mlflow.tracking``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dec_mlflow.environment import raise_if_stopped
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.objectives import (
    kl_gradient_wrt_z,
    soft_assignment,
    target_distribution,
)


class Callback:
    """Hooks called by the training loops. Every method is optional.

    Stages are named ``"pretrain/layer1"`` ... ``"pretrain/finetune"`` (or ``"pretrain"`` in the
    end-to-end mode), ``"init"`` (with the manifold initialisation's sub-stages ``"init/neighbours"``,
    ``"init/map"`` and ``"init/mixture"`` inside it), ``"distill"`` and ``"self_train"``.
    """

    shows_progress = False  # True for callbacks that draw progress: a library's own bars may then show too

    def on_stage_begin(self, stage: str, total: int | None) -> None:
        """A stage starts; ``total`` is its number of steps (epochs or iterations), if known."""

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """A stage reached ``step`` (an epoch in pretraining, an iteration in self-training)."""

    def on_update(self, step: int, labels: np.ndarray, metrics: dict[str, float]) -> None:
        """Self-training recomputed P at iteration ``step``; ``labels`` are the current hard labels."""

    def on_state(self, step: int, encoder, centroids) -> None:
        """Self-training recomputed P at iteration ``step`` (called right after :meth:`on_update`).

        ``encoder`` (torch module, eval mode) and ``centroids`` (tensor, (n_clusters, embedding_dim))
        are the live model: read them under ``torch.no_grad()``, never modify them.
        """

    def on_stage_end(self, stage: str) -> None:
        """The stage finished."""

    def on_retry(self, stage: str, attempt: int, message: str) -> None:
        """The stage failed and starts again (``attempt`` = 1, 2, ...); ``message`` says why and how."""

    def on_checkpoint(self, stage: str, epoch: int, state) -> None:
        """A pretraining stage finished ``epoch``; ``state()`` returns what continuing from here needs
        (a :class:`~dec_mlflow.training.LoopState`, or the estimator's ``PretrainCheckpoint``). It
        holds the live weights: save it at once or not at all."""


class CallbackList(Callback):
    """Fans each hook out to several callbacks."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    @property
    def shows_progress(self) -> bool:
        return any(cb.shows_progress for cb in self.callbacks)

    def on_stage_begin(self, stage, total):
        raise_if_stopped()  # a stop signal that a library swallowed is raised again here
        for cb in self.callbacks:
            cb.on_stage_begin(stage, total)

    def on_step(self, stage, step, metrics):
        raise_if_stopped()
        for cb in self.callbacks:
            cb.on_step(stage, step, metrics)

    def on_update(self, step, labels, metrics):
        for cb in self.callbacks:
            cb.on_update(step, labels, metrics)

    def on_state(self, step, encoder, centroids):
        for cb in self.callbacks:
            cb.on_state(step, encoder, centroids)

    def on_stage_end(self, stage):
        for cb in self.callbacks:
            cb.on_stage_end(stage)

    def on_retry(self, stage, attempt, message):
        for cb in self.callbacks:
            cb.on_retry(stage, attempt, message)

    def on_checkpoint(self, stage, epoch, state):
        for cb in self.callbacks:
            cb.on_checkpoint(stage, epoch, state)


class ProgressBar(Callback):
    """A tqdm bar per stage on stderr: step / total, rate, ETA and the latest metrics."""

    shows_progress = True

    def __init__(self, file=None):
        self.file = file if file is not None else sys.stderr
        self._bars: list[list] = []  # [bar, last step] per open stage; a sub-stage ('init/map') opens below its stage

    def on_stage_begin(self, stage, total):
        bar = tqdm(total=total, desc=stage, file=self.file, dynamic_ncols=True, leave=True, position=len(self._bars))
        self._bars.append([bar, 0])

    def on_step(self, stage, step, metrics):
        if not self._bars:
            return
        entry = self._bars[-1]
        entry[0].update(step - entry[1])
        entry[1] = step
        entry[0].set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def on_stage_end(self, stage):
        if self._bars:
            self._bars.pop()[0].close()

    def close(self) -> None:
        """End every open bar's line (a stage that raised never reaches on_stage_end)."""
        while self._bars:
            self._bars.pop()[0].close()

    def on_retry(self, stage, attempt, message):
        self.on_stage_end(stage)
        tqdm.write(f"{stage}: retry {attempt}: {message}", file=self.file)


class SelfTrainRecorder(Callback):
    """Records what the self-training figures need (paper Fig. 3-4), on a subsample of the data.

    At each target update it appends the update's metrics to :attr:`history` and a snapshot of the
    subsample's embedding to :attr:`snapshots`; at the first update only it also stores the
    gradient of the KL loss per subsample point in :attr:`gradient` (the paper's Fig. 4 shows the
    start of KL minimisation). A new ``"self_train"`` stage starts a new recording.

    Memory: a snapshot of m points in a d-dimensional embedding costs m * d * 4 bytes (float32)
    plus m * 8 bytes of labels, once per target update; choose m accordingly (e.g. 2,000 points,
    d = 10 and 1,000 updates take about 96 MB).

    Parameters
    ----------
    x : Tensor of shape (m, n_features), float32
        Subsample of the training input, scaled exactly as the encoder sees it.
    y : ndarray of shape (m,), optional
        True labels of the subsample, kept as :attr:`y` for colouring the figures.
    y_full : ndarray of shape (n_samples,), optional
        True labels of the whole training data; when given, :attr:`history` gets ``"accuracy"``.
    alpha : float
        Degrees of freedom of the Student's t kernel, the same as the estimator's.

    Attributes
    ----------
    history : dict of str to list
        ``"step"`` (int), ``"kl_loss"`` and ``"delta_label"`` (float, over the whole data, as
        reported by self-training), and ``"accuracy"`` (Hungarian accuracy of the full labels
        against ``y_full``) only when ``y_full`` is given; one entry per target update.
    snapshots : list of (int, ndarray of shape (m, d) float32, ndarray of shape (m,) int64)
        ``(step, z, labels)`` per target update: the subsample's embedding and its hard labels
        argmax_j q_ij.
    gradient : dict of str to int or ndarray, or None
        Set at the first target update: ``"step"``, ``"q"`` (m, k) and ``"p"`` (m, k) float32 and
        ``"grad_norm"`` (m,) float32, the norm |dL/dz_i| of :func:`~dec_mlflow.objectives.kl_gradient_wrt_z`
        (eq. 4, loss summed over points). The cluster frequencies f_j of P are estimated on the
        subsample, not on the whole data as in training.
    """

    def __init__(self, x: torch.Tensor, y: np.ndarray | None = None, *, y_full: np.ndarray | None = None,
                 alpha: float = 1.0):
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty 2-D tensor (m, n_features); got shape {tuple(x.shape)}")
        if y is not None and np.shape(y) != (x.shape[0],):
            raise ValueError(f"y must have shape (m,) = ({x.shape[0]},) like x; got {np.shape(y)}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0; got alpha={alpha}")
        self.x = x
        self.y = None if y is None else np.asarray(y)
        self.y_full = None if y_full is None else np.asarray(y_full)
        self.alpha = alpha
        self._reset()

    def _reset(self) -> None:
        self.history = {"step": [], "kl_loss": [], "delta_label": [], **({} if self.y_full is None else {"accuracy": []})}
        self.snapshots = []
        self.gradient = None

    def on_stage_begin(self, stage, total):
        if stage == "self_train":
            self._reset()

    def on_update(self, step, labels, metrics):
        self.history["step"].append(int(step))
        self.history["kl_loss"].append(float(metrics["kl_loss"]))
        self.history["delta_label"].append(float(metrics["delta_label"]))
        if self.y_full is not None:
            if len(labels) != len(self.y_full):
                raise ValueError(
                    f"y_full must label the whole training data: {len(self.y_full)} labels for {len(labels)} samples"
                )
            self.history["accuracy"].append(cluster_accuracy(self.y_full, labels))

    def on_state(self, step, encoder, centroids):
        with torch.no_grad():
            mu = centroids.detach().float()  # (k, d)
            z = encoder(self.x.to(mu.device)).float()  # (m, d)
            q = soft_assignment(z, mu, self.alpha)  # (m, k)
            self.snapshots.append((int(step), _numpy(z), q.argmax(1).cpu().numpy()))
            if self.gradient is None:
                self.gradient = self._gradient(int(step), z, mu, q)

    def _gradient(self, step: int, z: torch.Tensor, mu: torch.Tensor, q: torch.Tensor) -> dict:
        """Eq. 4 on the subsample, with P from the subsample's own q (see :attr:`gradient`)."""
        p = target_distribution(q)
        grad = kl_gradient_wrt_z(z, mu, p, self.alpha)  # (m, d)
        return {"step": step, "q": _numpy(q), "p": _numpy(p), "grad_norm": _numpy(grad.norm(dim=1))}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a float32 NumPy array on the CPU."""
    return t.detach().to("cpu", torch.float32).numpy()
