"""Wall time of the default MNIST run, this tree against an earlier commit, side by side in one run.

    DEC_DATA_DIR=../shared/data python bench/bench_walltime.py --ref dab6644 --seeds 0

For each seed, starts two processes at the same moment, each with the same number of torch threads:
the earlier commit's estimator defaults (``bench/bench_mnist.py`` of a git worktree checked out at
``--ref``) and this tree's (``bench/bench_quality.py run --datasets mnist --recipes default``, which
also adds the row to the quality table). Both time the same work: pretraining plus fit, data loading
excluded. The machine is shared, so only the ratio within one pair means something.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _report import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def _json_rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_pair(old_tree: Path, seed: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    old = subprocess.Popen(
        [sys.executable, "bench/bench_mnist.py", "--seeds", str(seed), "--section", "walltime-scratch"],
        cwd=old_tree, env={**env, "PYTHONPATH": str(old_tree)}, stdout=subprocess.PIPE, text=True)
    new = subprocess.Popen(
        [sys.executable, "bench/bench_quality.py", "run", "--datasets", "mnist", "--recipes", "default", "--seeds", str(seed)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    old_out, _ = old.communicate()
    new_out, _ = new.communicate()
    if old.returncode or new.returncode:
        raise SystemExit(f"a benchmark process failed (old rc {old.returncode}, new rc {new.returncode})")
    o, n = _json_rows(old_out)[0], _json_rows(new_out)[0]
    return {"seed": seed, "old_min": o["wall_min"], "new_min": n["minutes"], "old_acc": o["dec_acc"], "new_acc": n["acc"],
            "ratio": n["minutes"] / o["wall_min"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="dab6644", help="the earlier commit (default: main before the manifold default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each of the two processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.ref], cwd=ROOT, check=True, capture_output=True)
        try:
            rows = []
            for seed in args.seeds:
                rows.append(run_pair(old_tree, seed, args.threads))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    lines = ["| seed | earlier default: minutes | this default: minutes | ratio (this / earlier) | earlier DEC ACC | this DEC ACC |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['old_min']:.1f} | {r['new_min']:.1f} | {r['ratio']:.2f} | {r['old_acc']:.3f} | {r['new_acc']:.3f} |"
              for r in rows]
    if len(rows) > 1:
        lines.append(f"| median | {np.median([r['old_min'] for r in rows]):.1f} | {np.median([r['new_min'] for r in rows]):.1f} | "
                     f"{np.median([r['ratio'] for r in rows]):.2f} | | |")
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_walltime.py --ref {args.ref} --seeds "
        f"{' '.join(map(str, args.seeds))} --threads {args.threads}`\n\n"
        f"Machine: {machine().split(',')[0]}, {args.threads} torch thread(s) per process, the two processes started together "
        f"on full MNIST. Earlier default: commit {args.ref} (k-means initialisation); this default: manifold (UMAP + GMM) "
        "initialisation and distillation. Minutes: pretraining + fit, data loading excluded.\n\n" + "\n".join(lines)
    )
    print(body)
    write_section("Default run wall time: side by side with the earlier default", body)


if __name__ == "__main__":
    main()
