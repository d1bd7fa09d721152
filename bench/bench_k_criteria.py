"""Which label-free criterion finds the number of clusters: the evidence behind n_clusters='auto'.

For each dataset and seed of ``bench_auto_k`` (the same map: the default recipe's input space, one UMAP of
10 components, and UMAP's neighbour graph), the candidates ``choose_k`` fitted until it cut the map along
density valleys instead (one GMM per k = 2..15, the best of five starts on a 4,000-point subsample,
``dec_mlflow.initialisation.k_candidates``) are scored by every criterion below, and each criterion's pick is
compared with the true k. ``bench_auto_k`` runs today's ``choose_k`` on the same maps.

- silhouette in the map (what ``choose_k`` used; highest wins);
- modularity of the partition on UMAP's graph (``dec_mlflow.trust.modularity``; highest wins);
- BIC and ICL of the mixture on its subsample (lowest wins; ICL = BIC + twice the posterior entropy);
- eigengap of the graph's normalised adjacency (the k after which its k-th and (k+1)-th largest
  eigenvalues differ most);
- the largest pairwise cut: for two clusters a and b, the link weight between them over the smaller of
  their link volumes. Not a pick (it only grows as k grows); the table shows it at k - 1, k and k + 1,
  where a threshold would have to separate them.

Results accumulate in bench/out/k_criteria.jsonl; ``report`` writes the section "Criteria for the number of
clusters" of BENCHMARKS.md.

    DEC_DATA_DIR=../shared/data python bench/bench_k_criteria.py run --datasets digits wine --seeds 0 1 2
    python bench/bench_k_criteria.py report
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from _report import latest_rows, machine, write_section
from bench_auto_k import ORDER, dataset
from bench_quality import OUT
from dec_mlflow.initialisation import MAX_MAP_DIM, input_space, k_candidates, umap_map
from dec_mlflow.scaling import auto_scaling, fit_scaling
from dec_mlflow.trust import modularity

RESULTS = OUT / "k_criteria.jsonl"
K_MAX = 15
PICKS = {"silhouette": max, "modularity": max, "bic": min, "icl": min, "eigengap": max}


def largest_pairwise_cut(labels: np.ndarray, graph: sp.csr_matrix, k: int) -> float:
    """max over cluster pairs a != b of links(a, b) / min(volume(a), volume(b)) on the symmetric ``graph``."""
    n = len(labels)
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
    links = (onehot.T @ graph @ onehot).toarray()
    volume = links.sum(1)
    cut = links / np.maximum(np.minimum.outer(volume, volume), 1e-12)
    np.fill_diagonal(cut, 0.0)
    return float(cut.max())


def eigengaps(graph: sp.csr_matrix, k_max: int) -> dict[int, float]:
    """{k: lambda_k - lambda_(k+1)} for the largest eigenvalues of D^-1/2 W D^-1/2 (1-based, descending)."""
    degree = np.asarray(graph.sum(1)).ravel()
    inv = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    values = np.sort(eigsh(inv @ graph @ inv, k=k_max + 2, which="LA", tol=1e-6, v0=np.ones(graph.shape[0]))[0])[::-1]
    return {k: float(values[k - 1] - values[k]) for k in range(2, k_max + 1)}


def run_one(name: str, seed: int) -> dict:
    x, y, shape = dataset(name)
    t0 = time.perf_counter()
    offset, scale = fit_scaling(x, auto_scaling(x))
    space = input_space(x, offset, scale, seed=seed, image_shape=shape)
    u, graph = umap_map(space.points, MAX_MAP_DIM, seed=seed, shifted=space.shifted, return_graph=True)
    graph = sp.csr_matrix(graph, dtype=np.float64)
    graph = (graph + graph.T) / 2
    t1 = time.perf_counter()
    gaps = eigengaps(graph, K_MAX)
    scores: dict[str, dict[int, float]] = {c: {} for c in [*PICKS, "cut"]}
    for k, silhouette, mixture, sample in k_candidates(u, 2, K_MAX, seed=seed):
        labels = mixture.predict(u)
        posteriors = mixture.predict_proba(sample)
        bic = float(mixture.bic(sample))
        scores["silhouette"][k] = silhouette
        scores["modularity"][k] = modularity(labels, graph)
        scores["bic"][k] = bic
        scores["icl"][k] = bic - 2.0 * float((posteriors * np.log(np.clip(posteriors, 1e-300, None))).sum())
        scores["eigengap"][k] = gaps[k]
        scores["cut"][k] = largest_pairwise_cut(labels, graph, k)
    picks = {c: PICKS[c](scores[c], key=lambda k: (scores[c][k], -k) if PICKS[c] is max else (scores[c][k], k))
             for c in PICKS}
    return {"dataset": name, "seed": seed, "n": len(x), "true_k": int(len(np.unique(y))), "picks": picks,
            "scores": {c: {str(k): v for k, v in s.items()} for c, s in scores.items()},
            "map_seconds": t1 - t0, "criteria_seconds": time.perf_counter() - t1, "machine": machine(),
            "when": time.strftime("%Y-%m-%d %H:%M")}


def report(note: str = "") -> None:
    rows = sorted(latest_rows(RESULTS, ("dataset", "seed")), key=lambda r: (ORDER.index(r["dataset"]), r["seed"]))
    lines = ["| data | true k | seed | " + " | ".join(PICKS) + " | largest pairwise cut at k - 1 / k / k + 1 |",
             "|---|---|---|" + "---|" * len(PICKS) + "---|"]
    for r in rows:
        k, cut = r["true_k"], r["scores"]["cut"]
        cuts = " / ".join(f"{cut[str(j)]:.3f}" if str(j) in cut else "-" for j in (k - 1, k, k + 1))
        picks = " | ".join(f"{r['picks'][c]}" + ("" if r["picks"][c] == k else " (miss)") for c in PICKS)
        lines.append(f"| {r['dataset']} | {k} | {r['seed']} | {picks} | {cuts} |")
    hits = ", ".join(f"{c} {sum(r['picks'][c] == r['true_k'] for r in rows)}" for c in PICKS)
    body = (
        "Which label-free criterion finds k on the candidates `n_clusters=auto` fitted until it cut the map along "
        "density valleys instead (one map per dataset and seed, one GMM per k = 2..15): the k each criterion picks, and the largest pairwise cut "
        "of the partition on UMAP's graph (links between two clusters over the smaller one's link volume) at "
        "the true k and its neighbours. `bench/bench_k_criteria.py` says how each is computed.\n\n"
        f"Machine: {'; '.join(sorted({r['machine'] for r in rows}))}. True k found, of {len(rows)}: {hits}.\n\n"
        + (note + "\n\n" if note else "")
        + "\n".join(lines) + "\n\n"
        "Command: `DEC_DATA_DIR=../shared/data python bench/bench_k_criteria.py run --datasets ... --seeds ...`, "
        "then `python bench/bench_k_criteria.py report`. Today's choice, on the same maps: section \"Choosing the "
        "number of clusters\".\n"
    )
    print(body)
    write_section("Criteria for the number of clusters", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--datasets", nargs="+", default=ORDER, choices=ORDER)
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    rep = sub.add_parser("report")
    rep.add_argument("--note", default="", help="a paragraph printed below the counts (what the table shows)")
    args = ap.parse_args()
    if args.command == "report":
        return report(args.note)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        for seed in args.seeds:
            row = run_one(name, seed)
            print(json.dumps({k: row[k] for k in ("dataset", "seed", "true_k", "picks", "map_seconds",
                                                  "criteria_seconds")}, default=float), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    main()
