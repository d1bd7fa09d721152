"""Data-parallel training on one machine: `cluster --nproc 2` against `--nproc 1` on MNIST, side by side.

    DEC_DATA_DIR=/work/shared/data python bench/bench_distributed.py --pretrain-epochs 10

Runs the real entry point (`python -m dec_mlflow.cli cluster --dataset mnist ...`) in `--repeats`
pairs (nproc 1, then nproc 2; medians over pairs, ratios within a pair), each run in its own temporary tracking store (so that neither reuses the other's
pretraining), and reads back from the run what it logged: pretraining samples/s (from the
timestamps of the per-epoch `pretrain_loss`, first epoch excluded), `final_acc`, and the wall time
of the whole command. nproc=1 runs with OMP_NUM_THREADS=2 (both cores for one process), nproc=2
with OMP_NUM_THREADS=1 (one core per rank). Also prints the gradient all-reduce volume per step of
the autoencoder, the figure the README's scaling section starts from.

`--subsample N` trains both configurations on the same N rows of the dataset drawn at random
(seeded), written to one `.npz` first: for a machine too loaded to pretrain on all 70,000 images
twice in the time at hand. `--extra "--max_iter M"` caps self-training the same way.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from _report import machine, write_section
from dec_mlflow.data import load_dataset
from dec_mlflow.model import Autoencoder

REPO = Path(__file__).resolve().parents[1]
DIMS = (784, 500, 500, 2000, 10)


def subsample(dataset: str, n: int, seed: int) -> str:
    """Path of an ``.npz`` holding ``n`` rows of ``dataset`` (and their labels) drawn at random with ``seed``."""
    data = load_dataset(dataset)
    rows = np.sort(np.random.default_rng(seed).choice(data.x.shape[0], size=n, replace=False))
    path = Path(tempfile.mkdtemp(prefix="bench-ddp-data-")) / f"{data.name}-{n}.npz"
    np.savez(path, x=data.x[rows], y=data.y[rows])
    return str(path)


def run_cluster(nproc: int, threads: int, args) -> dict:
    """One `cluster` command in a fresh store; returns wall time, pretraining samples/s and scores."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-ddp-{nproc}-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "dec_mlflow.cli", "cluster", "--dataset", args.data, "--nproc", str(nproc),
               "--pretrain_epochs", str(args.pretrain_epochs), "--init", args.init, "--random_state", str(args.seed),
               "--registered_model_name", "none", *shlex.split(args.extra)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"nproc={nproc} failed:\n{proc.stderr[-3000:]}")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("Default").experiment_id], "")
    cluster = next(r for r in runs if r.data.tags.get("dec.stage") == "cluster")
    pretrain = next(r for r in runs if r.data.tags.get("dec.stage") == "pretrain")
    history = sorted(client.get_metric_history(pretrain.info.run_id, "pretrain_loss"), key=lambda m: m.step)
    seconds = (history[-1].timestamp - history[0].timestamp) / 1000  # epochs 2..E
    n_samples = int(cluster.data.params["n_samples"])
    return {"nproc": nproc, "threads": threads, "wall": wall, "samples_per_s": n_samples * (len(history) - 1) / seconds,
            "epoch_s": seconds / (len(history) - 1), "acc": cluster.data.metrics["final_acc"],
            "init_acc": cluster.data.metrics["init_acc"], "n_iter": int(cluster.data.metrics["n_iter"]),
            "precision": cluster.data.params.get("precision_resolved", "?"), "n_samples": n_samples, "command": " ".join(command[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="reduced from the default 75 to fit the shared machine")
    ap.add_argument("--init", default="kmeans", help="'kmeans' keeps the run short; 'auto' is the default recipe (UMAP + GMM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--subsample", type=int, default=0, help="train on this many rows drawn at random (0: all)")
    ap.add_argument("--extra", default="", help="more `cluster` options, e.g. for a smoke test on small data")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (nproc 1 then 2); medians are reported")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    args.data = subsample(args.dataset, args.subsample, args.seed) if args.subsample else args.dataset
    load_before = os.getloadavg()[0]
    pairs = []
    for repeat in range(args.repeats):  # interleaved, so that a change of load falls on both configurations
        pairs.append((run_cluster(1, 2, args), run_cluster(2, 1, args)))
        print(f"pair {repeat + 1}/{args.repeats}: " + ", ".join(
            f"nproc {r['nproc']}: {r['samples_per_s']:,.0f} samples/s, {r['wall']:.0f} s, ACC {r['acc']:.4f}" for r in pairs[-1]), flush=True)
    load_after = os.getloadavg()[0]
    params = sum(p.numel() for p in Autoencoder(DIMS).parameters())
    base = pairs[0][0]
    lines = ["| pair | nproc | OMP threads per process | pretraining samples/s | s per epoch | speed-up (same pair) | wall time (s) | wall ratio (same pair) | AE+k-means ACC | final ACC | self-training iterations |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, pair in enumerate(pairs, 1):
        for r in pair:
            lines.append(f"| {i} | {r['nproc']} | {r['threads']} | {r['samples_per_s']:,.0f} | {r['epoch_s']:.1f} | "
                         f"{r['samples_per_s'] / pair[0]['samples_per_s']:.2f}x | {r['wall']:.0f} | {r['wall'] / pair[0]['wall']:.2f} | "
                         f"{r['init_acc']:.4f} | {r['acc']:.4f} | {r['n_iter']} |")
    for j in (0, 1):
        runs = [pair[j] for pair in pairs]
        lines.append(f"| median | {runs[0]['nproc']} | {runs[0]['threads']} | {np.median([r['samples_per_s'] for r in runs]):,.0f} | "
                     f"{np.median([r['epoch_s'] for r in runs]):.1f} | "
                     f"{np.median([p[j]['samples_per_s'] / p[0]['samples_per_s'] for p in pairs]):.2f}x | "
                     f"{np.median([r['wall'] for r in runs]):.0f} | {np.median([p[j]['wall'] / p[0]['wall'] for p in pairs]):.2f} | "
                     f"{np.median([r['init_acc'] for r in runs]):.4f} | {np.median([r['acc'] for r in runs]):.4f} | |")
    body = (
        f"Command: `DEC_DATA_DIR=<mnist> python bench/bench_distributed.py --pretrain-epochs {args.pretrain_epochs} "
        f"--init {args.init} --seed {args.seed} --repeats {args.repeats}{' --dataset ' + args.dataset if args.dataset != 'mnist' else ''}"
        f"{f' --subsample {args.subsample}' if args.subsample else ''}"
        f"{' --extra ' + shlex.quote(args.extra) if args.extra else ''}`\n\n"
        f"Machine: {machine()}, {os.cpu_count()} cores. Load average {load_before:.1f} before and {load_after:.1f} after "
        f"(other people's jobs shared the machine). {args.repeats} pairs of runs, nproc 1 then nproc 2 in each, one run at a time; "
        "ratios within a pair, medians over pairs.\n\n"
        f"What runs: `python -m dec_mlflow.cli cluster --dataset {args.dataset} --nproc N --pretrain_epochs {args.pretrain_epochs} "
        f"--init {args.init}{' ' + args.extra if args.extra else ''}` ({base['n_samples']:,} samples"
        f"{f', drawn at random with seed {args.seed} from the {args.dataset} data set' if args.subsample else ''}; the rest of the default recipe; pretraining precision "
        f"{base['precision']}), each in its own tracking store. Reduced budget: {args.pretrain_epochs} pretraining epochs "
        f"instead of 75{' and k-means initialisation instead of UMAP + GMM' if args.init == 'kmeans' else ''}, so ACC is "
        "below the default recipe's. Samples/s from the timestamps of the logged per-epoch `pretrain_loss` (first epoch "
        "excluded); wall time of the whole command (start-up, data, pretraining, initialisation, self-training, ONNX "
        "export and checks). With nproc=2 each batch of 256 is split 128/128 between the ranks and the gradients "
        f"({params:,} parameters, {params * 4 / 1e6:.1f} MB in fp32) are summed by one gloo all-reduce per step.\n\n"
        + "\n".join(lines)
    )
    print(body)
    if not args.no_write:
        write_section("Data-parallel training (torchrun), one machine", body)


if __name__ == "__main__":
    main()
