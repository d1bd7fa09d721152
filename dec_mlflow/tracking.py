"""Everything MLflow: metrics callback, run reuse, autoencoder artifacts, model registry.

The estimator and training loops never import mlflow; the CLI wires them to this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dec_mlflow.callbacks import Callback, SelfTrainRecorder
from dec_mlflow.estimator import PretrainedAutoencoder
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.model import DECNet

AUTOENCODER_ARTIFACT = "autoencoder/autoencoder.pt"
NETWORK_ARTIFACT = "network/dec_network.pt"  # the trained DECNet, for re-export without retraining
STAGE_TAG = "dec.stage"  # which step of the lifecycle a run is: pretrain, cluster, evaluate, export
KEY_TAG = "dec.pretrain_key"  # fingerprint of data content + pretraining settings, for reuse
MAX_CLUSTER_METRICS = 50  # above this many clusters, per-cluster size metrics would swamp the UI


class MlflowCallback(Callback):
    """Logs training progress to the active MLflow run, with steps so the UI draws curves.

    Pretraining: ``pretrain_loss`` (end to end), ``pretrain_layer<i>_loss`` and ``finetune_loss``
    per epoch. Self-training, at every target update: ``kl_loss``, ``delta_label``, cluster size
    fractions and, when ``y_true`` is given, ``acc``, ``nmi`` and ``ari``.
    """

    def __init__(self, n_clusters: int, y_true: np.ndarray | None = None):
        self.n_clusters = n_clusters
        self.y_true = y_true

    def on_step(self, stage, step, metrics):
        if not stage.startswith("pretrain"):
            return
        name = {"pretrain": "pretrain_loss", "pretrain/finetune": "finetune_loss"}.get(
            stage, stage.replace("/", "_") + "_loss"
        )
        mlflow.log_metric(name, metrics["loss"], step=step)

    def on_update(self, step, labels, metrics):
        mlflow.log_metrics({**metrics, **cluster_size_metrics(labels, self.n_clusters)}, step=step)
        if self.y_true is not None:
            mlflow.log_metrics(clustering_scores(self.y_true, labels), step=step)


def cluster_size_metrics(labels: np.ndarray, n_clusters: int) -> dict[str, float]:
    """Fraction of samples per cluster (``cluster_<j>_frac``), plus the smallest and largest."""
    frac = np.bincount(labels, minlength=n_clusters) / max(len(labels), 1)
    out = {"cluster_frac_min": float(frac.min()), "cluster_frac_max": float(frac.max())}
    if n_clusters <= MAX_CLUSTER_METRICS:
        out.update({f"cluster_{j}_frac": float(f) for j, f in enumerate(frac)})
    return out


def data_digest(x: np.ndarray) -> str:
    """Short content hash of a feature matrix, so runs on the same data match whatever its path."""
    h = hashlib.sha1(str((x.shape, x.dtype.str)).encode())
    h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()[:16]


def fingerprint(values: dict[str, object]) -> str:
    """Order-independent hash of a dict of settings, for matching runs that did the same work."""
    canonical = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, sort_keys=True)
    return hashlib.sha1(canonical.encode()).hexdigest()[:16]


def find_finished_run(stage: str, key: str) -> Run | None:
    """Newest FINISHED run of ``stage`` in the current experiment tagged with fingerprint ``key``."""
    query = f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
    runs = MlflowClient().search_runs(
        [_current_experiment_id()], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def log_params_once(params: dict[str, object]) -> None:
    """Log ``params`` to the active run, skipping keys already there.

    ``mlflow run`` logs the MLproject parameters itself, as the strings it was given; MLflow refuses
    to change a logged value, so those keep their spelling and only the rest is added.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v
                       for k, v in params.items() if k not in existing})


def _current_experiment_id() -> str:
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or mlflow.get_experiment_by_name("Default").experiment_id


def log_autoencoder(pretrained: PretrainedAutoencoder) -> None:
    """Save the pretrained autoencoder checkpoint as an artifact of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(AUTOENCODER_ARTIFACT).name
        pretrained.save(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(AUTOENCODER_ARTIFACT).parent))


def load_autoencoder(ref: str) -> PretrainedAutoencoder:
    """Load a pretrained autoencoder from a checkpoint path, a run id, or an artifact URI.

    Accepted: a local ``.pt`` file; a run id (its ``autoencoder/autoencoder.pt``); ``runs:/<id>``
    or any artifact URI naming the checkpoint or a folder that holds ``autoencoder.pt``.
    """
    if Path(ref).is_file():
        return PretrainedAutoencoder.load(ref)
    try:
        if ":/" in ref:  # runs:/..., models:/..., s3://..., file:///...
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        else:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=AUTOENCODER_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"autoencoder {ref!r} could not be loaded: {e.message.splitlines()[0]}") from e
    local_path = Path(local)
    if local_path.is_dir():
        found = sorted(local_path.rglob(Path(AUTOENCODER_ARTIFACT).name))
        if not found:
            raise ValueError(f"autoencoder {ref!r}: no {Path(AUTOENCODER_ARTIFACT).name} under that URI")
        local_path = found[0]
    return PretrainedAutoencoder.load(local_path)


def log_network(network: DECNet) -> None:
    """Save the trained DEC network checkpoint as an artifact of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(NETWORK_ARTIFACT).name
        torch.save(network.checkpoint(), path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(NETWORK_ARTIFACT).parent))


def load_network(run_id: str) -> DECNet:
    """The DEC network a ``cluster`` run saved."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=NETWORK_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"run_id {run_id!r} has no {NETWORK_ARTIFACT} (is it a cluster run?): {e.message.splitlines()[0]}") from e
    return DECNet.from_checkpoint(torch.load(local, map_location="cpu", weights_only=False))


def set_model_version_tags(name: str, version: str, tags: dict[str, object]) -> None:
    """Tag a registered model version (the UI's version page shows them; searches can filter on them)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def promote(name: str, metric: str, *, greater_is_better: bool = True, alias: str = "champion") -> dict:
    """Point ``alias`` at the version of registered model ``name`` with the best ``metric``.

    The metric is read from each version's source run. Returns a dict with the chosen version,
    its metric value and the version the alias named before (or None).

    Raises
    ------
    ValueError if the model does not exist or no version's run logged ``metric``.
    """
    client = MlflowClient()
    try:
        escaped = name.replace("'", "\\'")  # the filter string quotes the name
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException as e:
        raise ValueError(f"model_name {name!r}: {e.message.splitlines()[0]}") from e
    if not versions:
        raise ValueError(f"model_name {name!r} has no registered versions")
    scored = []
    for v in versions:
        value = client.get_run(v.run_id).data.metrics.get(metric) if v.run_id else None
        if value is not None and np.isfinite(value):
            scored.append((value, int(v.version)))
    if not scored:
        raise ValueError(f"metric {metric!r} was not logged by any run behind model {name!r}")
    value, version = (max if greater_is_better else min)(scored)
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, str(version))
    return {"version": str(version), "metric": metric, "value": value, "previous": previous}


def self_training_recorder(x: np.ndarray, y: np.ndarray | None, pretrained: PretrainedAutoencoder, *,
                           alpha: float, sample_size: int, seed: int) -> SelfTrainRecorder:
    """A recorder of ``sample_size`` random points of raw ``x``, scaled as the encoder sees them."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(sample_size, len(x)), replace=False))
    x_sub = torch.from_numpy((x[idx] - pretrained.offset) * pretrained.scale)
    return SelfTrainRecorder(x_sub, None if y is None else y[idx], y_full=y, alpha=alpha)


def log_self_training_figures(recorder: SelfTrainRecorder, *, tol: float, seed: int) -> None:
    """The paper's self-training figures, as artifacts of the active run.

    ``self_training_tsne.png`` (t-SNE of the subsample at 4 points of self-training, Figure 5),
    ``self_training_curves.png`` (label change, KL and accuracy per update) and
    ``gradient_vs_q.png`` (|dL/dz_i| against q_ij at the start, Figure 4).
    """
    from dec_mlflow import plots  # matplotlib and t-SNE: import on use

    if not recorder.snapshots:
        return
    mlflow.log_figure(plots.embedding_snapshots_figure(recorder.snapshots, recorder.y, random_state=seed), "self_training_tsne.png")
    mlflow.log_figure(plots.self_training_curves_figure(recorder.history, tol=tol), "self_training_curves.png")
    mlflow.log_figure(plots.gradient_vs_q_figure(recorder.gradient["q"], recorder.gradient["grad_norm"]), "gradient_vs_q.png")
