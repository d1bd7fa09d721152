"""MNIST quality benchmark: AE+k-means and DEC accuracy over seeds with the `cluster` defaults.

    DEC_DATA_DIR=../shared/data python bench/bench_mnist.py --seeds 0 1 2

Runs the estimator exactly as `mlflow run . -e cluster -P dataset=mnist` configures it (scaling
'auto' resolves to 'max' for MNIST), one seed after another, prints a row per seed and writes the
mean and std to BENCHMARKS.md. `--set name=value` overrides a parameter, to compare recipes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _report import StageTimer, machine, write_section
from dec_mlflow import DEC
from dec_mlflow.data import load_dataset
from dec_mlflow.metrics import clustering_scores



def run(data, params: dict, seed: int) -> dict:
    timer = StageTimer()
    start = time.perf_counter()
    est = DEC(**{**params, "random_state": seed}).fit(data.x, callback=timer)
    wall = time.perf_counter() - start
    row = {"seed": seed, "wall_min": wall / 60, "iters": est.n_iter_, **{f"{k}_min": v / 60 for k, v in timer.seconds.items()}}
    row.update({f"ae_kmeans_{k}": v for k, v in clustering_scores(data.y, est.init_labels_).items()})
    row.update({f"dec_{k}": v for k, v in clustering_scores(data.y, est.labels_).items()})
    return row


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if value[:1] in "[{0123456789-." or value in ("true", "false") else value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override a DEC parameter")
    ap.add_argument("--section", default="MNIST quality: `cluster` defaults")
    args = ap.parse_args()

    data = load_dataset("mnist")
    params = {"scaling": data.default_scaling, **parse_set(args.set)}
    rows = []
    for seed in args.seeds:
        rows.append(run(data, params, seed))
        print(json.dumps(rows[-1]), flush=True)

    cols = ["seed", "ae_kmeans_acc", "dec_acc", "dec_nmi", "dec_ari", "iters", "pretrain_min", "self_train_min", "wall_min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, float('nan')):.3f}" if c != "seed" and c != "iters" else str(r[c]) for c in cols) + " |")
    summary = {c: (np.mean([r[c] for r in rows]), np.std([r[c] for r in rows])) for c in cols[1:]}
    lines.append("| mean ± std | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in summary.values()) + " |")
    overrides = ", ".join(f"{k}={v}" for k, v in parse_set(args.set).items()) or "none"
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_mnist.py --seeds {' '.join(map(str, args.seeds))}"
        + (f" --set {' '.join(args.set)}`" if args.set else "`")
        + f"\n\nMachine: {machine()}. Full MNIST (70,000 images). Overrides of the `cluster` defaults: {overrides}.\n"
        + "AE+k-means is the k-means initialisation in the pretrained embedding, DEC the same run after self-training.\n"
        + "Times in minutes; the machine is shared, so wall times carry noise.\n\n"
        + "\n".join(lines)
    )
    print(body)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
