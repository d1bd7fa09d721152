"""The paper's experiments as lifecycle stages: ``compare``, ``k_sweep`` and ``imbalance``.

Each is one parent MLflow run with a child run per method/seed, k or retention rate, so the UI
compares them side by side; the parent logs the table (MLflow table artifact and markdown) and
the curves. Computation lives in :mod:`dec_mlflow.experiments`; this module wires and logs. Each
stage takes parameters and returns a dict with the parent run id and its results; errors are as
in :mod:`dec_mlflow.lifecycle`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from numbers import Integral, Real

import mlflow
import numpy as np
import pandas as pd

from dec_mlflow import experiments, tracking
from dec_mlflow.callbacks import CallbackList
from dec_mlflow.data import Dataset
from dec_mlflow.estimator import DEC, map_k_scores
from dec_mlflow.lifecycle import (
    ESTIMATOR_PARAMS,
    build_estimator,
    check_fit_data,
    data_params,
    estimator_params,
    fmt_scores,
    load_data,
    log_k_choice,
    progress_bar,
    report,
    resolve_autoencoder,
)
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.pretraining import selection_criteria

# the estimator parameters every experiment shares with `cluster`, minus what the experiment varies
# (n_clusters='auto', with its range k_min..k_max, is cluster's, compare's (one k for every method and seed) and the
# estimator's: k_sweep and imbalance vary or fix k themselves)
_SHARED = tuple(n for n in ESTIMATOR_PARAMS if n not in ("variant", "n_pretrain_init", "pretrain_selection", "k_min", "k_max"))
COMPARE_PARAMS = tuple(n for n in ESTIMATOR_PARAMS if n in _SHARED + ("k_min", "k_max") and n != "random_state")  # seeds instead
K_SWEEP_PARAMS = tuple(n for n in _SHARED if n != "n_clusters")  # ks instead
IMBALANCE_PARAMS = _SHARED


def _check_distinct(name: str, values: Sequence, rule: str, ok) -> list:
    values = list(values)
    if not values or not all(ok(v) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{name} must be {rule}; got {','.join(map(str, values))!r}")
    return values


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _fixed_k(params: dict, stage: str) -> None:
    """Refuse n_clusters='auto' where every method is compared at one given k."""
    if params["n_clusters"] == "auto":
        raise ValueError(f"n_clusters='auto' is for cluster, compare and the estimator; {stage} compares its methods at a "
                         "given number of clusters (run cluster with n_clusters=auto first, then pass the k it logs "
                         "as n_clusters_resolved)")


def _start_parent(kind: str, data: Dataset, params: dict) -> None:
    mlflow.set_tags({tracking.STAGE_TAG: kind, "dataset": data.name})
    tracking.log_params_once({**params, **data_params(data)})


@contextmanager
def _child(run_name: str, tags: dict, params: dict) -> Iterator[mlflow.ActiveRun]:
    """A nested run tagged for the UI's comparison view."""
    with tracking.child_run(run_name) as run:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        tracking.log_params_once(params)
        yield run


def _log_frame(frame: pd.DataFrame, name: str) -> None:
    """A table as an MLflow table artifact (``<name>.json``, shown in the UI) and as CSV."""
    mlflow.log_table(frame, f"{name}.json")
    mlflow.log_text(frame.to_csv(index=False), f"{name}.csv")


# ------------------------------------------------------------------------------------ compare
def compare(dataset: str, *, label_column: str = "", seeds: Sequence[int] = (0, 1, 2),
            methods: Sequence[str] = tuple(experiments.METHODS), select_from: int = 2, idec_lr: float = 0.1,
            idec_momentum: float = 0.99, preset: str = "default", experiment: str = "", **params) -> dict:
    """The paper's comparison table: k-means, AE+k-means, DEC w/o backprop, DEC and IDEC over seeds.

    Reads the dataset; one child run per method and seed (plus a pretrain run per seed unless a
    matching one exists); the parent writes comparison.md, comparison_table.json/.csv (mean and
    std per method), comparison_runs.json/.csv (every method and seed), stability.json and
    selection_criteria.csv. ``select_from``: candidates per choice in the stability report;
    ``idec_lr`` / ``idec_momentum``: IDEC's optimiser; ``**params``: ``COMPARE_PARAMS``.

    Returns
    -------
    dict with ``run_id``, ``rows`` (a dict per method and seed), ``summary`` (DataFrame of mean and
    std per method, None without labels), ``stability`` and ``markdown`` ('' without labels).
    """
    params = estimator_params(params, COMPARE_PARAMS)
    auto_k = params["n_clusters"] == "auto"
    seeds = _check_distinct("seeds", seeds, "distinct integers >= 0", lambda s: _is_int(s) and s >= 0)
    methods = list(methods)
    if not methods or any(m not in experiments.METHODS for m in methods):
        raise ValueError(f"methods must be a comma-separated subset of {', '.join(experiments.METHODS)}; got {','.join(methods)!r}")
    if not 1 <= select_from <= len(seeds):
        raise ValueError(f"select_from must be >= 1 and <= the number of seeds ({len(seeds)}); got {select_from}")
    build_estimator({**params, "random_state": seeds[0], "lr": idec_lr, "momentum": idec_momentum}, preset=preset)  # IDEC's too
    build_estimator({**params, "random_state": seeds[0]}, preset=preset)
    data = load_data(dataset, label_column, None if auto_k else params["n_clusters"])
    check_fit_data(build_estimator({**params, "random_state": seeds[0]}, data, preset=preset), data, dataset)
    stage_params = {"dataset": dataset, "label_column": label_column, "preset": preset, **params}
    idec_optimizer = {"lr": idec_lr, "momentum": idec_momentum}
    with tracking.stage_run(f"compare-{data.name}", experiment) as run:
        _start_parent("compare", data, {**stage_params, "seeds": seeds, "methods": methods, "select_from": select_from,
                                        "idec_lr": idec_lr, "idec_momentum": idec_momentum})
        if auto_k:  # one k for every method and seed: what cluster with n_clusters=auto and the first seed chooses
            params = {**params, "n_clusters": _resolve_k(build_estimator({**params, "random_state": seeds[0]}, data, preset=preset), data)}
        rows, criteria = [], []
        data_params_ = data_params(data)
        for seed in seeds:
            est = build_estimator({**params, "random_state": seed}, data, preset=preset)
            # the paper's comparison needs a pretrained autoencoder (AE+k-means, DEC w/o backprop start from it)
            ae, source = resolve_autoencoder("", est, data, {**stage_params, "random_state": seed}, data_params_, required=True)
            criteria.append({"seed": seed, "autoencoder": source,
                             **selection_criteria(ae, data.x, est.n_clusters, n_init=est.n_init, seed=seed)})
            for method in methods:
                rows.append(_compare_one(method, seed, data, ae, est, source, idec_optimizer))
        result = _log_comparison(data, rows, criteria, select_from)
    return {"run_id": run.info.run_id, "rows": rows, **result}


def _resolve_k(est: DEC, data: Dataset) -> int:
    """n_clusters='auto' on ``data`` as ``cluster`` resolves it (the map of the default recipe's input), logged on the
    active run as ``cluster`` logs it: n_clusters_resolved, k_valley_depth (step = k) and k_selection.png."""
    k, depths = map_k_scores(est, data.x, est.k_min, est.k_max)
    report(log_k_choice(k, depths, est.k_min, est.k_max))
    return k


def _compare_one(method: str, seed: int, data: Dataset, ae, est: DEC, source: str, idec_optimizer: dict) -> dict:
    overrides = idec_optimizer if method == "idec" else {}
    params = {"method": method, "seed": seed, "dataset": data.name, "autoencoder": source, **est.get_params(), **overrides}
    with _child(f"{method}-s{seed}", {tracking.STAGE_TAG: "compare/method", "method": method, "seed": seed, "dataset": data.name}, params):
        recorder = tracking.self_training_recorder(data.x, data.y, ae, alpha=est.alpha, sample_size=1000, seed=seed)
        with progress_bar() as bar:
            callback = CallbackList([bar, tracking.MlflowCallback(est.n_clusters, data.y), recorder])
            result = experiments.run_method(method, data.x, ae, est, callback=callback, overrides=overrides)
        tracking.log_self_training_figures(recorder, tol=est.tol, seed=seed)
        row = experiments.scored_rows(data.y, method, seed, result)
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k not in ("method", "seed")})
        mlflow.log_dict({"cluster_sizes": np.bincount(result.labels, minlength=est.n_clusters).tolist()}, "cluster_sizes.json")
    if data.y is not None:
        report(f"seed {seed} {experiments.METHODS[method]:<18} {fmt_scores({s: row[s] for s in ('acc', 'nmi', 'ari')})}  ({result.seconds:.0f} s)")
    return row


def _log_comparison(data: Dataset, rows: list[dict], criteria: list[dict], select_from: int) -> dict:
    runs = pd.DataFrame(rows)
    _log_frame(runs, "comparison_runs")
    per_seed = pd.DataFrame(criteria).set_index("seed")
    summary, stability, markdown = None, {}, ""
    main_method = "dec" if "dec" in set(runs["method"]) else runs["method"].iloc[-1]
    choice = experiments.run_choice(rows, main_method)
    if choice:
        mlflow.log_dict(choice, "run_choice.json")
        mlflow.log_metrics({k: float(v) for k, v in choice.items() if k != "method"})
        report(experiments.choice_markdown(choice).strip())
    if data.y is not None:
        summary = experiments.summarize(rows)
        _log_frame(summary, "comparison_table")
        for _, r in summary.iterrows():
            mlflow.log_metrics({f"{r['method']}_{s}_{stat}": float(r[f"{s}_{stat}"]) for s in ("acc", "nmi", "ari") for stat in ("mean", "std")})
        per_seed = per_seed.join(runs[runs["method"] == main_method].set_index("seed")[["acc"]])
        stability = experiments.stability_report(per_seed, select_from, method=main_method)
        mlflow.log_dict(stability, "stability.json")
        markdown = experiments.comparison_markdown(data.name, summary, stability, per_seed)
        markdown += "\n## Which run to keep\n\n" + experiments.choice_markdown(choice)
        mlflow.log_text(markdown, "comparison.md")
    mlflow.log_text(per_seed.reset_index().to_csv(index=False), "selection_criteria.csv")
    return {"summary": summary, "stability": stability, "markdown": markdown, "choice": choice}


# ------------------------------------------------------------------------------------ k sweep
def k_sweep(dataset: str, *, label_column: str = "", ks: Sequence[int] = (6, 7, 8, 9, 10, 11, 12),
            validation_fraction: float = 0.2, autoencoder: str = "", preset: str = "default", experiment: str = "",
            **params) -> dict:
    """Choose k by n_clusters='auto''s criterion, next to the paper's generalizability G (section 5.3, Figure 5).

    Splits the dataset into training and validation parts (seeded by ``random_state``), pretrains
    once on the training part (or uses ``autoencoder``), fits DEC for every k (a child run each)
    and logs per k: KL on both parts, G and, with labels, NMI and ACC on the validation part; the
    parent logs the curves (step = k), k_sweep.png, the table k_sweep.json/.csv and the metric
    recommended_k: what ``n_clusters='auto'`` chooses in min(ks)..max(ks), by top-down cuts of the UMAP map
    along density valleys (``map_valley_depth``: the depth of the k-th cut), with the paper's (the k before G's largest drop) as
    recommended_k_generalizability. ``**params``: ``K_SWEEP_PARAMS``.

    Returns
    -------
    dict with ``run_id``, ``table`` (DataFrame, a row per k) and ``recommended_k``.
    """
    from dec_mlflow import plots  # matplotlib: import on use

    params = estimator_params(params, K_SWEEP_PARAMS)
    ks = _check_distinct("ks", ks, "distinct integers >= 2", lambda k: _is_int(k) and k >= 2)
    experiments.train_validation_split(10, validation_fraction, 0)  # validates the fraction before any work
    build_estimator({**params, "n_clusters": max(ks)}, preset=preset)
    data = load_data(dataset, label_column, max(ks))
    train, val = experiments.train_validation_split(data.x.shape[0], validation_fraction, params["random_state"])
    train_data = replace(data, name=f"{data.name}-train", x=data.x[train], y=None if data.y is None else data.y[train])
    check_fit_data(build_estimator({**params, "n_clusters": max(ks)}, data, preset=preset), train_data, dataset)
    stage_params = {"dataset": dataset, "label_column": label_column, "preset": preset, **params}
    with tracking.stage_run(f"k_sweep-{data.name}", experiment) as run:
        _start_parent("k_sweep", data, {**stage_params, "ks": ks, "validation_fraction": validation_fraction,
                                        "autoencoder": autoencoder})
        est = build_estimator({**params, "n_clusters": ks[0]}, data, preset=preset)
        ae, source = resolve_autoencoder(autoencoder, est, train_data, stage_params, data_params(train_data))
        mlflow.set_tag("dec.autoencoder_source", source)
        # n_clusters='auto''s choice on the same training part and autoencoder, and the depth of each cut
        best, depths = map_k_scores(est, train_data.x, min(ks), max(ks), autoencoder=ae)
        rows = []
        for k in sorted(ks):
            est = build_estimator({**params, "n_clusters": k}, data, preset=preset)
            with _child(f"k{k}", {tracking.STAGE_TAG: "k_sweep/k", "n_clusters": k, "dataset": data.name}, {**est.get_params(), "autoencoder": source}):
                with progress_bar() as bar:
                    est.fit(train_data.x, autoencoder=ae, callback=CallbackList([bar, tracking.MlflowCallback(k, train_data.y)]))
                row = {"k": k, **experiments.generalizability(est, train_data.x, data.x[val]), "n_iter": est.n_iter_,
                       "map_valley_depth": depths.get(k, float("nan"))}
                if data.y is not None:
                    row.update({f"val_{n}": v for n, v in clustering_scores(data.y[val], est.predict(data.x[val])).items()})
                mlflow.log_metrics({n: float(v) for n, v in row.items() if n != "k"})
            mlflow.log_metrics({n: float(v) for n, v in row.items() if n != "k"}, step=k)
            rows.append(row)
            report("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in row.items()))
        table = pd.DataFrame(rows)
        by_g = recommended_by_generalizability(table)
        mlflow.log_metrics({"recommended_k": best, "recommended_k_generalizability": by_g})
        _log_frame(table, "k_sweep")
        tracking.log_figure("k_sweep.png", lambda: plots.k_sweep_figure(table, best))
    return {"run_id": run.info.run_id, "table": table, "recommended_k": best}


def recommended_by_generalizability(table: pd.DataFrame) -> int:
    """The paper's choice in a k_sweep table: the k before G's largest drop."""
    return experiments.recommend_k(table["k"].tolist(), table["generalizability"].tolist())


# ------------------------------------------------------------------------------------ imbalance
def imbalance(dataset: str, *, label_column: str = "", r_mins: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
              autoencoder: str = "", preset: str = "default", experiment: str = "", **params) -> dict:
    """The paper's Table 4: k-means, AE+k-means and DEC on subsamples with skewed class sizes.

    For each r_min, class c of the (labelled) dataset keeps a share r_min + (1 - r_min) c / (C - 1)
    of its samples (seeded by random_state); a child run per r_min logs each method's ACC/NMI/ARI
    and the class sizes, pretraining on the subsample unless ``autoencoder`` is given; the parent
    logs the curves (step = round(100 r_min)), imbalance.png and imbalance.json/.csv/.md with the
    paper's Table 4 next to ours. ``**params``: ``IMBALANCE_PARAMS``.

    Returns
    -------
    dict with ``run_id``, ``table`` (DataFrame, a row per r_min and method) and ``markdown``.
    """
    from dec_mlflow import plots  # matplotlib: import on use

    params = estimator_params(params, IMBALANCE_PARAMS)
    _fixed_k(params, "imbalance")
    r_mins = _check_distinct("r_mins", r_mins, "distinct numbers > 0 and <= 1", lambda r: isinstance(r, Real) and not isinstance(r, bool) and 0 < r <= 1)
    build_estimator(params, preset=preset)
    data = load_data(dataset, label_column, params["n_clusters"])
    if data.y is None:
        raise ValueError(f"dataset {dataset!r} has no labels; the subsampling is by class (give label_column)")
    check_fit_data(build_estimator(params, data, preset=preset), data, dataset)
    stage_params = {"dataset": dataset, "label_column": label_column, "preset": preset, **params}
    with tracking.stage_run(f"imbalance-{data.name}", experiment) as run:
        _start_parent("imbalance", data, {**stage_params, "r_mins": r_mins, "autoencoder": autoencoder})
        est = build_estimator(params, data, preset=preset)
        shared_ae = resolve_autoencoder(autoencoder, est, data, stage_params, data_params(data)) if autoencoder else None
        rows = []
        for r in sorted(r_mins):
            rows.extend(_imbalance_one(r, data, est, stage_params, shared_ae))
        table = pd.DataFrame(rows)
        markdown = experiments.imbalance_markdown(table)
        _log_frame(table, "imbalance")
        mlflow.log_text(markdown, "imbalance.md")
        tracking.log_figure("imbalance.png", lambda: plots.imbalance_figure(table))
    return {"run_id": run.info.run_id, "table": table, "markdown": markdown}


def _imbalance_one(r: float, data: Dataset, est: DEC, stage_params: dict, shared_ae) -> list[dict]:
    idx = experiments.imbalanced_subsample(data.y, r, est.random_state)
    sub = replace(data, name=f"{data.name}-rmin{r:g}", x=data.x[idx], y=data.y[idx])
    sizes = np.bincount(np.unique(sub.y, return_inverse=True)[1]).tolist()
    with _child(f"rmin{r:g}", {tracking.STAGE_TAG: "imbalance/r_min", "r_min": r, "dataset": data.name},
                {"r_min": r, "n_samples": len(idx), **est.get_params()}):
        ae, source = shared_ae if shared_ae else resolve_autoencoder("", est, sub, stage_params, data_params(sub))
        mlflow.set_tag("dec.autoencoder_source", source)
        mlflow.log_dict({"class_sizes": sizes}, "class_sizes.json")
        out = []
        for method in ("kmeans", "ae_kmeans", "dec"):
            with progress_bar() as bar:
                callback = CallbackList([bar, tracking.MlflowCallback(est.n_clusters, sub.y)]) if method == "dec" else None
                result = experiments.run_method(method, sub.x, ae, est, callback=callback)
            row = {"r_min": r, "n_samples": len(idx), **experiments.scored_rows(sub.y, method, est.random_state, result)}
            mlflow.log_metrics({f"{method}_{s}": row[s] for s in ("acc", "nmi", "ari")})
            out.append(row)
            report(f"r_min {r:g} ({len(idx)} samples) {experiments.METHODS[method]:<12} ACC {row['acc']:.4f}")
    step = int(round(100 * r))
    mlflow.log_metrics({f"{row['method']}_acc": row["acc"] for row in out}, step=step)
    return out
