"""Wall time of the default MNIST run, this tree against an earlier commit, side by side in one run.

    DEC_DATA_DIR=../shared/data python bench/bench_walltime.py --ref dab6644 --seeds 0

For each seed, starts two processes at the same moment, each with the same number of torch threads:
the earlier commit's estimator defaults (``bench/bench_mnist.py`` of a git worktree checked out at
``--ref``) and this tree's (``bench/bench_quality.py run --datasets mnist --recipes default``, which
also adds the row to the quality table; ``--fresh``: it pretrains, never reusing a kept autoencoder).
Both time the same work: pretraining plus fit, data loading excluded; each process's CPU minutes are
reported too. The machine is shared, so only the ratios within one pair mean something.
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


def _finish(process: subprocess.Popen, out) -> tuple[int, float, str]:
    """Wait for ``process``; (return code, its CPU minutes, user + system, what it printed to ``out``)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    return process.returncode, (usage.ru_utime + usage.ru_stime) / 60, out.read()


def run_pair(old_tree: Path, seed: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as old_out, tempfile.TemporaryFile("w+") as new_out:
        old = subprocess.Popen(
            [sys.executable, "bench/bench_mnist.py", "--seeds", str(seed), "--section", "walltime-scratch"],
            cwd=old_tree, env={**env, "PYTHONPATH": str(old_tree)}, stdout=old_out, text=True)
        new = subprocess.Popen(
            [sys.executable, "bench/bench_quality.py", "run", "--datasets", "mnist", "--recipes", "default", "--seeds", str(seed),
             "--fresh"],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=new_out, text=True)
        (old_rc, old_cpu, old_text), (new_rc, new_cpu, new_text) = _finish(old, old_out), _finish(new, new_out)
    if old_rc or new_rc:
        raise SystemExit(f"a benchmark process failed (old rc {old_rc}, new rc {new_rc})")
    o, n = _json_rows(old_text)[0], _json_rows(new_text)[0]
    return {"seed": seed, "old_min": o["wall_min"], "new_min": n["minutes"], "old_acc": o["dec_acc"], "new_acc": n["acc"],
            "ratio": n["minutes"] / o["wall_min"], "old_cpu_min": old_cpu, "new_cpu_min": new_cpu, "cpu_ratio": new_cpu / old_cpu}


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
    lines = ["| seed | earlier default: minutes | this default: minutes | ratio (this / earlier) | earlier: CPU minutes | "
             "this: CPU minutes | CPU ratio | earlier DEC ACC | this DEC ACC |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['old_min']:.1f} | {r['new_min']:.1f} | {r['ratio']:.2f} | {r['old_cpu_min']:.1f} | "
              f"{r['new_cpu_min']:.1f} | {r['cpu_ratio']:.2f} | {r['old_acc']:.3f} | {r['new_acc']:.3f} |" for r in rows]
    if len(rows) > 1:
        med = {k: np.median([r[k] for r in rows]) for k in ("old_min", "new_min", "ratio", "old_cpu_min", "new_cpu_min", "cpu_ratio")}
        lines.append(f"| median | {med['old_min']:.1f} | {med['new_min']:.1f} | {med['ratio']:.2f} | {med['old_cpu_min']:.1f} | "
                     f"{med['new_cpu_min']:.1f} | {med['cpu_ratio']:.2f} | | |")
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_walltime.py --ref {args.ref} --seeds "
        f"{' '.join(map(str, args.seeds))} --threads {args.threads}`\n\n"
        f"Machine: {machine().split(',')[0]}, {args.threads} torch thread(s) per process, the two processes started together "
        f"on full MNIST. Earlier default: commit {args.ref} (k-means initialisation); this default: manifold (UMAP + GMM) "
        "initialisation and distillation. Minutes: pretraining + fit, data loading excluded. CPU minutes: user + system "
        "time of each whole process (data loading, the baseline k-means in the embedding included): on a shared machine "
        "the two processes do not finish under the same load, and CPU time is what load does not change.\n\n" + "\n".join(lines)
    )
    print(body)
    write_section("Default run wall time: side by side with the earlier default", body)


if __name__ == "__main__":
    main()
