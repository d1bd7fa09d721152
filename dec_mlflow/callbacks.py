"""How training reports progress: a small callback protocol and its terminal implementation.

Training code never logs or prints; it calls these hooks. The MLflow implementation lives in
``dec_mlflow.tracking``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm


class Callback:
    """Hooks called by the training loops. Every method is optional.

    Stages are named ``"pretrain/layer1"`` ... ``"pretrain/finetune"`` (or ``"pretrain"`` in the
    end-to-end mode), ``"kmeans"`` and ``"self_train"``.
    """

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


class CallbackList(Callback):
    """Fans each hook out to several callbacks."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_stage_begin(self, stage, total):
        for cb in self.callbacks:
            cb.on_stage_begin(stage, total)

    def on_step(self, stage, step, metrics):
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


class ProgressBar(Callback):
    """A tqdm bar per stage on stderr: step / total, rate, ETA and the latest metrics."""

    def __init__(self, file=None):
        self.file = file if file is not None else sys.stderr
        self._bar = None
        self._last = 0

    def on_stage_begin(self, stage, total):
        self._bar = tqdm(total=total, desc=stage, file=self.file, dynamic_ncols=True, leave=True)
        self._last = 0

    def on_step(self, stage, step, metrics):
        if self._bar is None:
            return
        self._bar.update(step - self._last)
        self._last = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def on_stage_end(self, stage):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
