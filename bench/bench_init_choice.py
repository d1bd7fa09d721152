"""Can a label-free score choose between the k-means and the manifold initialisation? Measured on cached autoencoders.

    DEC_DATA_DIR=../shared/data python bench/bench_init_choice.py digits-s0 wine-s0 mnist-s1 mnist-s2

Each argument names an autoencoder that `bench/bench_quality.py run` pretrained and kept in
bench/out/ae/ (dataset-s<seed>, default pretraining settings). On its embedding z of the whole
dataset, the two initialisations `cluster` offers are computed as `dec_mlflow.initialisation`
computes them: k-means (n_init=20) and UMAP + full GMM (init=manifold). For each, the ACC against
the labels and label-free scores of the labelling: silhouette (5,000-point sample) and
Davies-Bouldin in z, silhouette in the UMAP map. A score could choose the initialisation only if,
on every dataset, the initialisation it prefers is the one with the higher ACC.
"""

from __future__ import annotations

import argparse
import json
import time

from sklearn.metrics import davies_bouldin_score

from _report import machine, write_section
from bench_quality import cached_embedding
from dec_mlflow import trust
from dec_mlflow.initialisation import cluster_map, kmeans_init, umap_map
from dec_mlflow.metrics import cluster_accuracy


def measure(tag: str) -> dict:
    seed, y, k, z = cached_embedding(tag)
    start = time.perf_counter()
    u = umap_map(z, k, seed=seed)  # manifold_init is cluster_map(z, umap_map(z))
    inits = {"kmeans": kmeans_init(z, k, n_init=20, seed=seed), "manifold": cluster_map(z, u, k, seed=seed)}
    row = {"tag": tag, "seconds": time.perf_counter() - start}
    for name, init in inits.items():
        row[f"acc_{name}"] = cluster_accuracy(y, init.labels)
        row[f"silhouette_z_{name}"] = trust.silhouette(z, init.labels, seed=seed)
        row[f"davies_bouldin_z_{name}"] = float(davies_bouldin_score(z, init.labels))
        row[f"silhouette_umap_{name}"] = trust.silhouette(u, init.labels, seed=seed)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tags", nargs="+", help="dataset-s<seed> of autoencoders in bench/out/ae/, e.g. mnist-s1")
    args = ap.parse_args()
    rows = []
    for tag in args.tags:
        rows.append(measure(tag))
        print(json.dumps(rows[-1], default=float), flush=True)
    better = {r["tag"]: "manifold" if r["acc_manifold"] > r["acc_kmeans"] else "kmeans" for r in rows}
    scores = {"silhouette in z": ("silhouette_z", max), "Davies-Bouldin in z": ("davies_bouldin_z", min),
              "silhouette in the UMAP map": ("silhouette_umap", max)}
    lines = ["| autoencoder | k-means ACC | manifold ACC | " + " | ".join(f"{s}: k-means / manifold" for s in scores) + " |",
             "|---|---|---|" + "---|" * len(scores)]
    for r in rows:
        cells = [f"{r[f'{key}_kmeans']:.3f} / {r[f'{key}_manifold']:.3f}" for key, _ in scores.values()]
        lines.append(f"| {r['tag']} | {r['acc_kmeans']:.3f} | {r['acc_manifold']:.3f} | " + " | ".join(cells) + " |")
    verdicts = []
    for name, (key, best) in scores.items():
        picks = {r["tag"]: best(("kmeans", "manifold"), key=lambda n: r[f"{key}_{n}"]) for r in rows}
        right = sum(picks[t] == better[t] for t in picks)
        verdicts.append(f"- {name} picks the better initialisation on {right} of {len(rows)} "
                        f"(it picks {', '.join(f'{t}: {p}' for t, p in picks.items())}).")
    body = (
        f"Command: `DEC_DATA_DIR=../shared/data python bench/bench_init_choice.py {' '.join(args.tags)}`\n\n"
        f"Machine: {machine()}. The two initialisations `cluster` offers, on the same pretrained "
        "autoencoders (those of the quality table), with label-free scores of each labelling.\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"
    )
    print(body)
    write_section("Choosing the initialisation without labels", body)


if __name__ == "__main__":
    main()
