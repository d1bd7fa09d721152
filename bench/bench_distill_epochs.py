"""How long the default recipe distils: ACC after distillation and at the end, against `distill_epochs`.

    DEC_DATA_DIR=../shared/data python bench/bench_distill_epochs.py run --dataset mnist --seeds 0 --epochs 15 25 40
    python bench/bench_distill_epochs.py report

Each run is the default `cluster` estimator (no pretraining; UMAP + GMM of the input, distilled into an
untrained encoder on augmented images, then DEC self-training) with only `distill_epochs` changed. Recorded:
the initial (UMAP + GMM) ACC, the ACC distillation leaves (the first self-training update's labels), the final
ACC, the distillation and fit seconds. Rows go to bench/out/distill_epochs.jsonl (a rerun of the same dataset,
seed and epochs replaces its row); `report` writes them to BENCHMARKS.md. One fit at a time: the seconds are
wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _report import StageTimer, latest_rows, machine, write_section
from bench_quality import IMAGE_SHAPES, OUT, load
from dec_mlflow import DEC
from dec_mlflow.metrics import cluster_accuracy

RESULTS = OUT / "distill_epochs.jsonl"


class AfterDistillation(StageTimer):
    """Stage times, and the labels of the first self-training update (what distillation left)."""

    def __init__(self):
        super().__init__()
        self.labels = None

    def on_update(self, step, labels, metrics):
        if self.labels is None:
            self.labels = labels.copy()


def run_one(dataset: str, seed: int, epochs: int) -> dict:
    x, y = load(dataset)
    est = DEC(n_clusters=len(np.unique(y)), random_state=seed, image_shape=IMAGE_SHAPES.get(dataset, "auto"),
              distill_epochs=epochs)
    timer = AfterDistillation()
    start = time.perf_counter()
    est.fit(x, callback=timer)
    return {"dataset": dataset, "seed": seed, "epochs": epochs, "init_acc": cluster_accuracy(y, est.init_labels_),
            "distilled_acc": cluster_accuracy(y, timer.labels), "acc": cluster_accuracy(y, est.labels_),
            "n_iter": est.n_iter_, "distill_seconds": timer.seconds.get("distill"),
            "minutes": (time.perf_counter() - start) / 60, "stage_seconds": timer.seconds, "machine": machine(),
            "when": time.strftime("%Y-%m-%d %H:%M")}


def cmd_run(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for epochs in args.epochs:
            row = run_one(args.dataset, seed, epochs)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "stage_seconds"}, default=float), flush=True)


def cmd_report(args) -> None:
    rows = sorted(latest_rows(RESULTS, ("dataset", "seed", "epochs")), key=lambda r: (r["dataset"], r["seed"], r["epochs"]))
    lines = ["| dataset | seed | distill_epochs | init ACC | ACC after distillation | final ACC | final - init | "
             "self-training steps | distillation s | fit minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['epochs']} | {r['init_acc']:.4f} | {r['distilled_acc']:.4f} | "
                     f"**{r['acc']:.4f}** | {r['acc'] - r['init_acc']:+.4f} | {r['n_iter']} | {r['distill_seconds']:.0f} | "
                     f"{r['minutes']:.2f} |")
    body = (
        "Command: `DEC_DATA_DIR=../shared/data python bench/bench_distill_epochs.py run --dataset mnist --seeds 0 "
        "--epochs 15 25 40`, then `python bench/bench_distill_epochs.py report`.\n\n"
        f"Machine: {'; '.join(sorted({r['machine'] for r in rows}))}; one fit at a time.\n"
        "The default recipe with only `distill_epochs` changed (the default is 40, it was 15). 'ACC after "
        "distillation' is the first self-training update's labels.\n\n" + "\n".join(lines)
    )
    print(body)
    write_section("Distillation length of the default recipe", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", default="mnist", choices=sorted(IMAGE_SHAPES))
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--epochs", type=int, nargs="+", default=[15, 25, 40])
    sub.add_parser("report")
    args = ap.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
