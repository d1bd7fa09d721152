"""Entry points that reproduce the paper's experiments: ``compare``, ``k_sweep`` and ``imbalance``.

Each is one parent MLflow run with a child run per method/seed, k or retention rate, so the UI
compares them side by side; the parent logs the table (MLflow table artifact and markdown) and
the curves. Computation lives in :mod:`dec_mlflow.experiments`; this module only wires and logs.
"""

from __future__ import annotations

import click
import mlflow
import numpy as np
import pandas as pd

from dec_mlflow import experiments, tracking
from dec_mlflow.callbacks import CallbackList, ProgressBar
from dec_mlflow.cli import (
    ESTIMATOR_OPTIONS,
    _build,
    _data_options,
    _data_params,
    _estimator_options,
    _load,
    _user_errors,
    main,
    resolve_autoencoder,
)
from dec_mlflow.data import Dataset
from dec_mlflow.estimator import DEC, selection_criteria
from dec_mlflow.metrics import clustering_scores

# the options every experiment shares with `cluster`, minus what the experiment itself varies
_SHARED = tuple(n for n in ESTIMATOR_OPTIONS if n not in ("variant", "n_pretrain_init", "pretrain_selection"))


def _int_list(name: str, value: str, low: int) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers; got {value!r}", param_hint=name) from None
    if not items or min(items) < low or len(set(items)) != len(items):
        raise click.BadParameter(f"must be distinct integers >= {low}; got {value!r}", param_hint=name)
    return items


def _float_list(name: str, value: str, low: float, high: float) -> list[float]:
    try:
        items = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated numbers; got {value!r}", param_hint=name) from None
    if not items or not all(low < v <= high for v in items) or len(set(items)) != len(items):
        raise click.BadParameter(f"must be distinct numbers > {low} and <= {high}; got {value!r}", param_hint=name)
    return items


def _start_parent(kind: str, data: Dataset, params: dict) -> str:
    run_name = f"{kind}-{data.name}"
    mlflow.set_tags({"mlflow.runName": run_name, tracking.STAGE_TAG: kind, "dataset": data.name})
    tracking.log_params_once({**params, **_data_params(data)})
    return run_name


def _child(run_name: str, tags: dict, params: dict):
    """A nested run tagged for the UI's comparison view."""
    run = mlflow.start_run(run_name=run_name, nested=True)
    mlflow.set_tags({"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items()}})
    tracking.log_params_once(params)
    return run


def _callback(est: DEC, y) -> CallbackList:
    return CallbackList([ProgressBar(), tracking.MlflowCallback(est.n_clusters, y)])


def _log_frame(frame: pd.DataFrame, name: str) -> None:
    """A table as an MLflow table artifact (``<name>.json``, shown in the UI) and as CSV."""
    mlflow.log_table(frame, f"{name}.json")
    mlflow.log_text(frame.to_csv(index=False), f"{name}.csv")


# ------------------------------------------------------------------------------------ compare
@main.command()
@_data_options
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; each pretrains (or reuses) its own autoencoder.")
@click.option("--methods", default=",".join(experiments.METHODS), show_default=True, help="Comma-separated subset of the methods.")
@click.option("--select_from", type=click.IntRange(min=1), default=2, show_default=True,
              help="Candidates per choice in the stability report: the spread of DEC when the autoencoder is picked among this many seeds by each label-free criterion.")
@click.option("--idec_lr", type=click.FLOAT, default=0.1, show_default=True, help="IDEC's SGD learning rate (IDEC paper: 0.1).")
@click.option("--idec_momentum", type=click.FLOAT, default=0.99, show_default=True, help="IDEC's SGD momentum (IDEC paper: 0.99).")
@_estimator_options(tuple(n for n in _SHARED if n != "random_state"))
@_user_errors
def compare(dataset, label_column, seeds, methods, select_from, idec_lr, idec_momentum, **params):
    """The paper's comparison table: k-means, AE+k-means, DEC w/o backprop, DEC and IDEC over seeds.

    Reads DATASET; one child run per method and seed (plus a pretrain run per seed unless a
    matching one exists); the parent writes comparison.md, comparison_table.json/.csv (mean and
    std per method), comparison_runs.json/.csv (every method and seed) and stability.json.
    """
    seed_list = _int_list("seeds", seeds, 0)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in method_list if m not in experiments.METHODS]
    if unknown or not method_list:
        raise click.BadParameter(f"must be a comma-separated subset of {', '.join(experiments.METHODS)}; got {methods!r}", param_hint="methods")
    if select_from > len(seed_list):
        raise click.BadParameter(f"must be <= the number of seeds ({len(seed_list)}); got {select_from}", param_hint="select_from")
    params["random_state"] = seed_list[0]
    _build({**params, "lr": idec_lr, "momentum": idec_momentum})  # the IDEC optimiser must be valid too
    _build(params)
    data = _load(dataset, label_column, params["n_clusters"])
    cli_params = {"dataset": dataset, "label_column": label_column, **{k: v for k, v in params.items() if k != "random_state"}}
    with mlflow.start_run(run_name=f"compare-{data.name}"):
        _start_parent("compare", data, {**cli_params, "seeds": seeds, "methods": methods, "select_from": select_from,
                                        "idec_lr": idec_lr, "idec_momentum": idec_momentum})
        rows, criteria = [], []
        for seed in seed_list:
            est = _build({**params, "random_state": seed}, data.default_scaling)
            ae, source = resolve_autoencoder("", est, data, {**cli_params, "random_state": seed}, _data_params(data))
            criteria.append({"seed": seed, "autoencoder": source,
                             **selection_criteria(ae, data.x, est.n_clusters, n_init=est.n_init, seed=seed)})
            for method in method_list:
                rows.append(_compare_one(method, seed, data, ae, est, source, {"lr": idec_lr, "momentum": idec_momentum}))
        _log_comparison(data, rows, criteria, select_from)


def _compare_one(method: str, seed: int, data: Dataset, ae, est: DEC, source: str, idec_optimizer: dict) -> dict:
    overrides = idec_optimizer if method == "idec" else {}
    params = {"method": method, "seed": seed, "dataset": data.name, "autoencoder": source, **est.get_params(), **overrides}
    with _child(f"{method}-s{seed}", {tracking.STAGE_TAG: "compare/method", "method": method, "seed": seed, "dataset": data.name}, params):
        recorder = tracking.self_training_recorder(data.x, data.y, ae, alpha=est.alpha, sample_size=1000, seed=seed)
        result = experiments.run_method(method, data.x, ae, est, callback=CallbackList([_callback(est, data.y), recorder]),
                                        overrides=overrides)
        tracking.log_self_training_figures(recorder, tol=est.tol, seed=seed)
        row = experiments.scored_rows(data.y, method, seed, result)
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k not in ("method", "seed")})
        mlflow.log_dict({"cluster_sizes": np.bincount(result.labels, minlength=est.n_clusters).tolist()}, "cluster_sizes.json")
    if data.y is not None:
        click.echo(f"seed {seed} {experiments.METHODS[method]:<18} ACC {row['acc']:.4f}  NMI {row['nmi']:.4f}  ARI {row['ari']:.4f}  ({result.seconds:.0f} s)")
    return row


def _log_comparison(data: Dataset, rows: list[dict], criteria: list[dict], select_from: int) -> None:
    runs = pd.DataFrame(rows)
    _log_frame(runs, "comparison_runs")
    per_seed = pd.DataFrame(criteria).set_index("seed")
    stability = {}
    if data.y is not None:
        summary = experiments.summarize(rows)
        _log_frame(summary, "comparison_table")
        for _, r in summary.iterrows():
            mlflow.log_metrics({f"{r['method']}_{s}_{stat}": float(r[f"{s}_{stat}"]) for s in ("acc", "nmi", "ari") for stat in ("mean", "std")})
        main_method = "dec" if "dec" in set(runs["method"]) else runs["method"].iloc[-1]
        per_seed = per_seed.join(runs[runs["method"] == main_method].set_index("seed")[["acc"]])
        stability = experiments.stability_report(per_seed, select_from, method=main_method)
        mlflow.log_dict(stability, "stability.json")
        markdown = experiments.comparison_markdown(data.name, summary, stability, per_seed)
        mlflow.log_text(markdown, "comparison.md")
        click.echo(markdown)
    mlflow.log_text(per_seed.reset_index().to_csv(index=False), "selection_criteria.csv")


# ------------------------------------------------------------------------------------ k sweep
@main.command(name="k_sweep")
@_data_options
@click.option("--ks", default="6,7,8,9,10,11,12", show_default=True, help="Comma-separated numbers of clusters to try.")
@click.option("--validation_fraction", type=click.FLOAT, default=0.2, show_default=True, help="Share of the data held out to measure KL_validation.")
@click.option("--autoencoder", default="", help="Pretrained autoencoder (run id, URI or .pt); default: pretrain on the training split (or reuse a matching run).")
@_estimator_options(tuple(n for n in _SHARED if n != "n_clusters"))
@_user_errors
def k_sweep(dataset, label_column, ks, validation_fraction, autoencoder, **params):
    """Choose k by the paper's generalizability G = KL_train / KL_validation (section 5.3, Figure 5).

    Splits DATASET into training and validation parts, pretrains once on the training part, fits
    DEC for every k (a child run each) and logs per k: KL on both parts, G and, with labels, NMI
    and ACC on the validation part; the parent logs the curves (step = k), k_sweep.png, the
    table k_sweep.json/.csv and the metric recommended_k (the k before G's largest drop).
    """
    from dec_mlflow import plots

    k_list = _int_list("ks", ks, 2)
    experiments.train_validation_split(10, validation_fraction, 0)  # validates the fraction before any work
    _build({**params, "n_clusters": max(k_list)})
    data = _load(dataset, label_column, max(k_list))
    train, val = experiments.train_validation_split(len(data.x), validation_fraction, params["random_state"])
    train_data = Dataset(f"{data.name}-train", data.x[train], None if data.y is None else data.y[train], data.image_shape, data.default_scaling)
    with mlflow.start_run(run_name=f"k_sweep-{data.name}"):
        _start_parent("k_sweep", data, {"dataset": dataset, "label_column": label_column, "ks": ks,
                                        "validation_fraction": validation_fraction, "autoencoder": autoencoder, **params})
        est = _build({**params, "n_clusters": k_list[0]}, data.default_scaling)
        ae, source = resolve_autoencoder(autoencoder, est, train_data, {"dataset": dataset, "label_column": label_column, **params}, _data_params(train_data))
        mlflow.set_tag("dec.autoencoder_source", source)
        rows = []
        for k in sorted(k_list):
            est = _build({**params, "n_clusters": k}, data.default_scaling)
            with _child(f"k{k}", {tracking.STAGE_TAG: "k_sweep/k", "n_clusters": k, "dataset": data.name}, {**est.get_params(), "autoencoder": source}):
                est.fit(train_data.x, autoencoder=ae, callback=_callback(est, train_data.y))
                row = {"k": k, **experiments.generalizability(est, train_data.x, data.x[val]), "n_iter": est.n_iter_}
                if data.y is not None:
                    row.update({f"val_{n}": v for n, v in clustering_scores(data.y[val], est.predict(data.x[val])).items()})
                mlflow.log_metrics({n: float(v) for n, v in row.items() if n != "k"})
            mlflow.log_metrics({n: float(v) for n, v in row.items() if n != "k"}, step=k)
            rows.append(row)
            click.echo("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in row.items()))
        table = pd.DataFrame(rows)
        best = experiments.recommend_k(table["k"].tolist(), table["generalizability"].tolist())
        mlflow.log_metric("recommended_k", best)
        _log_frame(table, "k_sweep")
        mlflow.log_figure(plots.k_sweep_figure(table, best), "k_sweep.png")
        click.echo(f"Recommended k = {best} (the k before the largest drop of G)")


# ------------------------------------------------------------------------------------ imbalance
@main.command()
@_data_options
@click.option("--r_mins", default="0.1,0.3,0.5,0.7,0.9", show_default=True, help="Comma-separated retention rates of the first class (the last keeps 1).")
@click.option("--autoencoder", default="", help="Pretrained autoencoder for every subsample (run id, URI or .pt); default: pretrain on each subsample (or reuse a matching run).")
@_estimator_options(_SHARED)
@_user_errors
def imbalance(dataset, label_column, r_mins, autoencoder, **params):
    """The paper's Table 4: k-means, AE+k-means and DEC on subsamples with skewed class sizes.

    For each r_min, class c of DATASET keeps a share r_min + (1 - r_min) c / (C - 1) of its
    samples (seeded by random_state); a child run per r_min logs each method's ACC/NMI/ARI and
    the class sizes; the parent logs the curves (step = round(100 r_min)), imbalance.png and
    imbalance.json/.csv/.md with the paper's Table 4 next to ours.
    """
    from dec_mlflow import plots

    r_list = _float_list("r_mins", r_mins, 0.0, 1.0)
    _build(params)
    data = _load(dataset, label_column, params["n_clusters"])
    if data.y is None:
        raise click.BadParameter(f"dataset {dataset!r} has no labels; the subsampling is by class (give --label_column)", param_hint="dataset")
    cli_params = {"dataset": dataset, "label_column": label_column, **params}
    with mlflow.start_run(run_name=f"imbalance-{data.name}"):
        _start_parent("imbalance", data, {**cli_params, "r_mins": r_mins, "autoencoder": autoencoder})
        shared_ae = resolve_autoencoder(autoencoder, _build(params, data.default_scaling), data, cli_params, _data_params(data)) if autoencoder else None
        rows = []
        for r in sorted(r_list):
            rows.extend(_imbalance_one(r, data, params, cli_params, shared_ae))
        table = pd.DataFrame(rows)
        _log_frame(table, "imbalance")
        mlflow.log_text(experiments.imbalance_markdown(table), "imbalance.md")
        mlflow.log_figure(plots.imbalance_figure(table), "imbalance.png")
        click.echo(experiments.imbalance_markdown(table))


def _imbalance_one(r: float, data: Dataset, params: dict, cli_params: dict, shared_ae) -> list[dict]:
    idx = experiments.imbalanced_subsample(data.y, r, params["random_state"])
    sub = Dataset(f"{data.name}-rmin{r:g}", data.x[idx], data.y[idx], data.image_shape, data.default_scaling)
    est = _build(params, data.default_scaling)
    sizes = np.bincount(np.unique(sub.y, return_inverse=True)[1]).tolist()
    with _child(f"rmin{r:g}", {tracking.STAGE_TAG: "imbalance/r_min", "r_min": r, "dataset": data.name},
                {"r_min": r, "n_samples": len(idx), **est.get_params()}):
        ae, source = shared_ae if shared_ae else resolve_autoencoder("", est, sub, cli_params, _data_params(sub))
        mlflow.set_tag("dec.autoencoder_source", source)
        mlflow.log_dict({"class_sizes": sizes}, "class_sizes.json")
        out = []
        for method in ("kmeans", "ae_kmeans", "dec"):
            result = experiments.run_method(method, sub.x, ae, est, callback=_callback(est, sub.y) if method == "dec" else None)
            row = {"r_min": r, "n_samples": len(idx), **experiments.scored_rows(sub.y, method, params["random_state"], result)}
            mlflow.log_metrics({f"{method}_{s}": row[s] for s in ("acc", "nmi", "ari")})
            out.append(row)
            click.echo(f"r_min {r:g} ({len(idx)} samples) {experiments.METHODS[method]:<12} ACC {row['acc']:.4f}")
    step = int(round(100 * r))
    mlflow.log_metrics({f"{row['method']}_acc": row["acc"] for row in out}, step=step)
    return out
