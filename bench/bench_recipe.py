"""Pretraining recipe: AE+k-means accuracy on MNIST against pretraining epochs and CPU minutes.

    DEC_DATA_DIR=../shared/data python bench/bench_recipe.py --epochs 100 --checkpoints 10 25 50 75 100

AE+k-means accuracy predicts DEC accuracy (the self-training phase adds a few points on top), so
one pretraining run with k-means at several checkpoints shows what each further epoch buys. Each
recipe is one run of the library's pretraining loop; k-means (n_init=20, as in `cluster`) runs at
the checkpoints and its time is not counted as training time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.cluster import KMeans

from _report import machine, write_section
from dec_mlflow.callbacks import Callback
from dec_mlflow.data import load_dataset
from dec_mlflow.metrics import cluster_accuracy
from dec_mlflow.model import Autoencoder
from dec_mlflow.training import embed, pretrain_end_to_end

RECIPES = {
    # name: options of pretrain_end_to_end besides epochs; SGD lr 1.0 with momentum is the recipe
    # a well-known Keras DEC uses; MSE is averaged over features, hence the large rate.
    "sgd-constant-bf16": dict(lr=1.0, momentum=0.9, lr_schedule="constant", precision="bf16"),
    "sgd-cosine-bf16": dict(lr=1.0, momentum=0.9, lr_schedule="cosine", precision="bf16"),
    "sgd-constant-fp32": dict(lr=1.0, momentum=0.9, lr_schedule="constant", precision="fp32"),
}


class Checkpoints(Callback):
    """At the chosen epochs, pause the clock, run k-means in the embedding and score it."""

    def __init__(self, ae, x, y, epochs, seed):
        self.ae, self.x, self.y, self.epochs, self.seed = ae, x, y, set(epochs), seed
        self.rows, self.train_seconds, self._t = [], 0.0, None

    def on_stage_begin(self, stage, total):
        self._t = time.perf_counter()

    def on_step(self, stage, step, metrics):
        self.train_seconds += time.perf_counter() - self._t
        if step in self.epochs:
            z = embed(self.ae.encoder, self.x).numpy()
            self.ae.train()
            labels = KMeans(10, n_init=20, random_state=self.seed).fit_predict(z)
            row = {"epoch": step, "train_min": self.train_seconds / 60, "loss": metrics["loss"],
                   "ae_kmeans_acc": cluster_accuracy(self.y, labels)}
            self.rows.append(row)
            print(json.dumps(row), flush=True)
        self._t = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["sgd-constant-bf16", "sgd-cosine-bf16"], choices=list(RECIPES))
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 25, 50, 75, 100])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load_dataset("mnist")
    x = torch.from_numpy(data.x / np.float32(255.0))  # scaling 'max', as `cluster` does for MNIST
    lines = ["| recipe | epochs | training min | final MSE | AE+k-means ACC |", "|---|---|---|---|---|"]
    for name in args.recipes:
        torch.manual_seed(args.seed)
        ae = Autoencoder((784, 500, 500, 2000, 10))
        cb = Checkpoints(ae, x, data.y, args.checkpoints, args.seed)
        pretrain_end_to_end(ae, x, callback=cb, epochs=args.epochs, batch_size=256, **RECIPES[name])
        lines += [f"| {name} | {r['epoch']} | {r['train_min']:.1f} | {r['loss']:.4f} | {r['ae_kmeans_acc']:.3f} |" for r in cb.rows]
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_recipe.py --recipes {' '.join(args.recipes)} "
        f"--epochs {args.epochs} --checkpoints {' '.join(map(str, args.checkpoints))} --seed {args.seed}`\n\n"
        f"Machine: {machine()}. Full MNIST, d-500-500-2000-10, batch 256, seed {args.seed}. One pretraining run per "
        "recipe; at each checkpoint k-means (n_init=20) in the embedding, scored by ACC (its time is not counted). "
        "A cosine schedule decays over the whole run, so its intermediate rows are not those of a shorter cosine run.\n\n"
        + "\n".join(lines)
    )
    print(body)
    write_section(f"Pretraining recipe: {', '.join(args.recipes)}, seed {args.seed}", body)


if __name__ == "__main__":
    main()
