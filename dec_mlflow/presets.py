"""Named recipes: bundles of estimator parameters behind the entry points' ``preset`` option.

A preset only fills in parameters; anything given explicitly overrides it. The numbers behind each
choice are in BENCHMARKS.md ("Clustering quality across data kinds") and REPRODUCING.md.
"""

from __future__ import annotations

PRESETS = ("default", "best", "paper")

# best: a second round, in which a fresh encoder distils the first round's target P (docs/recipe.md#presets).
BEST_DISTILL_ROUNDS = 2
DESCRIPTIONS = {
    "default": "all defaults: UMAP + Gaussian mixture of the input, distilled into an untrained encoder (on "
               "augmented images where the samples are images), then DEC self-training",
    "best": "default, then a second round: a fresh encoder distils the first round's target P and self-trains",
    "paper": "the paper's algorithm: a pretrained autoencoder, k-means initialisation, no distillation "
             "(REPRODUCING.md regenerates the paper's tables with it)",
}


def preset_params(preset: str) -> dict:
    """The estimator parameters of ``preset``: a dict of DEC keyword arguments (the rest keep their defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    if preset == "best":
        return {"distill_rounds": BEST_DISTILL_ROUNDS}
    if preset == "paper":
        return {"init": "kmeans"}
    return {}
