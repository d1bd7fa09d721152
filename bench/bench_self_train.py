"""Self-training length on full MNIST: ACC at every target update, and where each stop rule ends.

    DEC_DATA_DIR=../shared/data python bench/bench_self_train.py run --seeds 0 1 2 --max-iter 2100
    python bench/bench_self_train.py report

``run`` fits the default recipe once per seed with the stop rule off (``tol=0``, ``min_iter=0``, ``max_iter``
steps of self-training) and records, at every update of the target P, the ACC of the hard labels, the share
of labels that changed since the previous update and the seconds since self-training began. The run is the
same as any stop rule's up to that rule's stop (the same seed draws the same batches), so one run per seed
gives the final ACC of every rule: the paper's (stop at the first update where fewer than ``tol`` of the
labels changed) and the paper's after ``min_iter`` steps (results in bench/out/self_train.jsonl). ``report``
writes the section "Self-training length on MNIST" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _report import latest_rows, machine, write_section
from bench_quality import OUT, load
from dec_mlflow import DEC
from dec_mlflow.callbacks import Callback
from dec_mlflow.metrics import cluster_accuracy

RESULTS = OUT / "self_train.jsonl"
TOL = 0.001  # the paper's, the default's
MIN_ITERS = (0, 420, 700, 980, 1400, 2100)  # the stop rules compared: the paper's (0), then at least this many steps


class Updates(Callback):
    """ACC, label change and seconds into self-training at every target update."""

    def __init__(self, y: np.ndarray):
        self.y, self.rows, self.start = y, [], None

    def on_stage_begin(self, stage, total):
        if stage == "self_train":
            self.start = time.perf_counter()

    def on_update(self, step, labels, metrics):
        self.rows.append({"step": int(step), "acc": cluster_accuracy(self.y, labels),
                          "delta_label": float(metrics["delta_label"]), "seconds": time.perf_counter() - self.start})


def run(seed: int, max_iter: int) -> dict:
    x, y = load("mnist")
    updates = Updates(y)
    start = time.perf_counter()
    est = DEC(random_state=seed, tol=0.0, min_iter=0, max_iter=max_iter).fit(x, callback=updates)
    row = {"seed": seed, "init_acc": cluster_accuracy(y, est.init_labels_), "updates": updates.rows,
           "update_interval": est.resolved_params_["update_interval"], "fit_minutes": (time.perf_counter() - start) / 60,
           "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M")}
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    return row


def stop(updates: list[dict], min_iter: int, tol: float = TOL) -> dict | None:
    """The update at which self-training stops under the rule: the first after step 0, at or after ``min_iter``,
    where fewer than ``tol`` of the labels changed; None if the run recorded ends before it."""
    return next((u for u in updates[1:] if u["step"] >= min_iter and u["delta_label"] < tol), None)


def report() -> None:
    rows = sorted(latest_rows(RESULTS, ("seed",)), key=lambda r: r["seed"])
    head = "| seed | init ACC | distilled (step 0) | " + " | ".join(
        "paper's rule" if m == 0 else f"min_iter={m}" for m in MIN_ITERS) + " |"
    lines = [head, "|" + "---|" * (3 + len(MIN_ITERS))]
    gains = {m: [] for m in MIN_ITERS}
    for r in rows:
        cells = []
        for m in MIN_ITERS:
            s = stop(r["updates"], m)
            if s is None:
                cells.append("-")
                continue
            gains[m].append(s["acc"] - r["init_acc"])
            cells.append(f"{s['acc']:.5f} (step {s['step']}, {s['seconds']:.0f} s)")
        lines.append(f"| {r['seed']} | {r['init_acc']:.5f} | {r['updates'][0]['acc']:.5f} | " + " | ".join(cells) + " |")
    lines.append("| mean final - init | | | " + " | ".join(
        f"{np.mean(g):+.5f}" if len(g) == len(rows) else "-" for g in gains.values()) + " |")
    per_update = [np.diff([u["seconds"] for u in r["updates"]]).mean() for r in rows]
    body = f"""`DEC_DATA_DIR=../shared/data python bench/bench_self_train.py run --seeds 0 1 2 --max-iter 2100`, then `python bench/bench_self_train.py report`.

Machine: {rows[0]['machine']}. Each seed is one fit of the default recipe with the stop rule off (`tol=0`), its
self-training run to {max(r['updates'][-1]['step'] for r in rows)} steps; ACC at every update of the target P
(every {rows[0]['update_interval']} steps). Up to a rule's stop the run is the one that rule gives, so each
column is the final ACC, the step and the seconds into self-training at which that rule stops: the paper's
(`tol` = 0.1 % of labels changed since the previous update), or the paper's once `min_iter` steps have run.
One update interval ({rows[0]['update_interval']} steps and a pass over the data for P) took {np.mean(per_update):.2f} s here.

{chr(10).join(lines)}
"""
    write_section("Self-training length on MNIST", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-iter", type=int, default=2100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.command == "run":
        for seed in a.seeds:
            row = run(seed, a.max_iter)
            print(f"seed {seed}: init {row['init_acc']:.5f}, " + ", ".join(
                f"{u['step']}: {u['acc']:.5f}" for u in row["updates"][::5]), flush=True)
    else:
        report()


if __name__ == "__main__":
    main()
