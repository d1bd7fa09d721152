"""The label-free trust score against ACC, over a pool of good and deliberately bad runs per dataset.

``build`` fits the pool of a dataset with the estimator and stores each run's labels in
bench/out/trust_pool/<dataset>/<tag>.npz: the true k on seeds 0, 1 and 2 (the good runs); k - 2,
k - 1, k + 1, k + 2 (seed 0) and k - 1 on seed 1; the paper's k-means start with 10 pretraining
epochs (seeds 0, 1) and 5 (seed 2); and the default start after only 5 pretraining epochs (seed 0). Where
k - 2 or k - 1 falls below 2 clusters, k + 1 and k + 2 on seed 1, then k + 3 (seed 0), take their places:
every pool holds 12 runs.
``score`` computes every stored run's scores as ``fit`` does (:func:`dec_mlflow.initialisation.input_map`
with the run's seed, then :func:`dec_mlflow.trust.trust_scores`) into bench/out/trust.jsonl, with the
cluster-size entropy the trust score used to be. ``report`` writes the section "Label-free trust
score against ACC" of BENCHMARKS.md and the scatter bench/figures/trust_vs_acc.png.

    DEC_DATA_DIR=../shared/data python bench/bench_trust.py build --datasets digits wine
    DEC_DATA_DIR=../shared/data python bench/bench_trust.py score --datasets digits wine
    python bench/bench_trust.py report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from _report import latest_rows, machine, write_section
from bench_auto_k import ORDER, dataset
from bench_quality import OUT
from dec_mlflow import DEC, trust
from dec_mlflow.initialisation import input_map
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.scaling import fit_scaling

POOL = OUT / "trust_pool"
RESULTS = OUT / "trust.jsonl"
FIGURE = Path(__file__).resolve().parent / "figures" / "trust_vs_acc.png"
GOOD = ("s0", "s1", "s2")
POOL_RUNS = 12
# in this order, the runs that stand in for those a small k cannot have (k - 2 or k - 1 below 2 clusters)
STAND_INS = {"k+1s1": (1, 1), "k+2s1": (2, 1), "k+3": (3, 0)}


def configs(k: int) -> dict[str, dict]:
    """The pool's runs: tag -> estimator parameters (k is the true number of groups)."""
    runs = {f"s{s}": dict(n_clusters=k, random_state=s) for s in range(3)}
    runs |= {f"k{d:+d}": dict(n_clusters=k + d, random_state=0) for d in (-2, -1, 1, 2)}
    runs["k-1s1"] = dict(n_clusters=k - 1, random_state=1)
    runs |= {"km10s0": dict(n_clusters=k, init="kmeans", pretrain_epochs=10, random_state=0),
             "km10s1": dict(n_clusters=k, init="kmeans", pretrain_epochs=10, random_state=1),
             "km5s2": dict(n_clusters=k, init="kmeans", pretrain_epochs=5, random_state=2),
             "pre5s0": dict(n_clusters=k, pretrain_epochs=5, random_state=0)}
    runs = {tag: p for tag, p in runs.items() if p["n_clusters"] >= 2}
    for tag, (d, seed) in STAND_INS.items():
        if len(runs) < POOL_RUNS:
            runs[tag] = dict(n_clusters=k + d, random_state=seed)
    return runs


def build(name: str) -> None:
    x, y, shape = dataset(name)
    out = POOL / name
    out.mkdir(parents=True, exist_ok=True)
    for tag, params in configs(len(np.unique(y))).items():
        if (out / f"{tag}.npz").exists():
            continue
        start = time.perf_counter()
        est = DEC(**params, **({"image_shape": shape} if shape else {})).fit(x)
        minutes = (time.perf_counter() - start) / 60
        acc = cluster_accuracy(y, est.labels_)
        np.savez(out / f"{tag}.npz", labels=est.labels_, y=y, acc=acc, k=params["n_clusters"], seed=params["random_state"],
                 minutes=minutes, trust=json.dumps(est.trust_scores_))
        print(f"{name} {tag}: ACC {acc:.4f}, trust {est.trust_score_:.4f}, {minutes:.1f} min", flush=True)


def score(name: str) -> None:
    x, y, shape = dataset(name)
    offset, scale = fit_scaling(x, DEC().resolve(x)["scaling"])
    maps: dict[tuple[int, int], object] = {}
    tags = configs(len(np.unique(y)))
    with RESULTS.open("a") as out:
        for tag, params in tags.items():
            path = POOL / name / f"{tag}.npz"
            if not path.exists():
                continue
            run = np.load(path)
            k, seed = int(run["k"]), params["random_state"]
            # as fit: a run that started from the input's map reuses it (built once per seed and dimension, not
            # counted as the score's cost); the others are mapped inside run_scores, on a sample of large data
            own_map = params.get("init", "manifold") == "manifold" and params.get("pretrain_epochs", 0) == 0
            key = (seed, min(k, 10))  # the map's dimension is min(k, 10)
            if own_map and key not in maps:
                maps[key] = input_map(x, offset, scale, k, seed=seed, image_shape=shape)
            start = time.perf_counter()
            scores = trust.run_scores(x, run["labels"], k, seed=seed, offset=offset, scale=scale, image_shape=shape,
                                      mapped=maps[key] if own_map else None)
            cost = time.perf_counter() - start  # what fit spends on it
            row = {"dataset": name, "tag": tag, "k": k, "true_k": len(np.unique(y)), "seed": seed,
                   "acc": float(run["acc"]), **scores, "size_entropy": trust.size_balance(run["labels"], k),
                   "score_seconds": cost, "run_minutes": float(run["minutes"]),
                   "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M")}
            out.write(json.dumps(row) + "\n")
            print(f"{name} {tag}: ACC {row['acc']:.4f} score {row['score']:.4f} (agreement {row['agreement']:.3f}, "
                  f"modularity {row['modularity']:.3f}, valleys {row['valleys']:.3f}), {row['score_seconds']:.1f} s in fit", flush=True)


def summary(rows: list[dict], key: str = "score") -> dict:
    """The issue's checks of one dataset's pool for the score ``key``."""
    acc = np.array([r["acc"] for r in rows])
    v = np.array([r[key] for r in rows])
    good = [i for i, r in enumerate(rows) if r["tag"] in GOOD]
    bad = [i for i, r in enumerate(rows) if r["tag"] not in GOOD and acc[i] <= acc[good].max() - 0.02]
    merged = [i for i, r in enumerate(rows) if r["k"] < r["true_k"]]
    pairs = [(i, j) for i in range(len(v)) for j in range(len(v)) if acc[i] - acc[j] >= 0.02]
    return {"runs": len(rows), "spearman": float(spearmanr(acc, v)[0]),
            "pairs": float(np.mean([v[i] > v[j] for i, j in pairs])) if pairs else float("nan"), "n_pairs": len(pairs),
            "gap": float(np.median(v[good]) - np.median(v[bad])) if bad else float("nan"),
            "merge_margin": float(v[good].min() - v[merged].max()) if merged else float("nan"),
            "merge_margin_best": float(v[good].max() - v[merged].max()) if merged else float("nan")}


def read_back(mine: list[dict]) -> dict:
    """What an earlier BENCHMARKS.md said of a pool whose rows were all read back from it (``recorded``: rounded,
    no cluster-size entropy): its summary line and balanced-split note, as computed then from the full rows; else {}."""
    return mine[0] if all(r.get("recorded") for r in mine) else {}


def report(note: str = "") -> None:
    rows = latest_rows(RESULTS, ("dataset", "tag"))
    names = [d for d in ORDER if any(r["dataset"] == d for r in rows)]
    lines = ["| data | runs | Spearman with ACC | pairs ranked right (ACC differs by >= 0.02) | good - bad median "
             "| true k - best merged run (worst seed / best seed) | without valleys (agreement x modularity): Spearman, pairs "
             "| old score (size entropy): Spearman, pairs | trust cost in fit, median share of the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in names:
        mine = [r for r in rows if r["dataset"] == d]
        if read_back(mine).get("recorded_summary"):
            lines.append(read_back(mine)["recorded_summary"])
            continue
        s, old = summary(mine), summary(mine, "size_entropy")
        before = summary([dict(r, before=r["agreement"] * max(r["modularity"], 0.0)) for r in mine], "before")
        merge = "-" if np.isnan(s["merge_margin"]) else f"{s['merge_margin']:+.3f} / {s['merge_margin_best']:+.3f}"
        share = np.median([r["score_seconds"] / (60 * r["run_minutes"]) for r in mine])
        lines.append(f"| {d} | {s['runs']} | {s['spearman']:+.2f} | {s['pairs']:.2f} of {s['n_pairs']} | {s['gap']:+.3f} "
                     f"| {merge} | {before['spearman']:+.2f}, {before['pairs']:.2f} | {old['spearman']:+.2f}, {old['pairs']:.2f} | {share:.1%} |")
    balanced = []
    for d in names:  # the true k with its unequal groups against the most balanced wrong run
        mine = [r for r in rows if r["dataset"] == d]
        wrong = [r for r in mine if r["tag"] not in GOOD and r["acc"] < max(r["acc"] for r in mine) - 0.02]
        if read_back(mine):
            balanced += [read_back(mine)["recorded_balanced"]] if "recorded_balanced" in read_back(mine) else []
        elif d in ("mnist_imbalanced", "blobs3", "blobs5", "blobs8") and wrong:
            w = max(wrong, key=lambda r: r["size_entropy"])
            good = [r for r in mine if r["tag"] in GOOD]
            balanced.append(f"{d}: the most balanced wrong run ({w['tag']}, size entropy {w['size_entropy']:.3f} against "
                            f"{min(r['size_entropy'] for r in good):.3f}-{max(r['size_entropy'] for r in good):.3f}, ACC "
                            f"{w['acc']:.3f}) scores {w['score']:.3f}; the true k's runs {min(r['score'] for r in good):.3f}-"
                            f"{max(r['score'] for r in good):.3f}.")
    runs = ["| data | run | k | seed | ACC | trust_score | agreement | modularity | valleys | score s | run min |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in names:
        for r in sorted((r for r in rows if r["dataset"] == d), key=lambda r: -r["acc"]):
            runs.append(f"| {d} | {r['tag']} | {r['k']} | {r['seed']} | {r['acc']:.4f} | {r['score']:.4f} | "
                        f"{r['agreement']:.3f} | {r['modularity']:.3f} | {r['valleys']:.3f} | {r['score_seconds']:.0f} | {r['run_minutes']:.1f} |")
    figure(rows, names)
    machines = sorted({r["machine"] for r in rows})
    body = (
        "`python bench/bench_trust.py build|score|report`. Per dataset a pool of runs of the estimator: the true k on "
        "seeds 0-2 (the good runs); k - 2, k - 1, k + 1, k + 2 and k - 1 on seed 1; the k-means start after 10 or 5 "
        "pretraining epochs; the default start after 5 pretraining epochs. Where k - 2 or k - 1 would be below 2 "
        "clusters (the blobs of 3 groups, wine, breast cancer), k + 1 and k + 2 on seed 1, then k + 3, stand in: 12 runs "
        "a pool. `trust_score` = agreement x modularity x valleys, "
        "computed as `fit` computes it (docs/trust.md). *Bad* runs are the others at least 0.02 of ACC below the best "
        "good run; the merge column is the lowest (and highest) good run's score minus the highest score of a run "
        "with fewer clusters than groups: positive when every merged run ranks below.\n\n"
        + (note + "\n\n" if note else "")
        + "\n".join(lines) + "\n\n" + "\n".join(f"- {b}" for b in balanced) + "\n\n![trust score against ACC](bench/figures/trust_vs_acc.png)\n\n"
        "<details><summary>Every run</summary>\n\n" + "\n".join(runs) + "\n\n</details>\n\n"
        f"Machine: {'; '.join(machines)}."
    )
    write_section("Label-free trust score against ACC", body)
    print("\n".join(lines))


def figure(rows: list[dict], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.2 * cols, 3.0 * -(-len(names) // cols)), squeeze=False)
    kinds = {"good": ("tab:green", "true k"), "merged": ("tab:red", "k - 1, k - 2"), "split": ("tab:orange", "k + 1 or more"),
             "start": ("tab:blue", "true k, 5-10 pretraining epochs")}
    for ax, d in zip(axes.ravel(), names):
        mine = [r for r in rows if r["dataset"] == d]
        for r in mine:
            kind = "good" if r["tag"] in GOOD else ("merged" if r["k"] < r["true_k"] else ("split" if r["k"] > r["true_k"] else "start"))
            ax.scatter(r["acc"], r["score"], c=kinds[kind][0], s=18)
        kept = read_back(mine).get("recorded_summary")
        rho = kept.strip("|").split("|")[2].strip() if kept else f"{summary(mine)['spearman']:+.2f}"  # as the table says
        ax.set_title(f"{d} (Spearman {rho})", fontsize=9)
        ax.set_xlabel("ACC", fontsize=8)
        ax.set_ylabel("trust_score", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.legend([plt.Line2D([], [], ls="", marker="o", c=c) for c, _ in kinds.values()], [t for _, t in kinds.values()],
               loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    FIGURE.parent.mkdir(exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "score", "report"))
    parser.add_argument("--datasets", nargs="+", default=["blobs3", "blobs5", "blobs8", "wine", "breast_cancer", "digits", "mnist6"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="report: a paragraph printed above the table (rows read back, load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "report":
        return report(args.note)
    for name in args.datasets:
        (build if args.command == "build" else score)(name)


if __name__ == "__main__":
    main()
