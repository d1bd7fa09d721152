"""Time to accuracy on full MNIST: the main job against the UMAP + GMM baseline, one job at a time.

    DEC_DATA_DIR=../shared/data python bench/bench_main_job.py --pairs 3 --previous fd8fef7 --best

Each pair runs, one after the other on an otherwise idle machine, the baseline (`bench/baseline.py
mnist 0`: UMAP + GMM of the raw pixels) and the README's main job (`mlflow run . -e cluster -P
dataset=mnist --env-manager local`, with `-P precision=fp32` so that machines with and without bf16
compare), each as a whole process timed from outside (data loading, MLflow, export and figures
included). `--previous REF` adds one run of the main job of an earlier commit (a git worktree of
REF) and `--best` one of `-P preset=best`; `--keep-previous` carries the other previous defaults' rows over
from the last table (marked "recorded earlier"), where timing them again would take up to 24 minutes. Before the
pairs, both jobs run once on small data, untimed (`--no-warmup` skips it): UMAP's numba code compiles on first
use. Writes the table and a minutes-against-ACC figure
(bench/figures/time_to_accuracy.png) to BENCHMARKS.md, section "Time to accuracy on MNIST".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import BENCHMARKS, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "bench" / "figures" / "time_to_accuracy.png"
RESULTS = ROOT / "bench" / "out" / "main_job.jsonl"


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """Run ``cmd`` to completion; (wall seconds, its stdout and stderr). A failure stops the bench."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def baseline(seed: int) -> dict:
    seconds, out = timed([sys.executable, str(ROOT / "bench" / "baseline.py"), "mnist", str(seed)], ROOT / "bench",
                         dict(os.environ))
    acc, nmi = (float(v) for v in re.search(r"ACC ([\d.]+) NMI ([\d.]+)", out).groups())
    return {"job": "baseline (UMAP + GMM of the pixels)", "seconds": seconds, "acc": acc, "nmi": nmi}


def main_job(project: Path, label: str, extra: list[str], dataset: str = "mnist") -> dict:
    """The main job of ``project`` in a fresh tracking store; its final ACC read back from the run."""
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONPATH": str(project)}
        cmd = ["mlflow", "run", str(project), "-e", "cluster", "-P", f"dataset={dataset}", "-P", "precision=fp32",
               *extra, "--env-manager", "local"]
        seconds, out = timed(cmd, project, env)
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`dec.stage` = 'cluster'", max_results=5)
        run = next(r for r in runs if "final_acc" in r.data.metrics)
        m, p = run.data.metrics, run.data.params
    return {"job": label, "seconds": seconds, "acc": m["final_acc"], "nmi": m["final_nmi"],
            "init_acc": m.get("init_acc"), "resolved": {k: v for k, v in p.items() if k.endswith("_resolved")}}


def warm_up() -> None:
    """Both jobs once on small data, untimed: UMAP's numba code compiles on first use and is cached on disk (48 s
    of a first baseline run here), which would otherwise fall on whichever job runs first."""
    from sklearn.datasets import load_digits

    start = time.perf_counter()
    timed([sys.executable, str(ROOT / "bench" / "baseline.py"), "mnist_test", "0"], ROOT / "bench", dict(os.environ))
    with tempfile.TemporaryDirectory() as folder:
        digits = load_digits()
        np.savez(Path(folder) / "digits.npz", x=digits.data.astype(np.float32), y=digits.target)
        main_job(ROOT, "warm-up", [], dataset=str(Path(folder) / "digits.npz"))
    print(f"warm-up (baseline on mnist_test, main job on digits), untimed: {time.perf_counter() - start:.0f} s", flush=True)


def worktree(ref: str) -> Path:
    path = ROOT / "bench" / "out" / f"worktree-{ref}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)
    return path


def recorded_previous(skip: str = "") -> list[dict]:
    """The previous defaults' rows of the last table in BENCHMARKS.md (one run each), as rows of this run marked
    recorded earlier; not the one of commit ``skip``, timed again in this run."""
    section = BENCHMARKS.read_text().split("## Time to accuracy on MNIST", 1)[-1].split("\n## ", 1)[0]
    pattern = r"^\| (previous default \(([^)]*)\))(?: \(recorded earlier\))? \| 1 \| ([\d.]+) \([^)]*\) \| ([\d.]+) \| ([\d.]+) \|"
    return [{"job": f"{m[1]} (recorded earlier)", "seconds": float(m[3]) * 60, "acc": float(m[4]), "nmi": float(m[5])}
            for m in re.finditer(pattern, section, re.M) if m[2] != skip]


def figure(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for job in dict.fromkeys(r["job"] for r in rows):
        sel = [r for r in rows if r["job"] == job]
        ax.scatter([r["seconds"] / 60 for r in sel], [r["acc"] for r in sel], label=job, s=40)
    ax.set_xlabel("wall minutes, whole process (2-core machine, fp32)")
    ax.set_ylabel("ACC on the 70,000 MNIST digits")
    ax.set_title("Time to accuracy on MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="baseline / main job pairs, run alternately")
    ap.add_argument("--previous", default="", help="git ref of an earlier main job to time once (e.g. fd8fef7)")
    ap.add_argument("--best", action="store_true", help="also time -P preset=best once")
    ap.add_argument("--keep-previous", action="store_true",
                    help="carry the previous defaults' rows of the last table over from BENCHMARKS.md, marked as recorded "
                         "earlier (timing the 75-epoch one again takes 24 min), but for --previous, timed again")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed warm-up of both jobs on small data (numba compiles UMAP's code on first use)")
    args = ap.parse_args()
    rows = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def keep(row: dict) -> None:
        rows.append(row)
        with RESULTS.open("a") as f:
            f.write(json.dumps({**row, "when": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
        print(json.dumps(row), flush=True)

    if args.warmup:
        warm_up()
    for _ in range(args.pairs):
        keep(baseline(0))
        keep(main_job(ROOT, "default main job", []))
    if args.best:
        keep(main_job(ROOT, "preset=best", ["-P", "preset=best"]))
    if args.previous:
        keep(main_job(worktree(args.previous), f"previous default ({args.previous})", []))
    if args.keep_previous:
        rows.extend(recorded_previous(skip=args.previous))
    figure(rows)
    base = [r["seconds"] for r in rows if r["job"].startswith("baseline")]
    ratios = [d["seconds"] / b["seconds"] for b, d in zip(rows[0: 2 * args.pairs: 2], rows[1: 2 * args.pairs: 2])]
    lines = ["| job | runs | wall minutes, median (min-max) | ACC | NMI | time / baseline's |", "|---|---|---|---|---|---|"]
    for job in dict.fromkeys(r["job"] for r in rows):
        sel = [r for r in rows if r["job"] == job]
        minutes = [r["seconds"] / 60 for r in sel]
        accs = ", ".join(f"{r['acc']:.4f}" for r in sel)
        lines.append(f"| {job} | {len(sel)} | {np.median(minutes):.2f} ({min(minutes):.2f}-{max(minutes):.2f}) | {accs} | "
                     f"{np.median([r['nmi'] for r in sel]):.3f} | {np.median([r['seconds'] for r in sel]) / np.median(base):.2f} |")
    resolved = next((r["resolved"] for r in rows if r.get("resolved")), {})
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_main_job.py --pairs {args.pairs}"
        f"{' --previous ' + args.previous if args.previous else ''}{' --best' if args.best else ''}"
        f"{' --keep-previous' if args.keep_previous else ''}{'' if args.warmup else ' --no-warmup'}`\n\n"
        f"Machine: {machine()}; one job at a time. Each job is a whole process (imports, data loading, MLflow, "
        "export and figures included), seed 0, `precision=fp32` for every main job, after an untimed warm-up of both on "
        "small data (UMAP's numba code compiles on first use) unless `--no-warmup`; the main job's settings resolved to "
        f"{', '.join(f'{k}={v}' for k, v in sorted(resolved.items()) if k in ('augment_resolved', 'image_shape_resolved', 'pretrain_epochs_resolved', 'precision_resolved'))}.\n\n"
        + "\n".join(lines)
        + f"\n\nMain job / baseline, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f}).\n\n"
        f"![minutes against ACC]({FIGURE.relative_to(BENCHMARKS.parent)})\n"
    )
    print(body)
    write_section("Time to accuracy on MNIST", body)


if __name__ == "__main__":
    main()
