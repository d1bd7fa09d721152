"""Named recipes: bundles of estimator parameters behind the entry points' ``preset`` option.

A preset only fills in parameters; anything given explicitly overrides it. The numbers behind each
choice are in BENCHMARKS.md ("Clustering quality across data kinds") and REPRODUCING.md.
"""

from __future__ import annotations

PRESETS = ("default", "best", "paper")

# best: DEC-DA's augmentation (Guo et al., ACML 2018) in a 10x longer distillation towards the default manifold
# initialisation, then clean self-training. MNIST seed 0, same autoencoder: 2 epochs of augmented distillation then
# augmented self-training ('finetune', this preset until now) 0.969; 20 augmented epochs then augmented
# self-training 0.940 (its labels keep changing by 0.4-0.7 % per update, it never converges and drifts); 20
# augmented epochs then clean self-training 0.979 (BENCHMARKS.md, "Best mode"). Not in pretraining: 75 augmented
# epochs gave a worse embedding on MNIST (UMAP + GMM 0.969 against 0.974 unaugmented, seed 0).
# Then 40 epochs and a second round (augmented distillation towards the first round's target P, clean self-training
# again): MNIST seed 0 0.9788 (20 epochs) -> 0.9794 (40) -> 0.9796 (80) -> 0.9801 (40, two rounds).
BEST_DISTILL_EPOCHS = 40
BEST_DISTILL_ROUNDS = 2
DESCRIPTIONS = {
    "default": "all defaults: manifold (UMAP + GMM) initialisation, distillation, DEC self-training",
    "best": "default + 40 epochs of distillation on DEC-DA augmented images (shifts, rotations), then clean "
            "self-training, twice (the second round distils the first's target P); image data only (needs "
            "image_shape), elsewhere the same as default",
    "paper": "the paper's algorithm: k-means initialisation, no distillation (this project's recipe before the "
             "manifold initialisation; REPRODUCING.md regenerates the paper's tables with it)",
}


def preset_params(preset: str, *, image_shape: tuple[int, ...] | None = None) -> dict:
    """The estimator parameters of ``preset`` for data whose samples have ``image_shape`` (None: not images).

    Returns a dict of DEC keyword arguments, ``image_shape`` included.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    params: dict = {"image_shape": image_shape}
    if preset == "best" and image_shape is not None:
        params.update(augment="distill", distill_epochs=BEST_DISTILL_EPOCHS, distill_rounds=BEST_DISTILL_ROUNDS)
    elif preset == "paper":
        params.update(init="kmeans")
    return params
