"""The paper's experiments as plain functions: the baselines table, seed stability, k and imbalance.

Arrays in, arrays and dicts out; no MLflow (the stages in ``dec_mlflow.lifecycle_experiments``
log what these return). Labels are used only for scoring, never for a choice the method makes.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from dec_mlflow import paper
from dec_mlflow.callbacks import Callback
from dec_mlflow.estimator import DEC, PretrainedAutoencoder
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.pretraining import embedding_kmeans
from dec_mlflow.rows import dense

# method id -> name in tables (the paper's names where the paper has the method)
METHODS = {
    "kmeans": "k-means",
    "ae_kmeans": "AE+k-means",
    "dec_frozen": "DEC w/o backprop",
    "dec": "DEC",
    "idec": "IDEC",
}
CRITERIA = ("reconstruction", "inertia")


@dataclass
class MethodResult:
    """One method on one seed."""

    labels: np.ndarray  # (n_samples,) int64
    seconds: float  # wall time of the method itself (pretraining excluded)
    info: dict = field(default_factory=dict)  # n_iter, converged, kl_loss, inertia, ... as available


def run_method(method: str, X: np.ndarray, ae: PretrainedAutoencoder, est: DEC, *,
               callback: Callback | None = None, overrides: dict | None = None) -> MethodResult:
    """Cluster raw ``X`` with ``method``, given the pretrained ``ae`` and the DEC settings ``est``.

    ``est.random_state`` seeds k-means and self-training; ``overrides`` are DEC parameters for
    this method only (IDEC's optimiser, for instance). 'kmeans' clusters the scaled input the
    autoencoder saw; 'ae_kmeans' its embedding; the DEC variants start from that k-means.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    start = time.perf_counter()
    if method == "kmeans":
        km = KMeans(est.n_clusters, n_init=est.n_init, random_state=est.random_state)
        # k-means on the raw input needs it whole, as a dense array in memory (sparse and memory-mapped X included)
        labels = km.fit((dense(X, slice(None)) - ae.offset) * ae.scale).labels_.astype(np.int64)
        return MethodResult(labels, time.perf_counter() - start)
    if method == "ae_kmeans":
        labels, inertia = embedding_kmeans(ae, X, est.n_clusters, n_init=est.n_init, seed=est.random_state)
        return MethodResult(labels, time.perf_counter() - start, {"inertia": inertia})
    variant = {"dec_frozen": "frozen", "dec": "dec", "idec": "idec"}[method]
    fitted = DEC(**{**est.get_params(), **(overrides or {}), "variant": variant}).fit(X, autoencoder=ae, callback=callback)
    info = {"n_iter": fitted.n_iter_, "converged": float(fitted.converged_), "kl_loss": fitted.kl_loss_,
            "trust_score": fitted.trust_score_}
    return MethodResult(fitted.labels_, time.perf_counter() - start, info)


def summarize(rows: list[dict]) -> pd.DataFrame:
    """Mean and std over seeds of each method's scores.

    ``rows`` hold 'method', 'seed' and score columns (acc, nmi, ari, seconds); the result has one
    row per method in ``METHODS`` order with columns '<score>_mean', '<score>_std' and 'n_seeds'.
    """
    frame = pd.DataFrame(rows)
    scores = [c for c in ("acc", "nmi", "ari", "seconds") if c in frame]
    grouped = frame.groupby("method", sort=False)[scores]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    out["n_seeds"] = grouped.size()
    order = [m for m in METHODS if m in out.index]
    return out.loc[order].reset_index()


def selection_spread(per_seed: pd.DataFrame, criterion: str, n_candidates: int, score: str = "acc") -> dict:
    """Seed spread of ``score`` when the autoencoder is chosen among ``n_candidates`` by ``criterion``.

    ``per_seed`` has one row per seed with the criterion columns (lower is better) and the score
    of the method that follows pretraining. For every subset of ``n_candidates`` seeds the
    candidate with the lowest criterion is what ``DEC(n_pretrain_init=n_candidates)`` would keep
    (it keeps that candidate's seed for the rest of the fit, so its score is the seed's own).
    Returns mean, std, min and max of the kept scores over all subsets, and the subset count.
    """
    if not 1 <= n_candidates <= len(per_seed):
        raise ValueError(f"n_candidates must be between 1 and the number of seeds ({len(per_seed)}); got {n_candidates}")
    kept = [per_seed.loc[list(subset)].sort_values(criterion).iloc[0][score]
            for subset in itertools.combinations(per_seed.index, n_candidates)]
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "min": float(np.min(kept)),
            "max": float(np.max(kept)), "n_subsets": len(kept)}


def scored_rows(y: np.ndarray | None, method: str, seed: int, result: MethodResult) -> dict:
    """The table row of one method on one seed (scores only when labels exist)."""
    row = {"method": method, "seed": seed, "seconds": result.seconds, **result.info}
    if y is not None:
        row.update(clustering_scores(y, result.labels))
    return row


def run_choice(rows: list[dict], method: str) -> dict:
    """Which seed's ``method`` run to keep: by the label-free trust score, and (with labels) by ACC.

    ``rows`` are :func:`scored_rows` dicts. Returns ``label_free_seed`` (highest ``trust_score``)
    and, when the rows carry ``acc``, ``by_labels_seed`` (highest ACC) and the ACC of both picks.
    """
    mine = [r for r in rows if r["method"] == method and "trust_score" in r]
    if not mine:
        return {}
    free = max(mine, key=lambda r: r["trust_score"])
    choice = {"method": method, "label_free_seed": int(free["seed"]), "label_free_trust_score": float(free["trust_score"])}
    if "acc" in free:
        best = max(mine, key=lambda r: r["acc"])
        choice.update(label_free_acc=float(free["acc"]), by_labels_seed=int(best["seed"]), by_labels_acc=float(best["acc"]))
    return choice


def choice_markdown(choice: dict) -> str:
    """One sentence naming the run kept without labels, next to the one labels would pick."""
    if not choice:
        return ""
    text = (f"Without labels, keep seed {choice['label_free_seed']} of {METHODS[choice['method']]} "
            f"(highest trust score, {choice['label_free_trust_score']:.3f})")
    if "by_labels_seed" in choice:
        text += (f": ACC {_pct(choice['label_free_acc'])}; labels would pick seed {choice['by_labels_seed']} "
                 f"(ACC {_pct(choice['by_labels_acc'])})")
    return text + ".\n"


# ---------------------------------------------------------------------------- number of clusters
def train_validation_split(n_samples: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train, validation) index arrays; the validation part has round(n * fraction) rows."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be > 0 and < 1; got {validation_fraction!r}")
    n_val = int(round(n_samples * validation_fraction))
    if n_val < 1 or n_val >= n_samples:
        raise ValueError(f"validation_fraction={validation_fraction} leaves {n_val} of {n_samples} samples for validation")
    perm = np.random.default_rng(seed).permutation(n_samples)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def generalizability(est: DEC, X_train: np.ndarray, X_val: np.ndarray) -> dict:
    """The paper's G = L_train / L_validation (section 5.3) of a fitted DEC.

    Each L is KL(P || Q) on that split with P computed from the split's own Q; G near 1 means the
    clustering found on the training data holds on unseen data, a sharp drop means over-splitting.
    """
    l_train, l_val = est.kl_loss(X_train), est.kl_loss(X_val)
    return {"kl_train": l_train, "kl_validation": l_val, "generalizability": l_train / l_val}


def recommend_k(ks: list[int], g: list[float]) -> int:
    """The k just before the largest drop of G between consecutive tried k (paper Figure 5).

    With G flat or rising everywhere, the largest k tried is returned.
    """
    if len(ks) != len(g) or not ks:
        raise ValueError(f"ks and g must be non-empty and of equal length; got {len(ks)} and {len(g)}")
    order = np.argsort(ks)
    ks_sorted, g_sorted = np.asarray(ks)[order], np.asarray(g, float)[order]
    drops = g_sorted[:-1] - g_sorted[1:]
    if len(drops) == 0 or drops.max() <= 0:
        return int(ks_sorted[-1])
    return int(ks_sorted[int(np.argmax(drops))])


# ---------------------------------------------------------------------------- imbalanced data
def imbalanced_subsample(y: np.ndarray, r_min: float, seed: int) -> np.ndarray:
    """Indices of the paper's imbalanced subsample (section 5.4, Table 4).

    Class ``c`` (the c-th smallest label, c = 0..C-1) keeps each sample with probability
    ``r_min + (1 - r_min) * c / (C - 1)``: r_min for the first class rising linearly to 1 for
    the last. Returns sorted indices into ``y``.
    """
    if not 0.0 < r_min <= 1.0:
        raise ValueError(f"r_min must be > 0 and <= 1; got {r_min!r}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"imbalance needs labels with at least 2 classes; got {len(classes)}")
    retention = r_min + (1.0 - r_min) * codes / (len(classes) - 1)  # (n_samples,)
    keep = np.random.default_rng(seed).random(len(y)) < retention
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------- reports
def stability_report(per_seed: pd.DataFrame, select_from: int, method: str = "dec") -> dict:
    """Seed spread of ``method``'s ACC without and with label-free choice of the autoencoder.

    ``per_seed`` is indexed by seed with columns 'acc' and each of ``CRITERIA``.
    """
    acc = per_seed["acc"].to_numpy()
    report = {
        "method": method,
        "n_seeds": len(acc),
        "select_from": select_from,
        "without_selection": {"mean": float(acc.mean()), "std": float(acc.std()), "min": float(acc.min()), "max": float(acc.max())},
    }
    for criterion in CRITERIA:
        report[f"selected_by_{criterion}"] = selection_spread(per_seed, criterion, select_from)
    return report


def _pct(value: float | None, missing: str = "-") -> str:
    return missing if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def comparison_markdown(dataset: str, summary: pd.DataFrame, stability: dict, per_seed: pd.DataFrame) -> str:
    """The comparison as markdown: ours (mean ± std over seeds) beside the papers' numbers."""
    lines = [
        f"# {dataset}: clustering methods over {int(summary['n_seeds'].max())} seeds",
        "",
        "Scores in %, mean ± std over seeds (std over seeds, ddof 0). Paper columns: DEC paper "
        "(Xie et al. 2016) Tables 2 and 3, IDEC paper (Guo et al. 2017); '-' where we have no checked "
        "number (sources in dec_mlflow/paper.py).",
        "",
        "| method | ACC | NMI | ARI | seconds | paper ACC | IDEC paper ACC |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        name = METHODS[r["method"]]
        cells = [f"{_pct(r[f'{s}_mean'])} ± {_pct(r[f'{s}_std'])}" for s in ("acc", "nmi", "ari")]
        lines.append(f"| {name} | {' | '.join(cells)} | {r['seconds_mean']:.1f} | "
                     f"{_pct(paper.accuracy(dataset, name))} | {_pct(paper.accuracy(dataset, name, source='idec'))} |")
    lines += ["", "## Stability", ""]
    no_sel = stability["without_selection"]
    lines.append(
        f"{METHODS[stability['method']]} ACC over {stability['n_seeds']} seeds: {_pct(no_sel['mean'])} ± {_pct(no_sel['std'])} "
        f"(min {_pct(no_sel['min'])}, max {_pct(no_sel['max'])})."
    )
    lines.append("")
    lines.append(f"Choosing the autoencoder among {stability['select_from']} seeds by a label-free criterion "
                 "(what `n_pretrain_init` does), over every such subset of the seeds:")
    lines += ["", "| criterion | subsets | ACC mean ± std | min | max |", "|---|---|---|---|---|"]
    for criterion in CRITERIA:
        s = stability[f"selected_by_{criterion}"]
        lines.append(f"| {criterion} | {s['n_subsets']} | {_pct(s['mean'])} ± {_pct(s['std'])} | {_pct(s['min'])} | {_pct(s['max'])} |")
    lines += ["", "Per seed (criteria: lower is better):", "", "| seed | reconstruction | inertia | ACC |", "|---|---|---|---|"]
    for seed, r in per_seed.iterrows():
        lines.append(f"| {seed} | {r['reconstruction']:.5f} | {r['inertia']:.4f} | {_pct(r['acc'])} |")
    return "\n".join(lines) + "\n"


def imbalance_markdown(table: pd.DataFrame) -> str:
    """ACC per method and r_min, ours beside the paper's Table 4."""
    r_values = sorted(table["r_min"].unique())
    header = " | ".join(f"r_min {r:g}" for r in r_values)
    lines = ["# Imbalanced subsamples: ACC in % (ours / paper Table 4; n/t = not transcribed, see dec_mlflow/paper.py)", "",
             f"| method | {header} |", "|---|" + "---|" * len(r_values)]
    for method in [m for m in ("kmeans", "ae_kmeans", "dec") if m in set(table["method"])]:
        cells = []
        for r in r_values:
            ours = table[(table["method"] == method) & (table["r_min"] == r)]["acc"]
            cells.append(f"{_pct(float(ours.iloc[0]) if len(ours) else None)} / {_pct(paper.imbalanced_accuracy(METHODS[method], r), missing='n/t')}")
        lines.append(f"| {METHODS[method]} | {' | '.join(cells)} |")
    sizes = table.drop_duplicates("r_min")[["r_min", "n_samples"]]
    lines += ["", "Samples per subsample: " + ", ".join(f"r_min {r:g}: {n}" for r, n in sizes.itertuples(index=False))]
    return "\n".join(lines) + "\n"
