"""Training loops: autoencoder pretraining (layer-wise denoising or end to end) and DEC self-training.

The loops take tensors and hyperparameters, report through a :class:`~dec_mlflow.callbacks.Callback`
and never log, seed or pick devices themselves: the estimator does that. Under torchrun every rank
runs the same loop on its share of each batch (:mod:`dec_mlflow.distributed`, whose collectives do
nothing in a single process). The data ``x`` is a tensor, or, for data larger than memory, a
:class:`~dec_mlflow.rows.ScaledRows` that indexes like one and reads each batch or chunk (``x[idx]``,
``x[a:b]``) from a memory map or sparse matrix when asked.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dec_mlflow import distributed
from dec_mlflow.callbacks import Callback
from dec_mlflow.model import Autoencoder
from dec_mlflow.objectives import kl_divergence, soft_assignment, target_distribution
from dec_mlflow.rows import MappedRows

Transform = Callable[[torch.Tensor], torch.Tensor]  # a batch (b, n_features) -> the same shape
# An autoencoder whose loss is this many times that of outputting zeros has blown up even if it is still
# finite (SGD overshoots into dead ReLUs and huge weights); pretraining then restarts at a lower rate.
BLOWUP = 10.0


@dataclass
class LoopState:
    """Where a reconstruction stage stands after ``epoch`` epochs: what continuing it exactly needs.

    Given back to :func:`pretrain_end_to_end` / :func:`pretrain_layerwise` as ``resume`` (with the
    network's weights of that moment loaded), the stage runs its remaining epochs with the same
    momentum and the same batch order as if it had never stopped.
    """

    stage: str  # e.g. 'pretrain', 'pretrain/layer2', 'pretrain/finetune'
    epoch: int  # epochs of the stage finished
    loss: float  # mean loss of the last of them
    optimizer: dict  # the SGD optimizer's state_dict (momentum buffers, hyperparameters)
    rng: dict[str, torch.Tensor]  # generator states: 'cpu' (batch order, dropout), 'cuda' on a GPU


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(precision: str, device: torch.device):
    """bf16 autocast for the matmuls on ``device`` (CPU or CUDA), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_at(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """Learning rate for ``epoch`` (0-based): constant, or cosine decay from ``lr`` towards 0."""
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr


def _train_reconstruction(
    net: nn.Module,
    x: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    lr_schedule: str,
    precision: str,
    stage: str,
    callback: Callback,
    transform: Transform | None = None,
    resume: LoopState | None = None,
) -> float:
    """Minimise the mean squared reconstruction error of ``net`` on ``x`` with SGD + momentum.

    A denoising layer corrupts its input through its own dropout; ``transform`` (augmentation)
    changes each batch before the network sees it, and the network then reconstructs the changed
    batch, as DEC-DA pretrains. After each epoch ``callback.on_checkpoint`` is offered the
    :class:`LoopState`; ``resume`` (with ``net`` already holding its weights) continues from one.
    Returns the last epoch's mean loss (over all ranks).

    Raises
    ------
    FloatingPointError
        When an epoch's loss is not finite, or more than ``BLOWUP`` times the loss of reconstructing
        every input as zeros: the learning rate is too large for the data.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    zeros_loss = sum(float(x[s : s + 4096].float().pow(2).sum()) for s in range(0, x.shape[0], 4096)) / x.numel()
    distributed.broadcast_parameters(params)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)
    n = x.shape[0]
    start, epoch_loss = 0, float("nan")
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        _set_rng_state(resume.rng, x.device)
        start, epoch_loss = resume.epoch, resume.loss
    callback.on_stage_begin(stage, epochs)
    net.train()
    for epoch in range(start, epochs):
        for group in opt.param_groups:
            group["lr"] = _lr_at(epoch, epochs, lr, lr_schedule)
        perm = distributed.broadcast(torch.randperm(n))
        total = torch.zeros((), device=x.device)
        for start in range(0, n, batch_size):
            idx, share = distributed.shard_batch(perm[start : start + batch_size])
            opt.zero_grad(set_to_none=True)
            if idx.numel():  # a rank may get no row of a last batch smaller than the number of ranks
                batch = x[idx] if transform is None else transform(x[idx])
                with _autocast(precision, x.device):
                    loss = nn.functional.mse_loss(net(batch).float(), batch)
                (loss * share).backward()
                total += loss.detach() * idx.numel()
            distributed.all_reduce_gradients(params)
            opt.step()
        epoch_loss = float(distributed.all_reduce_sum(total)) / n
        if not math.isfinite(epoch_loss) or epoch_loss > BLOWUP * zeros_loss:
            what = epoch_loss if not math.isfinite(epoch_loss) else f"{epoch_loss:.3g}, {epoch_loss / zeros_loss:.0f} times that of reconstructing zeros"
            raise FloatingPointError(f"{stage}: reconstruction loss became {what} at epoch {epoch + 1} (learning rate {lr:g})")
        callback.on_step(stage, epoch + 1, {"loss": epoch_loss})
        callback.on_checkpoint(stage, epoch + 1, lambda done=epoch + 1, loss=epoch_loss: LoopState(
            stage, done, loss, opt.state_dict(), _rng_state(x.device)))
    callback.on_stage_end(stage)
    return epoch_loss


def pretrain_end_to_end(ae: Autoencoder, x: torch.Tensor, *, callback: Callback, stage="pretrain", **opt) -> float:
    """Train the whole autoencoder at once on plain (uncorrupted) reconstruction.

    Parameters
    ----------
    ae : Autoencoder
    x : Tensor of shape (n_samples, n_features), already scaled
    callback : Callback
    **opt : epochs, batch_size, lr, momentum, lr_schedule, precision, transform, resume (a LoopState)

    Returns
    -------
    float, the mean reconstruction loss of the last epoch.
    """
    return _train_reconstruction(ae, x, stage=stage, callback=callback, **opt)


def pretrain_layerwise(ae: Autoencoder, x: torch.Tensor, *, dropout: float, callback: Callback,
                       resume: LoopState | None = None, **opt) -> list[float]:
    """Greedy layer-wise denoising pretraining (paper section 3.2), before end-to-end fine-tuning.

    Layer ``i`` is trained as a one-hidden-layer denoising autoencoder on the output of the already
    trained layers ``< i``: dropout corrupts its input and its hidden code, the encoder half uses
    ReLU except for the embedding layer, and the decoder half uses ReLU except when it reconstructs
    the data itself, mirroring the ReLU / linear choices of the final network. Trained weights are
    copied into ``ae`` in place.

    ``**opt`` are the options of :func:`pretrain_end_to_end` (``epochs`` counts per layer).
    ``resume`` continues a layer's stage (``ae`` holding the weights of that moment): the layers
    before it are taken as trained.

    Returns
    -------
    list of float, the last-epoch loss of each layer (NaN for layers finished before ``resume``).
    """
    enc, dec = ae.encoder_layers(), ae.decoder_layers()[::-1]  # dec[i] inverts enc[i]
    n_layers = len(enc)
    h = x
    losses = []
    for i in range(n_layers):
        last = i == n_layers - 1
        dae = nn.Sequential(
            nn.Dropout(dropout),
            enc[i],
            *([] if last else [nn.ReLU()]),
            nn.Dropout(dropout),
            dec[i],
            *([] if i == 0 else [nn.ReLU()]),
        )
        stage = f"pretrain/layer{i + 1}"
        if resume is None or resume.stage == stage:
            losses.append(_train_reconstruction(dae, h, stage=stage, callback=callback, resume=resume, **opt))
            resume = None
        else:  # finished before the checkpoint being resumed
            losses.append(float("nan"))
        if not last:
            trained = lambda b, layer=enc[i]: torch.relu(layer(b))  # noqa: E731
            with torch.no_grad():  # streamed data: the trained layers run again on each batch instead of being kept
                h = _batched(trained, h) if isinstance(h, torch.Tensor) else MappedRows(h, trained)
    return losses


def _batched(fn, x: torch.Tensor, batch_size: int = 4096, rows: slice | None = None) -> torch.Tensor:
    """Apply ``fn`` to ``x`` (or its ``rows``) in chunks without autograd (bounded memory for large data)."""
    return torch.cat([out for _, out in _chunks(fn, x, batch_size, rows)])


def embed(encoder: nn.Module, x: torch.Tensor, batch_size: int = 4096, rows: slice | None = None) -> torch.Tensor:
    """Embedding of ``x`` (n_samples, n_features) -> (n_samples, embedding_dim), in eval mode.

    ``rows`` (a slice) embeds only those rows, read chunk by chunk like the whole: ``x[rows]`` of a
    streamed ``x`` would read the block into memory at once.
    """
    encoder.eval()
    return _batched(encoder, x, batch_size, rows)


def reconstruction_error(ae: Autoencoder, x: torch.Tensor) -> float:
    """Mean squared reconstruction error of ``x`` (n_samples, n_features), in eval mode."""
    ae.eval()
    total = sum(float(nn.functional.mse_loss(r, x[s : s + len(r)], reduction="sum"))
                for s, r in _chunks(ae, x))
    return total / x.numel()


def _chunks(fn, x: torch.Tensor, batch_size: int = 4096, rows: slice | None = None):
    """Yield (start, fn(x[start:start + batch_size])) without autograd, over ``rows`` (default all)."""
    first, stop, _ = (rows or slice(None)).indices(x.shape[0])
    with torch.no_grad():
        for s in range(first, stop, batch_size):
            yield s, fn(x[s : min(s + batch_size, stop)])


def _batch_indices(n: int, batch_size: int):
    """Endless mini-batches: a fresh permutation each epoch, never a tiny trailing batch.

    Yields (this rank's indices, its share of the batch), see :func:`distributed.shard_batch`.
    """
    batch_size = min(batch_size, n)
    while True:
        perm = distributed.broadcast(torch.randperm(n))
        for start in range(0, n - batch_size + 1, batch_size):
            yield distributed.shard_batch(perm[start : start + batch_size])


def distill(
    encoder: nn.Module,
    centroids: nn.Parameter,
    x: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float,
    batch_size: int,
    lr: float,
    momentum: float,
    n_iter: int,
    callback: Callback,
    transform: Transform | None = None,
    smoothing: float = 0.0,
    one_cycle: bool = True,
) -> float:
    """Train encoder and centroids so that the soft assignments Q follow a fixed ``teacher``.

    Minimises KL(teacher || Q) with Q the Student's t assignment of eq. 1: the DEC objective with
    the target P replaced by the posteriors of another clustering (the manifold initialisation's),
    so the deployable encoder + centroid network learns a partition it could not find from k-means.
    The rate follows one cycle (:func:`one_cycle_lr`): a warm-up to ``lr`` over the first 15 % of
    the iterations, then a cosine decay to zero. ``encoder`` and ``centroids`` are updated in place.

    Parameters
    ----------
    teacher : Tensor of shape (n_samples, n_clusters), rows sum to 1
    lr : float, the peak rate of the cycle
    n_iter : int, SGD iterations
    one_cycle : bool
        The one-cycle schedule (default), else ``lr`` throughout.
    smoothing : float in [0, 1)
        The target is ``(1 - smoothing) * teacher + smoothing / n_clusters``: a teacher's confident
        mistakes are not learnt as certainties.

    Returns
    -------
    float, the KL over the last 50 batches (a progress figure, not a full-data loss).
    """
    if teacher.shape != (x.shape[0], centroids.shape[0]):
        raise ValueError(f"teacher must have shape (n_samples, n_clusters) = ({x.shape[0]}, {centroids.shape[0]}); "
                         f"got {tuple(teacher.shape)}")
    params = [*encoder.parameters(), centroids]
    distributed.broadcast_parameters(params)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)
    callback.on_stage_begin("distill", n_iter)
    encoder.train()
    recent: list[torch.Tensor] = []
    batches = _batch_indices(x.shape[0], batch_size)
    for it in range(1, n_iter + 1):
        for group in opt.param_groups:  # else constant
            group["lr"] = one_cycle_lr(it - 1, n_iter, lr) if one_cycle else lr
        idx, share = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=x.device)  # a rank with no row of this batch adds nothing
        if idx.numel():
            batch = x[idx] if transform is None else transform(x[idx])
            target = teacher[idx] if smoothing == 0 else (1.0 - smoothing) * teacher[idx] + smoothing / teacher.shape[1]
            loss = kl_divergence(target, soft_assignment(encoder(batch), centroids, alpha)) * share
            loss.backward()
        distributed.all_reduce_gradients(params)
        opt.step()
        recent = [*recent[-49:], loss.detach()]
        if it % 50 == 0 or it == n_iter:
            # each rank's share-weighted batch loss summed over ranks: the same figure on every rank
            value = float(distributed.all_reduce_sum(torch.stack(recent).mean()))
            _check_finite("distill", "KL(teacher || Q)", value, it, lr)
            callback.on_step("distill", it, {"kl_loss": value})
    callback.on_stage_end("distill")
    encoder.eval()
    return float(torch.stack(recent).mean()) if recent else float("nan")


WARMUP = 0.15  # share of a one-cycle schedule spent rising to the peak rate


def one_cycle_lr(it: int, n_iter: int, lr: float) -> float:
    """Rate of iteration ``it`` (0-based) of ``n_iter``: linear warm-up to ``lr`` over the first
    :data:`WARMUP` of them, then cosine decay towards 0 (Smith's one-cycle policy).

    A network distilled from its random start learns fastest at a large rate, which a pretrained one
    could not take, and settles only as the rate falls.
    """
    warm = max(1, int(WARMUP * n_iter))
    if it < warm:
        return lr * (it + 1) / warm
    return 0.5 * lr * (1.0 + math.cos(math.pi * (it - warm) / max(1, n_iter - warm)))


def _check_finite(stage: str, what: str, value: float, it: int, lr: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{stage}: {what} became {value} at iteration {it}; lower the learning rate (lr={lr})")


@dataclass
class SelfTrainResult:
    """Outcome of :func:`self_train`."""

    labels: np.ndarray  # (n_samples,) hard labels at the last target update
    n_iter: int  # SGD iterations run
    converged: bool  # True if the label change fell below tol before max_iter
    delta_label: float  # fraction of labels changed at the last update
    kl_loss: float  # KL(P || Q) over the whole data at the last update
    q: torch.Tensor  # (n_samples, n_clusters) soft assignments at the last update
    p: torch.Tensor  # (n_samples, n_clusters) target distribution at the last update


def self_train(
    encoder: nn.Module,
    centroids: nn.Parameter,
    x: torch.Tensor,
    *,
    alpha: float,
    batch_size: int,
    lr: float,
    momentum: float,
    update_interval: int,
    tol: float,
    max_iter: int,
    callback: Callback,
    min_iter: int = 0,
    train_encoder: bool = True,
    decoder: nn.Module | None = None,
    gamma: float = 0.1,
    transform: Transform | None = None,
) -> SelfTrainResult:
    """DEC self-training: minimise KL(P || Q) over encoder weights and centroids (paper section 3.1.2).

    Every ``update_interval`` iterations the target P is recomputed from Q over the WHOLE data set
    (the cluster frequencies f_j in eq. 3 are data-set totals); training stops when fewer than a
    fraction ``tol`` of hard labels changed since the previous update, once at least ``min_iter`` iterations
    have run (0: the paper's rule), or after ``max_iter``.
    ``encoder``, ``centroids`` (and ``decoder``) are updated in place. Under torchrun each rank
    computes Q on its block of rows, f_j, the KL and the count of changed labels are summed over
    ranks and P is gathered, so every rank has the P and stops at the iteration one process would.

    Variants
    --------
    train_encoder=False
        The paper's "DEC w/o backprop" (Table 3): the embedding is computed once and only the
        centroids move.
    decoder given
        IDEC (Guo et al., IJCAI 2017): the decoder is kept and trained too, and each step minimises
        ``L_r + gamma * KL`` with ``L_r`` the mean squared reconstruction error, so the clustering
        loss cannot distort the embedding freely.
    transform given
        DEC-DA (Guo et al., ACML 2018): P comes from the clean data, Q of each training step from
        the transformed (augmented) batch.

    Raises
    ------
    FloatingPointError
        When Q, P or the loss stop being finite.
    """
    if decoder is not None and not train_encoder:
        raise ValueError("IDEC (a decoder) needs train_encoder=True")
    n = x.shape[0]
    rows = distributed.rows(n)  # this rank's rows of the full passes (all rows in one process)
    if train_encoder:
        params = [*encoder.parameters(), centroids, *([] if decoder is None else decoder.parameters())]
        z_fixed = None
    else:
        params = [centroids]
        z_fixed = distributed.all_gather_rows(embed(encoder, x, rows=rows))  # (n, d); the encoder never changes
    distributed.broadcast_parameters(params)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)
    prev = None
    batches = _batch_indices(n, batch_size)
    it = 0
    callback.on_stage_begin("self_train", max_iter)
    while True:
        if it % update_interval == 0 or it >= max_iter:
            with torch.no_grad():
                z_rows = z_fixed[rows] if z_fixed is not None else embed(encoder, x, rows=rows)
                q_rows = soft_assignment(z_rows, centroids, alpha)  # (n_rows, k)
                frequencies = distributed.all_reduce_sum(q_rows.sum(0))  # f_j over the whole data set
                p_rows = target_distribution(q_rows, frequencies)
                kl = float(distributed.global_mean(kl_divergence(p_rows, q_rows), q_rows.shape[0], n))
                _check_finite("self_train", "KL(P || Q) over the data", kl, it, lr)
                labels_rows = q_rows.argmax(1)
                p_all = distributed.all_gather_rows(p_rows)  # (n, k): a batch may hold any row
                labels = distributed.all_gather_rows(labels_rows).cpu().numpy()
                changed = None if prev is None else int(distributed.all_reduce_sum((labels_rows != prev).sum()))
            delta = 1.0 if changed is None else changed / n
            prev = labels_rows
            metrics = {"kl_loss": kl, "delta_label": delta}
            callback.on_update(it, labels, metrics)
            callback.on_state(it, encoder, centroids)
            callback.on_step("self_train", it, metrics)
            converged = it > 0 and it >= min_iter and delta < tol
            if converged or it >= max_iter:
                break
            if z_fixed is None:
                encoder.train()
        idx, share = next(batches)
        opt.zero_grad(set_to_none=True)
        if idx.numel():  # a rank may get no row when the batch is smaller than the number of ranks
            if z_fixed is not None:
                z = z_fixed[idx]
                batch = None
            else:
                batch = x[idx] if transform is None else transform(x[idx])
                z = encoder(batch)
            loss = kl_divergence(p_all[idx], soft_assignment(z, centroids, alpha))
            if decoder is not None:
                loss = nn.functional.mse_loss(decoder(z), batch) + gamma * loss
            (loss * share).backward()
        distributed.all_reduce_gradients(params)
        opt.step()
        it += 1
    callback.on_stage_end("self_train")
    encoder.eval()
    return SelfTrainResult(labels=labels, n_iter=it, converged=converged, delta_label=delta, kl_loss=kl,
                           q=distributed.all_gather_rows(q_rows), p=p_all)


@dataclass
class Rounds:
    """Outcome of :func:`distill_and_self_train`: the trained network and the last round's self-training."""

    encoder: nn.Module
    centroids: nn.Parameter
    result: SelfTrainResult  # the last round's
    round_labels: list[np.ndarray]  # each round's final labels, (n_samples,) each
    n_iter: int  # self-training iterations over all rounds


def distill_and_self_train(
    encoder: nn.Module,
    centroids: nn.Parameter,
    x: torch.Tensor,
    posteriors: torch.Tensor | None,
    *,
    rounds: int,
    distill_options: dict,
    self_train_options: dict,
    fresh_student: Callable[[int], tuple[nn.Module, nn.Parameter]] | None = None,
) -> Rounds:
    """``fit``'s training stages: ``rounds`` rounds of distillation, each followed by self-training.

    The first round distils ``posteriors`` (n_samples, n_clusters), the initial clustering's soft
    labels; each further round the sharpened target P of the previous round's Q (computed on the clean
    data), into a network from ``fresh_student(round)`` when given, else into the same one. Without
    ``posteriors`` (nothing to distil: a k-means start, one cluster) one round of self-training alone.
    ``distill_options`` go to :func:`distill` (all but the teacher), ``self_train_options`` to
    :func:`self_train`; ``encoder`` and ``centroids`` are trained in place.
    """
    round_labels, n_iter, result = [], 0, None
    for round_ in range(rounds if posteriors is not None else 1):
        if posteriors is not None:
            teacher = posteriors if round_ == 0 else target_distribution(result.q.to(posteriors.device)).detach()
            if round_ > 0 and fresh_student is not None:
                encoder, centroids = fresh_student(round_)
            distill(encoder, centroids, x, teacher, **distill_options)
        result = self_train(encoder, centroids, x, **self_train_options)
        round_labels.append(result.labels)
        n_iter += result.n_iter
    return Rounds(encoder, centroids, result, round_labels, n_iter)
