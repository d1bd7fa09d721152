"""The estimator's parameters, declared once: the table :data:`PARAMS` of name, default, rule and help.

:class:`~dec_mlflow.estimator.DEC`'s keyword arguments and its docstring's Parameters section, its
validation (:func:`validate`, also run by the lifecycle stages), the entry points' options (``cli.py``,
which ``MLproject`` mirrors) and the docs' parameter reference are all read from it. A rule checks one
value and its error names the parameter, the rule and the value; the few rules between parameters are
:func:`check_combinations`.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from dec_mlflow.augment import check_image_shape
from dec_mlflow.initialisation import INITS, K_RANGE
from dec_mlflow.scaling import SCALINGS

PRETRAIN_MODES = ("end_to_end", "layerwise")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
VARIANTS = ("dec", "frozen", "idec")
SELECTIONS = ("reconstruction", "inertia")
# augment besides True (every stage) and False: the stages after pretraining, or distillation alone
AUGMENT_MODES = ("finetune", "distill")
# Distillation of the manifold clustering into the encoder (docs/recipe.md): its epochs and rounds.
DISTILL_EPOCHS = 25
DISTILL_ROUNDS = 1


def _auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Integer:
    """An integer >= ``low``, or 'auto' when ``auto``."""

    low: int
    auto: bool = False

    def check(self, name: str, value) -> None:
        if not (self.auto and _auto(value)) and not (_is_int(value) and value >= self.low):
            raise ValueError(f"{name} must be {self}; got {value!r}")

    def __str__(self) -> str:
        return f"an integer >= {self.low}" + (" or 'auto'" if self.auto else "")


@dataclass(frozen=True)
class Number:
    """A finite real number above ``low`` (and below ``high``), each bound open or closed; or 'auto' when ``auto``."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    auto: bool = False

    def check(self, name: str, value) -> None:
        if self.auto and _auto(value):
            return
        ok = isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)
        ok = ok and (value > self.low if self.low_open else value >= self.low)
        if self.high is not None:
            ok = ok and (value < self.high if self.high_open else value <= self.high)
        if not ok:
            raise ValueError(f"{name} must be {self}; got {value!r}")

    def __str__(self) -> str:
        low = f"> {self.low}" if self.low_open else f">= {self.low}"
        high = "" if self.high is None else (f" and < {self.high}" if self.high_open else f" and <= {self.high}")
        return f"a number {low}{high}" + (" or 'auto'" if self.auto else "")


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple[str, ...]

    def check(self, name: str, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{name} must be {self}; got {value!r}")

    def __str__(self) -> str:
        return f"one of {', '.join(self.choices)}"


class Augment:
    """'auto', True, False or one of ``AUGMENT_MODES``; at the stages also the text 'true' or 'false'."""

    def check(self, name: str, value) -> None:
        if not isinstance(value, (bool, np.bool_)) and value not in ("auto", *AUGMENT_MODES):
            raise ValueError(f"{name} must be {self}; got {value!r}")

    @staticmethod
    def from_text(value):
        """A stage's text value (any case) as the estimator takes it: 'true' -> True, 'false' -> False."""
        if not isinstance(value, str) or value.lower() not in ("auto", "true", "false", *AUGMENT_MODES):
            return value  # left for check to refuse, naming it
        value = value.lower()
        return value if value in ("auto", *AUGMENT_MODES) else value == "true"

    def __str__(self) -> str:
        return "'auto', True, False, " + " or ".join(f"'{m}'" for m in AUGMENT_MODES)


class Widths:
    """A non-empty sequence of positive integers."""

    def check(self, name: str, value) -> None:
        try:
            widths = tuple(value)
        except TypeError:
            widths = ()
        if not widths or any(not _is_int(d) or d < 1 for d in widths):
            raise ValueError(f"{name} must be {self}; got {value!r}")

    def __str__(self) -> str:
        return "a non-empty sequence of positive integers"


class ImageShape:
    """'auto', None, or (height, width[, channels]) of positive integers."""

    def check(self, name: str, value) -> None:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"{name} must be 'auto', None or a tuple such as (28, 28); got {value!r}")
        if value not in (None, "auto"):
            check_image_shape(value, int(np.prod(tuple(value))))

    def __str__(self) -> str:
        return "'auto', None, or (height, width) or (height, width, channels) of positive integers"


class Seed:
    """None, a numpy RandomState, or an integer >= 0."""

    def check(self, name: str, value) -> None:
        if not (value is None or isinstance(value, np.random.RandomState)):
            Integer(0).check(name, value)

    def __str__(self) -> str:
        return "an integer >= 0 (in Python also a RandomState or None)"


class Device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (a torch.device too), and CUDA only where torch can use it."""

    def check(self, name: str, value) -> None:
        text = str(value) if isinstance(value, torch.device) else value
        if text in ("auto", "cpu"):
            return
        match = re.fullmatch(r"cuda(?::(\d+))?", text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{name} must be {self}; got {value!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r} but CUDA is not available here (no GPU or driver, or a CPU-only torch); "
                             f"use {name}='auto' or 'cpu'")
        n_gpus = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= n_gpus:
            raise ValueError(f"{name}={value!r} but this machine has {n_gpus} CUDA device(s): cuda:0 to cuda:{n_gpus - 1}")

    def __str__(self) -> str:
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"


# ------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Param:
    """One estimator parameter: its default in ``DEC``, its rule (``rule.check(name, value)`` raises the
    ValueError), its help, and, when the lifecycle stages ask more, the rule they add (``stage_rule``)."""

    name: str
    default: object
    rule: object
    help: str
    stage_rule: object = None


_POSITIVE = Number(0.0, low_open=True)
_FRACTION = Number(0.0, 1.0, high_open=True)

PARAMS = (
    Param("n_clusters", 10, Integer(1, auto=True),
          "Number of clusters k; 'auto' (needs init='manifold') = as many as top-down cuts of the initial clustering's UMAP "
          "map along density valleys make, held within k_min..k_max (the fit's k is n_clusters_, logged as "
          "n_clusters_resolved)."),
    Param("k_min", K_RANGE[0], Integer(2), "n_clusters=auto: the smallest k considered."),
    Param("k_max", K_RANGE[1], Integer(2), "n_clusters=auto: the largest k considered (at most n_samples - 1)."),
    Param("hidden_dims", (500, 500, 2000, 10), Widths(),
          "Encoder widths after the input (comma-separated at the entry points); the last is the embedding size."),
    Param("scaling", "auto", OneOf(("auto", *SCALINGS)),
          "Input scaling learned at fit time and applied by predict and the export: 'max' divides by the global "
          "max |x|, 'standard' standardises each feature, 'auto' = 'max' for images, counts and tf-idf, else "
          "'standard'; both are then scaled to mean square 0.1, the scale the rates are tuned for; 'none' feeds "
          "the data as it is."),
    Param("pretrain_mode", "end_to_end", OneOf(PRETRAIN_MODES),
          "'end_to_end' trains the whole autoencoder from the start; 'layerwise' is the paper's greedy denoising "
          "pretraining, then pretrain_epochs of end-to-end fine-tuning."),
    Param("pretrain_epochs", "auto", Integer(0, auto=True),
          "End-to-end pretraining epochs (fine-tuning epochs in layerwise mode); 0 = none: the encoder starts "
          "untrained and the initial clusters come from the input (init='manifold', variant='dec' only). 'auto' "
          "= 0 for the manifold start of the 'dec' variant (the default recipe), else (and always in pretrain) "
          "75, or more on small data so that pretraining makes at least 5,000 SGD iterations."),
    Param("layerwise_epochs", 20, Integer(0), "Epochs per layer in layerwise mode."),
    Param("pretrain_batch_size", 256, Integer(1), "Pretraining batch size."),
    Param("pretrain_lr", 1.0, _POSITIVE,
          "Pretraining SGD learning rate (MSE averaged over features); if the loss stops being finite, pretraining "
          "restarts from scratch at a quarter of it, 3 times at most."),
    Param("pretrain_momentum", 0.9, _FRACTION, "Pretraining SGD momentum."),
    Param("pretrain_lr_schedule", "constant", OneOf(LR_SCHEDULES), "Pretraining learning-rate schedule."),
    Param("dropout", 0.2, _FRACTION, "Corruption (dropout) rate of the layerwise denoising stage."),
    Param("precision", "auto", OneOf(PRECISIONS),
          "Pretraining matmul precision; 'auto' = bf16 where the CPU has it natively. Self-training always runs "
          "in fp32."),
    Param("augment", "auto", Augment(),
          "DEC-DA (Guo et al. 2018): random shifts (up to 10 %) and rotations (up to 10 degrees) of the images of "
          "each batch in every training stage (true), in distillation and self-training only (finetune) or in "
          "distillation only (distill: augmented self-training drifts on MNIST); the target P still comes from the "
          "clean data. Needs an image shape, never for tables; 'auto' = distill where the samples are images on "
          "one scale and fit distils, else false."),
    Param("image_shape", "auto", ImageShape(),
          "Shape of one sample as an image, channels last, e.g. (28, 28) or (32, 32, 3) (28,28 at the entry "
          "points); needed by augment. 'auto' infers (side, side) for rows that look like square single-channel "
          "images, never for tables, sparse or tf-idf input (at the entry points the dataset's own shape first); "
          "None ('none'): not images."),
    Param("n_pretrain_init", 1, Integer(1),
          "Autoencoders to pretrain, with seeds random_state, random_state + 1, ...; the best by pretrain_selection "
          "is kept and its seed drives the rest of the fit (labels are never used)."),
    Param("pretrain_selection", "reconstruction", OneOf(SELECTIONS),
          "Label-free criterion among pretrained candidates, lower is better: 'reconstruction' (mean squared "
          "error over X) or 'inertia' (k-means inertia in the embedding over its total sum of squares)."),
    Param("init", "manifold", OneOf(INITS),
          "Initial clusters: 'manifold' (UMAP + Gaussian mixture, N2D, of the input reduced to 50 principal "
          "components when there is no pretraining, else of the embedding; then distillation) or the paper's "
          "'kmeans' in the pretrained embedding; at the entry points 'auto' = the preset's."),
    Param("distill_epochs", DISTILL_EPOCHS, Integer(1),
          "Epochs of distillation towards the manifold initialisation (at least 2,000 iterations); at the entry "
          "points 'auto' = the preset's (25)."),
    Param("distill_lr", "auto", Number(0.0, low_open=True, auto=True),
          "Peak SGD rate of distillation (one cycle: 15 % warm-up, then cosine decay to 0); 'auto' = 0.1 from an "
          "untrained encoder (the default recipe) where distillation runs its 2,000-step minimum, 0.2 where "
          "distill_epochs makes it longer (large data), min(lr, 0.01) from a pretrained one, which distils at that "
          "constant rate towards unsmoothed targets."),
    Param("distill_rounds", DISTILL_ROUNDS, Integer(1),
          "Rounds of distillation then self-training (init='manifold'); rounds after the first distil the previous "
          "round's target P (into a fresh, differently seeded encoder when there was no pretraining); at the entry "
          "points 'auto' = the preset's (2 for best, else 1)."),
    Param("n_init", 20, Integer(1), "k-means restarts (init='kmeans', and the 'inertia' selection)."),
    Param("alpha", 1.0, _POSITIVE, "Degrees of freedom of the Student's t kernel."),
    Param("batch_size", 256, Integer(1), "Self-training batch size."),
    Param("lr", 0.01, _POSITIVE, "Self-training SGD learning rate (distillation's is distill_lr)."),
    Param("momentum", 0.9, _FRACTION, "Distillation and self-training SGD momentum."),
    Param("update_interval", "auto", Integer(1, auto=True),
          "Iterations between target-distribution updates over the whole data; 'auto' = the paper's 140, or one "
          "epoch if shorter."),
    Param("tol", 0.001, _FRACTION, "Stop when fewer than this fraction of labels change between target updates."),
    Param("min_iter", "auto", Integer(0, auto=True),
          "Self-training iterations (each round) before the tol rule may stop it. 'auto' = 5 target updates where "
          "distillation runs by epochs (an encoder distilled on data of at least 20,736 rows; its labels barely move "
          "between the first updates while its accuracy still rises), else 0: the paper's rule alone."),
    Param("max_iter", 20000, Integer(1), "Maximum self-training iterations (over each round)."),
    Param("variant", "dec", OneOf(VARIANTS),
          "'dec' trains encoder and centroids on KL(P || Q); 'frozen' keeps the pretrained encoder fixed and moves "
          "only the centroids (DEC w/o backprop); 'idec' keeps the decoder and minimises reconstruction MSE + "
          "gamma KL (Guo et al. 2017)."),
    Param("gamma", 0.1, _POSITIVE, "IDEC: weight of the KL term beside the reconstruction loss."),
    Param("random_state", 0, Seed(),
          "Seed of all randomness (weights, batches, initialisation); an int gives the same result on the CPU "
          "every time.",
          # the stages name, tag and reuse their runs by the seed
          stage_rule=Integer(0)),
    Param("device", "auto", Device(), "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."),
)
BY_NAME = {p.name: p for p in PARAMS}
DEFAULTS = {p.name: p.default for p in PARAMS}


# ------------------------------------------------------------------------------------ validation
def distills(params: Mapping) -> bool:
    """Whether fit distils: a manifold initialisation (it has posteriors to learn) and a trained encoder."""
    return params["init"] == "manifold" and params["variant"] != "frozen"


def starts_from_input(params: Mapping) -> bool:
    """Whether fit can do without pretraining: it clusters the input and trains the encoder by distillation."""
    return params["init"] == "manifold" and params["variant"] == "dec"


def augments_explicitly(params: Mapping) -> bool:
    return params["augment"] is True or params["augment"] in AUGMENT_MODES


def validate(params: Mapping, *, stage: bool = False) -> None:
    """Raise ValueError naming the first parameter of ``params`` (a full set, as ``DEC.get_params()``) that
    breaks its rule, then any combination the parameters forbid; ``stage``: the lifecycle stages' rules too."""
    for p in PARAMS:
        p.rule.check(p.name, params[p.name])
        if stage and p.stage_rule is not None:
            p.stage_rule.check(p.name, params[p.name])
    check_combinations(params)


def check_combinations(p: Mapping) -> None:
    """The rules between parameters, each valid on its own."""
    if p["n_clusters"] == "auto" and p["init"] != "manifold":
        raise ValueError(f"n_clusters='auto' chooses k on the manifold initialisation's map, so it needs "
                         f"init='manifold'; got init={p['init']!r} (give n_clusters as a number)")
    if p["n_clusters"] == "auto" and p["n_pretrain_init"] > 1 and p["pretrain_selection"] == "inertia":
        raise ValueError("pretrain_selection='inertia' compares k-means at n_clusters, which 'auto' chooses "
                         "only after pretraining; use pretrain_selection='reconstruction' or a number of clusters")
    if p["min_iter"] != "auto" and p["min_iter"] > p["max_iter"]:
        raise ValueError(f"min_iter must be <= max_iter; got min_iter={p['min_iter']}, max_iter={p['max_iter']}")
    if p["k_max"] < p["k_min"]:
        raise ValueError(f"k_max must be >= k_min; got k_min={p['k_min']}, k_max={p['k_max']}")
    if p["pretrain_epochs"] == 0 and not starts_from_input(p):
        raise ValueError("pretrain_epochs=0 (no pretraining) needs init='manifold' and variant='dec', which cluster "
                         f"the input and train the encoder from its start; got init={p['init']!r}, variant={p['variant']!r}")
    if p["pretrain_epochs"] == 0 and p["n_pretrain_init"] > 1:
        raise ValueError(f"n_pretrain_init={p['n_pretrain_init']} chooses among pretrained autoencoders, but "
                         "pretrain_epochs=0 pretrains none (use n_pretrain_init=1)")
    if p["distill_rounds"] > 1 and not distills(p):
        raise ValueError(f"distill_rounds={p['distill_rounds']} repeats distillation, which only init='manifold' with a "
                         f"trained encoder runs; got init={p['init']!r}, variant={p['variant']!r} (use distill_rounds=1)")
    if p["augment"] == "distill" and not distills(p):
        raise ValueError("augment='distill' augments distillation, which only init='manifold' with a trained encoder "
                         f"runs; got init={p['init']!r}, variant={p['variant']!r} (use augment='finetune' or True)")
    if augments_explicitly(p) and p["image_shape"] is None:
        raise ValueError(f"augment={p['augment']!r} needs image_shape, the (height, width[, channels]) of one sample; "
                         "augmentation only applies to images, never to tabular data")
    if augments_explicitly(p) and p["scaling"] == "standard":
        raise ValueError("augment=True needs one scale for every pixel: scaling must be 'auto', 'max' or 'none', "
                         "not 'standard' (a shifted image would carry each pixel's own mean and deviation)")


def numpydoc(indent: str = "") -> str:
    """The numpydoc Parameters section of the table, each line after ``indent`` (``DEC.__doc__`` holds it)."""
    lines = ["Parameters", "----------"]
    for p in PARAMS:
        lines += [f"{p.name} : {p.rule}, default={p.default!r}", *textwrap.wrap(p.help, 96, initial_indent="    ",
                                                                                 subsequent_indent="    ")]
    return "\n".join(indent + line for line in lines)
