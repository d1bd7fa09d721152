"""Where DEC-DA's augmentation helps and how long to distil: the choices behind `preset=best`, on cached autoencoders.

    DEC_DATA_DIR=../shared/data python bench/bench_best_mode.py run mnist-s0 --variants false:2 finetune:2 distill:20 distill:40 distill:40:2
    python bench/bench_best_mode.py report

Each tag names an autoencoder that `bench/bench_quality.py run` pretrained and kept in bench/out/ae/
(dataset-s<seed>, default pretraining, clean images). Each variant `augment:distill_epochs[:distill_rounds]`
fits DEC from that autoencoder with the default manifold initialisation and these settings (the rest at
their defaults, image_shape the dataset's, one round unless given): 'finetune' augments distillation and
self-training, 'distill' distillation only (self-training on clean images); 'false:2' is the default recipe.
Recorded: the initial (UMAP + GMM) ACC, the ACC after the first distillation (the first self-training
update), the ACC at the end of each round, the final ACC, the self-training iterations (all rounds) and
whether the last round converged (label change below tol), and minutes. Rows go to
bench/out/best_mode.jsonl (a rerun of the same tag and variant replaces its row); `report` writes
them to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _report import StageTimer, latest_rows, machine, write_section
from bench_quality import IMAGE_SHAPES, OUT, cached_autoencoder, load
from dec_mlflow import DEC
from dec_mlflow.metrics import cluster_accuracy

RESULTS = OUT / "best_mode.jsonl"


class AfterDistillation(StageTimer):
    """Stage times, and the labels of the first self-training update (what distillation left)."""

    def __init__(self):
        super().__init__()
        self.labels = None

    def on_update(self, step, labels, metrics):
        if self.labels is None:
            self.labels = labels.copy()


def run_one(tag: str, variant: str) -> dict:
    augment, epochs, rounds = (variant.split(":") + ["1"])[:3]
    augment = {"false": False, "true": True}.get(augment, augment)  # false:2 is the default recipe
    dataset, seed, ae = cached_autoencoder(tag)
    x, y = load(dataset)
    est = DEC(n_clusters=len(np.unique(y)), random_state=seed, image_shape=IMAGE_SHAPES[dataset],
              augment=augment, distill_epochs=int(epochs), distill_rounds=int(rounds))
    timer = AfterDistillation()
    start = time.perf_counter()
    est.fit(x, autoencoder=ae, callback=timer)
    return {"tag": tag, "variant": variant, "init_acc": cluster_accuracy(y, est.init_labels_),
            "distilled_acc": cluster_accuracy(y, timer.labels), "acc": cluster_accuracy(y, est.labels_),
            "round_accs": [cluster_accuracy(y, labels) for labels in est.round_labels_],
            "n_iter": est.n_iter_, "converged": est.converged_, "minutes": (time.perf_counter() - start) / 60,
            "stage_seconds": timer.seconds, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M")}


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    for tag in args.tags:
        if tag.rsplit("-s", 1)[0] not in IMAGE_SHAPES:
            raise SystemExit(f"{tag}: not image data ({', '.join(IMAGE_SHAPES)}); nothing to augment")
        for variant in args.variants:
            row = run_one(tag, variant)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(json.dumps(row, default=float), flush=True)


def cmd_report(args) -> None:
    rows = sorted(latest_rows(RESULTS, ("tag", "variant")), key=lambda r: (r["tag"], r["variant"]))
    lines = ["| autoencoder | augment : distill_epochs [: distill_rounds] | init ACC (UMAP + GMM) | ACC after distillation | "
             "ACC after each round | DEC ACC | self-training iterations | converged | minutes (fit, from a pretrained autoencoder) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_round = ", ".join(f"{a:.4f}" for a in r.get("round_accs", [r["acc"]]))  # rows before rounds: one round
        lines.append(f"| {r['tag']} | {r['variant']} | {r['init_acc']:.4f} | {r['distilled_acc']:.4f} | {per_round} | "
                     f"**{r['acc']:.4f}** | {r['n_iter']} | {'yes' if r['converged'] else 'no'} | {r['minutes']:.1f} |")
    body = ("Command: `DEC_DATA_DIR=../shared/data python bench/bench_best_mode.py run <tags> --variants ...`, then "
            "`python bench/bench_best_mode.py report`\n\n"
            f"Machine: {rows[0]['machine']}; runs side by side with others, minutes are noisy.\n\n"
            + "\n".join(lines) + "\n" + (f"\n{args.note.strip()}\n" if args.note else ""))
    print(body)
    write_section("Best mode: where to augment, how long to distil", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("tags", nargs="+", help="dataset-s<seed> of autoencoders in bench/out/ae/, e.g. mnist-s0")
    run.add_argument("--variants", nargs="+", default=["false:2", "finetune:2", "distill:20", "distill:40", "distill:40:2"])
    run.add_argument("--threads", type=int, default=1)
    report = sub.add_parser("report")
    report.add_argument("--note", default="", help="text after the table")
    args = ap.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
