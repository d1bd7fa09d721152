"""Everything MLflow: stage runs and experiments, metrics callback, run reuse, datasets,
autoencoder artifacts, model registry.

The estimator and training loops never import mlflow; the lifecycle stages wire them to this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dec_mlflow.callbacks import Callback, SelfTrainRecorder
from dec_mlflow.checkpoint import load_tensors, save_tensors
from dec_mlflow.data import Dataset
from dec_mlflow.estimator import PretrainedAutoencoder
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.model import DECNet

AUTOENCODER_ARTIFACT = "autoencoder/autoencoder.pt"
NETWORK_ARTIFACT = "network/dec_network.pt"  # the trained DECNet, for re-export without retraining
STAGE_TAG = "dec.stage"  # which step of the lifecycle a run is: pretrain, cluster, evaluate, export
KEY_TAG = "dec.pretrain_key"  # fingerprint of data content + pretraining settings, for reuse
MAX_CLUSTER_METRICS = 50  # above this many clusters, per-cluster size metrics would swamp the UI
LAUNCHER_TAG = "dec.launcher_run"  # on a run started elsewhere than the `mlflow run` run: that run's id
LAUNCHED_TAG = "dec.launched_run"  # on such an `mlflow run` run: the id of the run that holds the results
# tags of an `mlflow run` run that say where the code came from; copied when the work moves to another run
_SOURCE_TAG_PREFIXES = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")


@contextmanager
def stage_run(run_name: str, experiment: str = "") -> Iterator[mlflow.ActiveRun]:
    """The run of one lifecycle stage: the run ``mlflow run`` started for it, else a new one.

    ``experiment`` names the experiment (created if missing); '' leaves the choice to MLflow: the
    experiment of the run ``mlflow run`` started (its ``--experiment-name``), else
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``, else Default. ``mlflow run`` creates its
    run before the command sees ``-P experiment``; when that run is in another experiment, the
    stage starts a new run in ``experiment`` (tagged ``dec.launcher_run``, with the project's source
    tags) and the ``mlflow run`` run is left as a launcher tagged ``dec.launched_run``.
    The run ends FAILED if the block raises, FINISHED otherwise.
    """
    experiment_id, tags = None, {}
    if experiment:
        experiment_id = _experiment_id(experiment)
        launcher_id = MLFLOW_RUN_ID.get()
        launcher = MlflowClient().get_run(launcher_id) if launcher_id else None
        if launcher is not None and launcher.info.experiment_id != experiment_id:
            del os.environ[MLFLOW_RUN_ID.name]  # start a new run instead of resuming that one
            tags = {k: v for k, v in launcher.data.tags.items() if k.startswith(_SOURCE_TAG_PREFIXES)}
            tags[LAUNCHER_TAG] = launcher_id
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags or None) as run:
        mlflow.set_tag("mlflow.runName", run_name)  # start_run ignores run_name when resuming an `mlflow run` run
        if LAUNCHER_TAG in tags:
            MlflowClient().set_tag(tags[LAUNCHER_TAG], LAUNCHED_TAG, run.info.run_id)
            MlflowClient().set_tag(tags[LAUNCHER_TAG], "mlflow.note.content",
                                   f"This run only launched run {run.info.run_id} ({run_name}) in experiment "
                                   f"{experiment!r} (-P experiment); its results are there. "
                                   f"`mlflow run --experiment-name {experiment}` would have started it there directly.")
        yield run


@contextmanager
def child_run(run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A run nested in the active run, in the same experiment (start_run alone would use the default one)."""
    experiment_id = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=run_name, nested=True, experiment_id=experiment_id) as run:
        mlflow.set_tag("mlflow.runName", run_name)
        yield run


def _experiment_id(name: str) -> str:
    """Id of the experiment called ``name``, created if it does not exist."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name)
    if found.lifecycle_stage != "active":
        raise ValueError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or choose another name")
    return found.experiment_id


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

    def on_retry(self, stage, attempt, message):
        mlflow.log_metric(f"{stage.replace('/', '_')}_restarts", attempt)
        mlflow.set_tag(f"dec.{stage.replace('/', '_')}_restart_{attempt}", message[:5000])

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


def log_dataset(data: Dataset, digest: str, context: str) -> None:
    """Log ``data`` as an input of the active run (the UI's Datasets panel): name, digest, source, schema.

    ``digest`` is the content hash also logged as the ``data_digest`` parameter; ``context`` says
    what the run did with it ('training', 'evaluation', 'validation').
    """
    with warnings.catch_warnings():
        # a local path matches the two LocalArtifactDatasetSource registrations ('' and 'file'); either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_numpy(data.x, targets=data.y, name=data.name, digest=digest,
                                         source=data.source or None)
    mlflow.log_input(dataset, context=context)


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
        settings = {k: v for k, v in network.checkpoint().items() if k != "state_dict"}
        save_tensors(path, network.state_dict(), settings)  # tensors + JSON: loading runs no code
        mlflow.log_artifact(str(path), artifact_path=str(Path(NETWORK_ARTIFACT).parent))


def load_network(run_id: str) -> DECNet:
    """The DEC network a ``cluster`` run saved."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=NETWORK_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"run_id {run_id!r} has no {NETWORK_ARTIFACT} (is it a cluster run?): {e.message.splitlines()[0]}") from e
    tensors, settings = load_tensors(local)  # refuses a file that needs pickle code execution
    try:
        return DECNet.from_checkpoint({**settings, "state_dict": tensors})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"run_id {run_id!r}: {NETWORK_ARTIFACT} is not a DEC network checkpoint: {str(e).splitlines()[0]}") from None


def set_model_version_tags(name: str, version: str, tags: dict[str, object]) -> None:
    """Tag a registered model version (the UI's version page shows them; searches can filter on them)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def describe_model(name: str, version: str, *, model_description: str, version_description: str) -> None:
    """Set a registered version's description, and the registered model's when it has none yet."""
    client = MlflowClient()
    client.update_model_version(name, version, description=version_description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description)


def load_pyfunc(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The DEC model at ``uri``, run by the installed serving code: nothing stored with the model is
    executed (``serving.loading``); ValueError naming the URI when it cannot be loaded."""
    from serving.loading import load_dec_model  # onnxruntime: import on use

    return load_dec_model(uri)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run ``run_id``."""
    return dict(MlflowClient().get_run(run_id).data.metrics)


def _model_versions(name: str) -> list:
    """Every registered version of model ``name``; ValueError if there is none."""
    try:
        escaped = name.replace("'", "\\'")  # the filter string quotes the name
        versions = MlflowClient().search_model_versions(f"name = '{escaped}'")
    except MlflowException as e:
        raise ValueError(f"model_name {name!r}: {e.message.splitlines()[0]}") from e
    if not versions:
        raise ValueError(f"model_name {name!r} has no registered versions")
    return versions


def _version_metrics(versions, metric: str) -> list[tuple[float, int]]:
    """(value, version) of each version whose source run logged a finite ``metric``."""
    client = MlflowClient()
    scored = []
    for v in versions:
        value = client.get_run(v.run_id).data.metrics.get(metric) if v.run_id else None
        if value is not None and np.isfinite(value):
            scored.append((value, int(v.version)))
    return scored


def every_version_has_metric(name: str, metric: str) -> bool:
    """True when the source run of every registered version of ``name`` logged ``metric``."""
    versions = _model_versions(name)
    return len(_version_metrics(versions, metric)) == len(versions)


def promote(name: str, metric: str, *, greater_is_better: bool = True, alias: str = "champion") -> dict:
    """Point ``alias`` at the version of registered model ``name`` with the best ``metric``.

    The metric is read from each version's source run. Returns a dict with the chosen version,
    the metric, its value and the version the alias named before (or None).

    Raises
    ------
    ValueError if the model does not exist or no version's run logged ``metric``.
    """
    client = MlflowClient()
    scored = _version_metrics(_model_versions(name), metric)
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
