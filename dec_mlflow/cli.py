"""Entry points: ``pretrain``, ``cluster``, ``evaluate``, ``export`` and ``promote``.

Each command is one MLflow run (``MLproject`` maps its parameters one to one onto these options).
Parameters are checked before any work starts; a failure ends the run as FAILED with a one-line
``Error: ...`` instead of a traceback.
"""

from __future__ import annotations

import functools

import click
import mlflow
import numpy as np
from sklearn.base import clone

from dec_mlflow.callbacks import CallbackList, ProgressBar
from dec_mlflow.data import Dataset, load_dataset
from dec_mlflow.estimator import (
    DEC,
    LR_SCHEDULES,
    PRECISIONS,
    PRETRAIN_MODES,
    SCALINGS,
    SELECTIONS,
    VARIANTS,
    selection_criteria,
)
from dec_mlflow.metrics import clustering_scores
from dec_mlflow import tracking

DEFAULTS = DEC().get_params()

# name -> (click type, help). Defaults come from the estimator: one source of hyperparameters.
ESTIMATOR_OPTIONS = {
    "n_clusters": (click.INT, "Number of clusters k."),
    "hidden_dims": (str, "Encoder widths after the input, comma-separated; the last is the embedding size."),
    "scaling": (click.Choice(("auto", *SCALINGS)), "Input scaling; 'auto' = 'max' for images (pixels/max), else 'standard'."),
    "pretrain_mode": (click.Choice(PRETRAIN_MODES), "'end_to_end', or the paper's greedy 'layerwise' denoising then fine-tuning."),
    "pretrain_epochs": (click.INT, "End-to-end pretraining epochs (fine-tuning epochs in layerwise mode)."),
    "layerwise_epochs": (click.INT, "Epochs per layer in layerwise mode."),
    "pretrain_batch_size": (click.INT, "Pretraining batch size."),
    "pretrain_lr": (click.FLOAT, "Pretraining SGD learning rate."),
    "pretrain_momentum": (click.FLOAT, "Pretraining SGD momentum."),
    "pretrain_lr_schedule": (click.Choice(LR_SCHEDULES), "Pretraining learning-rate schedule."),
    "dropout": (click.FLOAT, "Corruption (dropout) rate of the layerwise denoising stage."),
    "precision": (click.Choice(PRECISIONS), "Pretraining matmul precision; 'auto' = bf16 where the CPU has it natively."),
    "n_pretrain_init": (click.INT, "Autoencoders to pretrain (seeds random_state, +1, ...); the best by pretrain_selection is kept."),
    "pretrain_selection": (click.Choice(SELECTIONS), "Label-free criterion among pretrained candidates (lower is better)."),
    "n_init": (click.INT, "k-means restarts for the initial centroids."),
    "alpha": (click.FLOAT, "Student's t degrees of freedom."),
    "batch_size": (click.INT, "Self-training batch size."),
    "lr": (click.FLOAT, "Self-training SGD learning rate."),
    "momentum": (click.FLOAT, "Self-training SGD momentum."),
    "update_interval": (click.INT, "Iterations between target-distribution updates over the whole data."),
    "tol": (click.FLOAT, "Stop when fewer than this fraction of labels change between updates."),
    "max_iter": (click.INT, "Maximum self-training iterations."),
    "variant": (click.Choice(VARIANTS), "'dec'; 'frozen' (encoder fixed, centroids only: DEC w/o backprop); 'idec' (keeps the decoder)."),
    "gamma": (click.FLOAT, "IDEC: weight of the KL term beside the reconstruction loss."),
    "random_state": (click.INT, "Seed of all randomness (weights, batches, k-means)."),
    "device": (str, "'auto' (CUDA if available), 'cpu', or a torch device such as 'cuda:0'."),
}
PRETRAIN_PARAMS = (
    "hidden_dims", "scaling", "pretrain_mode", "pretrain_epochs", "layerwise_epochs", "pretrain_batch_size",
    "pretrain_lr", "pretrain_momentum", "pretrain_lr_schedule", "dropout", "precision", "random_state",
)


def _estimator_options(names):
    def decorate(fn):
        for name in reversed(names):
            ctype, help_ = ESTIMATOR_OPTIONS[name]
            default = DEFAULTS[name]
            if name == "hidden_dims":
                default = ",".join(map(str, default))
            elif name == "scaling":
                default = "auto"
            fn = click.option(f"--{name}", type=ctype, default=default, show_default=True, help=help_)(fn)
        return fn
    return decorate


def _data_options(fn):
    fn = click.option("--label_column", default="", help="Label column of a .csv/.parquet file (or key of a .npz); labels are only used for metrics.")(fn)
    return click.option("--dataset", required=True, help="'mnist', or a path to a .npy/.npz/.csv/.parquet file.")(fn)


def _user_errors(fn):
    """Turn user-facing errors into ``Error: ...`` and exit status 1 (the MLflow run is then FAILED)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:  # DataError and parameter errors; both name what is wrong
            raise click.ClickException(str(e)) from e
    return wrapper


def _parse_dims(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers such as 500,500,2000,10; got {value!r}", param_hint="hidden_dims") from None
    return dims


def _build(params: dict, default_scaling: str = "standard") -> DEC:
    """The estimator for these CLI params, 'auto' scaling resolved to ``default_scaling``, validated.

    Called once before the data is loaded, so parameter errors come before any work, and again
    with the dataset's own default scaling.
    """
    params = {**params, "hidden_dims": _parse_dims(params["hidden_dims"])}
    if params.get("scaling") == "auto":
        params["scaling"] = default_scaling
    est = DEC().set_params(**params)
    est.validate_params()
    return est


def _load(dataset: str, label_column: str, n_clusters: int | None = None) -> Dataset:
    return load_dataset(dataset, label_column=label_column or None, n_clusters=n_clusters)


def _pretrain_key(est: DEC, data_params: dict) -> str:
    """Fingerprint of what decides a pretrained autoencoder: data content plus pretraining settings."""
    params = est.get_params()
    return tracking.fingerprint({"data_digest": data_params["data_digest"], **{k: params[k] for k in PRETRAIN_PARAMS}})


def _data_params(data: Dataset) -> dict:
    """What identifies the data of a run, logged as params (the digest is a hash of the features)."""
    return {"dataset_name": data.name, "data_digest": tracking.data_digest(data.x),
            "n_samples": data.x.shape[0], "n_features": data.x.shape[1]}


def _run_pretraining(est: DEC, data: Dataset, cli_params: dict, data_params: dict):
    """Pretrain inside the active run and log params, loss curve and the autoencoder artifact."""
    mlflow.set_tags({tracking.STAGE_TAG: "pretrain", tracking.KEY_TAG: _pretrain_key(est, data_params), "dataset": data.name,
                     "method": f"pretrain-{est.pretrain_mode}", "seed": est.random_state})
    tracking.log_params_once({**cli_params, **data_params, "scaling_resolved": est.scaling})
    ae = est.pretrain(data.x, callback=CallbackList([ProgressBar(), tracking.MlflowCallback(est.n_clusters)]))
    mlflow.log_metric("final_pretrain_loss", ae.loss)
    tracking.log_autoencoder(ae)
    return ae


@click.group()
def main():
    """Deep Embedded Clustering with MLflow tracking and ONNX serving."""


@main.command()
@_data_options
@_estimator_options(PRETRAIN_PARAMS + ("device",))
@_user_errors
def pretrain(dataset, label_column, **params):
    """Pretrain the autoencoder. Reads DATASET; writes the run artifact autoencoder/autoencoder.pt."""
    _build(params)
    data = _load(dataset, label_column)
    est = _build(params, data.default_scaling)
    run_name = f"pretrain-{data.name}-s{est.random_state}"
    with mlflow.start_run(run_name=run_name):
        mlflow.set_tag("mlflow.runName", run_name)  # start_run ignores run_name when resuming an `mlflow run` run
        _run_pretraining(est, data, {"dataset": dataset, "label_column": label_column, **params}, _data_params(data))


@main.command()
@_data_options
@click.option("--autoencoder", default="", help="Pretrained autoencoder: a run id, runs:/ or models:/ URI, or a .pt file. Default: reuse a matching FINISHED pretrain run, else pretrain now.")
@click.option("--registered_model_name", default="", help="Registry name; default dec-<dataset>. 'none' skips registration.")
@click.option("--figure_sample_size", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Points recorded for the self-training figures (t-SNE snapshots, gradient vs q).")
@_estimator_options(tuple(ESTIMATOR_OPTIONS))
@_user_errors
def cluster(dataset, label_column, autoencoder, registered_model_name, figure_sample_size, **params):
    """The main job: pretrain or reuse an autoencoder, k-means init, DEC self-training, log and register.

    Reads DATASET; writes run artifacts network/dec_network.pt, cluster_sizes.json and the ONNX
    pyfunc model ``model``, registered as dec-<dataset>; a child run if it had to pretrain.
    """
    _build(params)
    data = _load(dataset, label_column, params["n_clusters"])
    est = _build(params, data.default_scaling)
    name = registered_model_name or f"dec-{data.name}"
    run_name = f"cluster-{data.name}-k{est.n_clusters}-s{est.random_state}"
    with mlflow.start_run(run_name=run_name):
        mlflow.set_tags({"mlflow.runName": run_name, tracking.STAGE_TAG: "cluster", "dataset": data.name,
                         "method": "dec", "seed": est.random_state})
        cli_params = {"dataset": dataset, "label_column": label_column, **params}
        data_params = _data_params(data)
        tracking.log_params_once({**cli_params, "autoencoder": autoencoder, "registered_model_name": registered_model_name,
                                  "figure_sample_size": figure_sample_size,
                                  **data_params, "scaling_resolved": est.scaling})
        if autoencoder or est.n_pretrain_init == 1:
            ae, source = resolve_autoencoder(autoencoder, est, data, cli_params, data_params)
        else:
            ae, source = select_autoencoder(est, data, cli_params, data_params)
        mlflow.set_tag("dec.autoencoder_source", source)
        recorder = tracking.self_training_recorder(data.x, data.y, ae, alpha=est.alpha, sample_size=figure_sample_size, seed=est.random_state)
        callback = CallbackList([ProgressBar(), tracking.MlflowCallback(est.n_clusters, data.y), recorder])
        est.fit(data.x, autoencoder=ae, callback=callback)
        tracking.log_self_training_figures(recorder, tol=est.tol, seed=est.random_state)
        scores = _log_cluster_results(est, data)
        tracking.log_network(est.network_)
        _log_model(est.network_, data, name, {f"final_{k}": f"{v:.4f}" for k, v in scores.items()})


def _log_model(network, data: Dataset, name: str, tags: dict) -> None:
    """Export to ONNX, verify, log as the pyfunc model ``model`` and register it (unless name is 'none')."""
    from serving.model_io import log_dec_model  # onnx / onnxruntime are heavy: import on use

    register = name.lower() != "none"
    run_id = mlflow.active_run().info.run_id
    tags = {"dataset": data.name, "source_run": run_id, **tags}
    # logs the ONNX parity figures as metrics of the run and of the logged model
    info, check = log_dec_model(network, data.x[:2000], name="model", registered_model_name=name if register else None, tags=tags)
    message = f"Logged model {info.model_uri} (ONNX max |dq| {check['onnx_max_abs_dq']:.1e})"
    if register:
        tracking.set_model_version_tags(name, info.registered_model_version, tags)
        message += f", registered as {name} version {info.registered_model_version}"
    click.echo(message)


def resolve_autoencoder(ref: str, est: DEC, data: Dataset, cli_params: dict, data_params: dict):
    """The autoencoder named by ``ref``, else a matching finished pretrain run's, else a new child run's.

    Returns (autoencoder, source) with source the ref or the ``runs:/`` URI of the pretrain run.
    """
    if ref:
        return tracking.load_autoencoder(ref), ref
    previous = tracking.find_finished_run("pretrain", _pretrain_key(est, data_params))
    if previous is not None:
        click.echo(f"Reusing autoencoder of FINISHED pretrain run {previous.info.run_id}", err=True)
        return tracking.load_autoencoder(previous.info.run_id), f"runs:/{previous.info.run_id}"
    with mlflow.start_run(run_name=f"pretrain-{data.name}-s{est.random_state}", nested=True) as child:
        pretrain_cli = {k: v for k, v in cli_params.items() if k in PRETRAIN_PARAMS + ("dataset", "label_column", "device")}
        pretrain_cli["random_state"] = est.random_state
        ae = _run_pretraining(est, data, pretrain_cli, data_params)
    return ae, f"runs:/{child.info.run_id}"


def select_autoencoder(est: DEC, data: Dataset, cli_params: dict, data_params: dict):
    """``n_pretrain_init`` candidates (each its own reusable pretrain run); keep the best, label-free.

    Sets ``est.random_state`` to the kept candidate's seed, so the fit that follows is the one
    ``DEC(n_pretrain_init=...).fit`` would make. Logs each candidate's criteria as metrics.
    """
    best = None
    for seed in range(est.random_state, est.random_state + est.n_pretrain_init):
        candidate = clone(est).set_params(random_state=seed)
        ae, source = resolve_autoencoder("", candidate, data, cli_params, data_params)
        criteria = selection_criteria(ae, data.x, est.n_clusters, n_init=est.n_init, seed=seed)
        mlflow.log_metrics({f"candidate_{name}": v for name, v in criteria.items()}, step=seed)
        if best is None or criteria[est.pretrain_selection] < best[0]:
            best = (criteria[est.pretrain_selection], seed, ae, source)
    _, seed, ae, source = best
    click.echo(f"Kept the autoencoder of seed {seed} (lowest {est.pretrain_selection})", err=True)
    mlflow.log_metric("selected_seed", seed)
    est.set_params(random_state=seed)
    return ae, source


def _log_cluster_results(est: DEC, data: Dataset) -> dict:
    """Log sizes, iterations and, with labels, the AE+k-means and final scores; return the final scores."""
    sizes = np.bincount(est.labels_, minlength=est.n_clusters)
    mlflow.log_dict({"cluster_sizes": sizes.tolist()}, "cluster_sizes.json")
    mlflow.log_metrics({"n_iter": est.n_iter_, "converged": float(est.converged_), "pretrain_loss": est.pretrain_loss_})
    if data.y is None:
        return {}
    final = clustering_scores(data.y, est.labels_)
    init = clustering_scores(data.y, est.init_labels_)
    mlflow.log_metrics({**{f"final_{k}": v for k, v in final.items()}, **{f"ae_kmeans_{k}": v for k, v in init.items()}})
    click.echo("AE+k-means " + _fmt(init) + "\nDEC        " + _fmt(final))
    return final


def _fmt(scores: dict) -> str:
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in scores.items())


@main.command()
@click.option("--model", required=True, help="A models:/ URI, runs:/<id>/model, or a cluster run id.")
@_data_options
@click.option("--sample_size", type=click.IntRange(min=10), default=2000, show_default=True, help="Points in the t-SNE embedding plot.")
@click.option("--random_state", type=click.INT, default=0, show_default=True, help="Seed of the plot subsample and t-SNE.")
@_user_errors
def evaluate(model, dataset, label_column, sample_size, random_state):
    """Score a model on a labelled dataset: ACC/NMI/ARI, confusion matrix, sizes, embedding, top images."""
    from dec_mlflow import plots

    data = _load(dataset, label_column)
    if data.y is None:
        raise click.BadParameter(f"dataset {dataset!r} has no labels; give --label_column or an .npz with y", param_hint="dataset")
    uri = model if ":/" in model else f"runs:/{model}/model"
    pyfunc = _load_pyfunc(uri)
    with mlflow.start_run(run_name=f"evaluate-{data.name}"):
        mlflow.set_tags({"mlflow.runName": f"evaluate-{data.name}", tracking.STAGE_TAG: "evaluate",
                         "dataset": data.name, "model_uri": uri})
        tracking.log_params_once({"model": model, "dataset": dataset, "label_column": label_column,
                                  "sample_size": sample_size, "random_state": random_state, **_data_params(data)})
        # the served signature is a float64 tensor (what JSON numbers parse to); MLflow checks dtype exactly
        out = pyfunc.predict(data.x.astype(np.float64), params={"include_embedding": True})
        labels = out["label"].to_numpy()
        q = out.filter(regex=r"^q_\d+$").to_numpy()
        z = out.filter(regex=r"^z_\d+$").to_numpy()
        scores = clustering_scores(data.y, labels)
        mlflow.log_metrics(scores)
        mlflow.log_dict({"cluster_sizes": np.bincount(labels, minlength=q.shape[1]).tolist()}, "cluster_sizes.json")
        mlflow.log_figure(plots.confusion_figure(data.y, labels), "confusion_matrix.png")
        mlflow.log_figure(plots.cluster_sizes_figure(labels, q.shape[1]), "cluster_sizes.png")
        rng = np.random.default_rng(random_state)
        sub = rng.choice(len(labels), size=min(sample_size, len(labels)), replace=False)
        mlflow.log_figure(plots.embedding_figure(z[sub], labels[sub], random_state=random_state), "embedding_tsne.png")
        if data.image_shape is not None:
            mlflow.log_figure(plots.top_images_figure(data.x, q, data.image_shape), "top_images_per_cluster.png")
        click.echo(_fmt(scores))


def _load_pyfunc(uri: str):
    try:
        return mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as e:
        raise click.BadParameter(f"model {uri!r} could not be loaded: {e.message.splitlines()[0]}", param_hint="model") from e


@main.command()
@click.option("--run_id", required=True, help="A FINISHED cluster run whose network/dec_network.pt to export.")
@_data_options
@click.option("--registered_model_name", default="", help="Registry name; default dec-<dataset>. 'none' skips registration.")
@_user_errors
def export(run_id, dataset, label_column, registered_model_name):
    """Re-export a cluster run's network to ONNX, verify it on DATASET, log and register it as a new run."""
    network = tracking.load_network(run_id)
    data = _load(dataset, label_column)
    if data.x.shape[1] != network.offset.shape[0]:
        raise click.BadParameter(f"dataset {dataset!r} has {data.x.shape[1]} features; the model expects {network.offset.shape[0]}", param_hint="dataset")
    name = registered_model_name or f"dec-{data.name}"
    with mlflow.start_run(run_name=f"export-{data.name}"):
        mlflow.set_tags({"mlflow.runName": f"export-{data.name}", tracking.STAGE_TAG: "export", "dataset": data.name,
                         "dec.network_source": f"runs:/{run_id}"})
        tracking.log_params_once({"run_id": run_id, "dataset": dataset, "label_column": label_column,
                                  "registered_model_name": registered_model_name, **_data_params(data)})
        _log_model(network, data, name, {"network_run": run_id})


@main.command()
@click.option("--model_name", required=True, help="Registered model name, e.g. dec-mnist.")
@click.option("--metric", default="final_acc", show_default=True, help="Metric of each version's source run to rank by.")
@click.option("--mode", type=click.Choice(["max", "min"]), default="max", show_default=True, help="Whether larger metric values are better.")
@click.option("--alias", default="champion", show_default=True, help="Alias to point at the best version.")
@_user_errors
def promote(model_name, metric, mode, alias):
    """Point ALIAS (default champion) at the registered version with the best METRIC."""
    result = tracking.promote(model_name, metric, greater_is_better=mode == "max", alias=alias)
    before = f"(was version {result['previous']})" if result["previous"] else "(no previous holder)"
    click.echo(f"{model_name}@{alias} -> version {result['version']}, {metric}={result['value']:.4f} {before}")


from dec_mlflow import cli_experiments  # noqa: E402,F401  (registers compare, k_sweep, imbalance on main)

if __name__ == "__main__":
    # run as `python -m dec_mlflow.cli`, this file is __main__ while cli_experiments registered its
    # commands on the group of the importable module dec_mlflow.cli: use that group
    from dec_mlflow.cli import main as registered_main

    registered_main()
