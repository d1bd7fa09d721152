"""Clustering quality across data kinds: the default, the best preset and the UMAP + GMM baseline, per dataset and seed.

    DEC_DATA_DIR=../shared/data python bench/bench_quality.py run --datasets digits wine --recipes default baseline --seeds 0 1 2
    python bench/bench_quality.py report

`run` fits each (dataset, recipe, seed) and appends one JSON line per fit to bench/out/quality.jsonl (so
long runs can go in several processes); `report` writes the table and a summary against the baseline to
BENCHMARKS.md. Recipes:

- default: the estimator exactly as `cluster` configures it with every parameter at its default;
- best: `preset=best`;
- baseline: UMAP + GMM of the raw features with fixed settings (bench/baseline.py), what a
  practitioner tries first;
- paper: `preset=paper` (a pretrained autoencoder, k-means start, no distillation), from an autoencoder
  cached in bench/out/ae/ (its pretraining minutes are added).

minutes: wall time of the fit (for paper: plus the recorded pretraining), one fit at a time unless the
report's note says otherwise.

`read-back --commit REF` turns the table "Every run" of BENCHMARKS.md as it stands into rows of
bench/out/quality.jsonl marked ``recorded`` (their machine: "recorded at REF"), for a checkout whose results file
is gone: a later `run` of some rows replaces those, and `report` keeps the others.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as skdata

from _report import StageTimer, latest_rows, machine, write_section
from dec_mlflow import DEC
from baseline import umap_gmm
from dec_mlflow.estimator import TRUST_SCORE, PretrainedAutoencoder
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.presets import PRESETS, preset_params
from dec_mlflow.training import embed

OUT = Path(__file__).resolve().parent / "out"
RESULTS = OUT / "quality.jsonl"
IMAGE_SHAPES = {"mnist": (28, 28), "mnist_test": (28, 28), "mnist6": (28, 28), "digits": (8, 8)}
RECIPES = ("default", "best", "baseline", "paper")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 raw features, y) of a benchmark dataset."""
    if name in ("mnist", "mnist_test"):
        from dec_mlflow.data import load_dataset

        data = load_dataset("mnist")
        return (data.x, data.y) if name == "mnist" else (data.x[60000:], data.y[60000:])
    if name == "mnist6":  # the MNIST test split restricted to the digits 0 to 5 (6,031 images, six groups)
        from dec_mlflow.data import load_dataset

        data = load_dataset("mnist")
        keep = data.y[60000:] < 6
        return data.x[60000:][keep], data.y[60000:][keep]
    if name == "blobs":  # 8 Gaussian clusters in 100 dimensions, overlapping at cluster_std 4
        x, y = skdata.make_blobs(5000, n_features=100, centers=8, cluster_std=4.0, random_state=0)
        return x.astype(np.float32), y
    from dec_mlflow.data import load_dataset  # scikit-learn's bundled digits, wine, breast_cancer, iris

    data = load_dataset(name)
    return data.x, data.y



def recipe_params(recipe: str, dataset: str) -> dict:
    """Estimator parameters of a recipe on a dataset, as `cluster` would set them (the dataset's image shape)."""
    return {**preset_params(recipe), "image_shape": IMAGE_SHAPES.get(dataset, "auto")}


def pretrained(est: DEC, x: np.ndarray, dataset: str, seed: int, timer: StageTimer) -> tuple[PretrainedAutoencoder, float]:
    """The autoencoder for these settings: from bench/out/ae/ if an earlier fit made it, else pretrained now and kept there."""
    keys = ("scaling", "pretrain_epochs", "pretrain_lr", "precision", "hidden_dims")
    tag = "-".join(f"{k}={est.get_params()[k]}" for k in keys).replace(" ", "").replace("/", "")
    path = OUT / "ae" / f"{dataset}-s{seed}-{tag}-augment=False.pt"
    if path.exists():
        return PretrainedAutoencoder.load(path), float(json.loads(path.with_suffix(".json").read_text())["seconds"])
    start = time.perf_counter()
    ae = est.pretrain(x, timer, seed=seed)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    ae.save(path)
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    return ae, seconds


def cached_autoencoder(tag: str) -> tuple[str, int, PretrainedAutoencoder]:
    """(dataset, seed, autoencoder) for ``tag`` = dataset-s<seed>: the autoencoder `run` pretrained and kept in
    bench/out/ae/ (default pretraining, no augmentation)."""
    dataset, seed = tag.rsplit("-s", 1)
    seed = int(seed)
    paths = sorted(glob.glob(str(OUT / "ae" / f"{dataset}-s{seed}-*augment=False*.pt")))
    if not paths:
        raise SystemExit(f"no autoencoder for {tag} in {OUT / 'ae'}: run bench/bench_quality.py run --datasets {dataset} "
                         f"--recipes paper --seeds {seed} first")
    return dataset, seed, PretrainedAutoencoder.load(paths[0])


def cached_embedding(tag: str) -> tuple[int, np.ndarray, int, np.ndarray]:
    """(seed, y, k, z) for ``tag`` = dataset-s<seed>: the embedding of the whole dataset by its cached autoencoder."""
    dataset, seed, ae = cached_autoencoder(tag)
    x, y = load(dataset)
    z = embed(ae.autoencoder.encoder, torch.from_numpy((x - ae.offset) * ae.scale)).numpy()
    return seed, y, len(np.unique(y)), z


def run_one(dataset: str, recipe: str, seed: int) -> dict:
    x, y = load(dataset)
    k = len(np.unique(y))
    row = {"dataset": dataset, "recipe": recipe, "seed": seed, "n_samples": len(x), "n_features": x.shape[1],
           "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M")}
    if recipe == "baseline":
        start = time.perf_counter()
        labels = umap_gmm(x, k, image=dataset in IMAGE_SHAPES, seed=seed)
        return {**row, **clustering_scores(y, labels), "minutes": (time.perf_counter() - start) / 60}
    est = DEC(n_clusters=k, random_state=seed, **recipe_params(recipe, dataset))
    timer = StageTimer()
    ae, pretrain_seconds = pretrained(est, x, dataset, seed, timer) if recipe == "paper" else (None, 0.0)
    start = time.perf_counter()
    est.fit(x, autoencoder=ae, callback=timer)
    fit_seconds = time.perf_counter() - start
    return {
        **row, "init_acc": clustering_scores(y, est.init_labels_)["acc"], **clustering_scores(y, est.labels_),
        "round_acc": [clustering_scores(y, labels)["acc"] for labels in est.round_labels_],
        "trust_score": est.trust_score_, **{f"trust_{n}": v for n, v in est.trust_scores_.items()},
        "n_iter": est.n_iter_, "pretrain_min": pretrain_seconds / 60, "fit_min": fit_seconds / 60,
        "minutes": (pretrain_seconds + fit_seconds) / 60, "stage_seconds": timer.seconds,
        "resolved": {k: (list(v) if isinstance(v, tuple) else v) for k, v in est.resolved_params_.items()},
    }


def cmd_run(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        for recipe in args.recipes:
            for seed in args.seeds:
                row = run_one(dataset, recipe, seed)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row, default=float) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k not in ("stage_seconds", "machine")}, default=float), flush=True)


def _mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


TRUST = f"trust_{TRUST_SCORE}"
ORDER = ["mnist", "mnist_test", "mnist6", "digits", "wine", "breast_cancer", "blobs"]


def _cell(row: dict, key: str, fmt: str = ".3f") -> str:
    return "-" if row.get(key) is None else format(row[key], fmt)


def cmd_report(args) -> None:
    rows = latest_rows(RESULTS, ("dataset", "recipe", "seed"))
    datasets = [d for d in ORDER if any(r["dataset"] == d for r in rows)]
    lines = ["| dataset | recipe | seed | init ACC | ACC | NMI | ACC - init | minutes |", "|---|---|---|---|---|---|---|---|"]
    summary = ["| dataset | seeds | baseline ACC | default ACC | default - baseline | worst (final - init) of the default | "
               "mean (final - init) | best ACC | baseline minutes | default minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        by_recipe = {}
        for recipe in RECIPES:
            sel = sorted((r for r in rows if r["dataset"] == d and r["recipe"] == recipe), key=lambda r: r["seed"])
            by_recipe[recipe] = sel
            for r in sel:
                gain = "-" if r.get("init_acc") is None else f"{r['acc'] - r['init_acc']:+.4f}"
                lines.append(f"| {d} | {recipe} | {r['seed']} | {_cell(r, 'init_acc', '.4f')} | **{r['acc']:.4f}** | "
                             f"{r['nmi']:.3f} | {gain} | {r['minutes']:.2f} |")
            if len(sel) > 1:
                inits = [r["init_acc"] for r in sel if r.get("init_acc") is not None]
                lines.append(f"| {d} | {recipe} | mean ± std ({len(sel)}) | {_mean_std(inits) if inits else '-'} | "
                             f"**{_mean_std([r['acc'] for r in sel])}** | {_mean_std([r['nmi'] for r in sel])} | | "
                             f"{np.median([r['minutes'] for r in sel]):.2f} (median) |")
        base, default, best = by_recipe["baseline"], by_recipe["default"], by_recipe["best"]
        if base and default:
            seeds = sorted({r["seed"] for r in base} & {r["seed"] for r in default})
            b = [r for r in base if r["seed"] in seeds]
            f = [r for r in default if r["seed"] in seeds]
            best_cell = f"{np.mean([r['acc'] for r in best]):.4f} ({len(best)} seeds)" if best else "-"
            summary.append(
                f"| {d} | {len(seeds)} | {np.mean([r['acc'] for r in b]):.4f} | {np.mean([r['acc'] for r in f]):.4f} | "
                f"{np.mean([r['acc'] for r in f]) - np.mean([r['acc'] for r in b]):+.4f} | "
                f"{min(r['acc'] - r['init_acc'] for r in f):+.4f} | {np.mean([r['acc'] - r['init_acc'] for r in f]):+.5f} | "
                f"{best_cell} | "
                f"{np.median([r['minutes'] for r in b]):.2f} | {np.median([r['minutes'] for r in f]):.2f} |")
    machines = sorted({r["machine"] for r in rows})
    body = (
        "Command: `DEC_DATA_DIR=../shared/data python bench/bench_quality.py run --datasets ... --recipes ... --seeds ...`, "
        "then `python bench/bench_quality.py report` (results accumulate in bench/out/quality.jsonl).\n\n"
        f"Machine: {'; '.join(machines)}.\n"
        "Recipes: `default` (every parameter at its default), `best` (`preset=best`), `baseline` (UMAP of the raw "
        "features, 10 components, 20 neighbours, `min_dist=0`, seeded; full-covariance GMM, 10 starts, the most likely "
        "kept; images / their maximum, tables standardised: `bench/baseline.py`), `paper` (`preset=paper`, pretraining "
        "minutes included). init: the initial clustering the recipe distils and self-trains from. mnist6: the MNIST "
        "test split restricted to the digits 0-5.\n\n"
        + (f"{args.note}\n\n" if args.note else "")
        + "### Against the baseline, per dataset (means over the seeds both ran)\n\n" + "\n".join(summary)
        + "\n\n### Every run\n\n" + "\n".join(lines)
    )
    print(body)
    write_section("Clustering quality across data kinds", body)


def cmd_read_back(args) -> None:
    """Rows of the page's table "Every run" (not its mean lines) as results, marked recorded at ``args.commit``."""
    from _report import BENCHMARKS

    section = BENCHMARKS.read_text().split("## Clustering quality across data kinds", 1)[1].split("\n## ", 1)[0]
    table = section.split("### Every run", 1)[1]
    rows = []
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not cells[2].isdigit():
            continue  # the header, its rule and the mean lines
        dataset, recipe, seed, init, acc, nmi, _, minutes = cells
        rows.append({"dataset": dataset, "recipe": recipe, "seed": int(seed), "init_acc": None if init == "-" else float(init),
                     "acc": float(acc), "nmi": float(nmi), "minutes": float(minutes),
                     "machine": f"recorded at {args.commit}", "recorded": args.commit})
    OUT.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows read back from {BENCHMARKS.name} into {RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--datasets", nargs="+", default=["mnist_test", "digits", "wine", "breast_cancer", "blobs"], choices=ORDER)
    r.add_argument("--recipes", nargs="+", default=["default", "baseline"], choices=RECIPES)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    rep = sub.add_parser("report")
    rep.add_argument("--note", default="", help="a paragraph printed above the table (load on the machine, missing runs)")
    back = sub.add_parser("read-back")
    back.add_argument("--commit", required=True, help="the commit whose BENCHMARKS.md holds the table read back")
    args = ap.parse_args()
    {"run": cmd_run, "report": cmd_report, "read-back": cmd_read_back}[args.command](args)


if __name__ == "__main__":
    main()
