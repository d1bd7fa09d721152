"""How many GMM starts the manifold initialisation needs: one start against the most likely of several.

    DEC_DATA_DIR=../shared/data python bench/bench_gmm_starts.py mnist-s1 mnist-s2 digits-s0 wine-s0 breast_cancer-s0

Each argument names an autoencoder that `bench/bench_quality.py run` pretrained and kept in
bench/out/ae/ (dataset-s<seed>). On its embedding of the whole dataset, the UMAP map is computed as
`init=manifold` computes it (`dec_mlflow.initialisation.umap_map`, the autoencoder's seed); then a
full-covariance GMM is fitted to the map `--starts` times with one start each (random_state = seed,
seed + 1, ...) and once with n_init = `--starts` (what `cluster_map` does, GMM_N_INIT). For each: the
mean log-likelihood per point (the label-free criterion n_init uses) and the ACC against the labels.
"""

from __future__ import annotations

import argparse
import json
import time

from _report import machine, write_section
from bench_quality import cached_embedding
from dec_mlflow.initialisation import map_gmm, umap_map
from dec_mlflow.metrics import cluster_accuracy


def measure(tag: str, starts: int) -> dict:
    seed, y, k, z = cached_embedding(tag)
    u = umap_map(z, k, seed=seed)
    single = []
    for s in range(seed, seed + starts):
        g = map_gmm(u, k, seed=s, n_init=1)
        single.append({"seed": s, "loglik": float(g.score(u)), "acc": cluster_accuracy(y, g.predict(u))})
    start = time.perf_counter()
    g = map_gmm(u, k, seed=seed, n_init=starts)
    seconds = time.perf_counter() - start
    return {"tag": tag, "n": len(y), "single": single, "multi_loglik": float(g.score(u)),
            "multi_acc": cluster_accuracy(y, g.predict(u)), "multi_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tags", nargs="+", help="dataset-s<seed> of autoencoders in bench/out/ae/, e.g. mnist-s1")
    ap.add_argument("--starts", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for tag in args.tags:
        rows.append(measure(tag, args.starts))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"| autoencoder | one start (seed): ACC | one start: worst ACC over {args.starts} seeds (log-lik) | "
             f"one start: best ACC over {args.starts} seeds (log-lik) | {args.starts} starts, most likely kept: ACC (log-lik) | "
             f"seconds for {args.starts} starts |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        worst, best = min(r["single"], key=lambda s: s["acc"]), max(r["single"], key=lambda s: s["acc"])
        lines.append(f"| {r['tag']} | {r['single'][0]['acc']:.3f} | {worst['acc']:.3f} ({worst['loglik']:.2f}) | "
                     f"{best['acc']:.3f} ({best['loglik']:.2f}) | **{r['multi_acc']:.3f}** ({r['multi_loglik']:.2f}) | "
                     f"{r['multi_seconds']:.1f} |")
    bad = [(s, r) for r in rows for s in r["single"] if s["acc"] < r["multi_acc"] - 0.05]
    less_likely = sum(s["loglik"] < r["multi_loglik"] for s, r in bad)
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_gmm_starts.py {' '.join(args.tags)} --starts {args.starts}`\n\n"
        f"Machine: {machine()}. The GMM of the manifold initialisation on the UMAP map of cached autoencoders (those of "
        "the quality table): one start each for the seeds seed..seed+{0}, against the most likely of {1} starts "
        "(`GMM_N_INIT` in `dec_mlflow/initialisation.py`). log-lik: mean log-likelihood per point, the label-free "
        "criterion.\n\n".format(args.starts - 1, args.starts)
        + "\n".join(lines)
        + f"\n\n- {len(bad)} of {sum(len(r['single']) for r in rows)} single starts were more than 0.05 ACC below the "
        f"most likely of the starts; {less_likely} of those {len(bad)} had a lower log-likelihood than the start kept.\n"
    )
    print(body)
    write_section("Manifold initialisation: GMM starts", body)


if __name__ == "__main__":
    main()
