"""What the estimator's parameters become on the data: the 'auto' settings resolved, and each stage's options.

Functions of a full parameter set (``DEC.get_params()``, :data:`dec_mlflow.params.PARAMS`) and the data;
``fit``'s first stage is :func:`resolve`. No training, no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from sklearn.utils import check_random_state

from dec_mlflow import distributed
from dec_mlflow.augment import check_image_shape, infer_image_shape, random_shift_rotate
from dec_mlflow.params import distills, starts_from_input
from dec_mlflow.scaling import auto_scaling

# 'auto' budgets. The paper's schedule is counted in SGD iterations; 75 epochs of MNIST are 20,500 of
# them, and a small table at 75 epochs would get a few hundred: too few for the autoencoder to learn.
PRETRAIN_EPOCHS = 75
MIN_PRETRAIN_ITER = 5000
UPDATE_INTERVAL = 140  # the paper's value on MNIST; small data updates P at least once per epoch
# Distillation (docs/recipe.md): at least this many iterations on small data, the peak of its one-cycle
# rate, and the label smoothing of its targets.
DISTILL_MIN_ITER = 2000
DISTILL_LR = 0.1  # 'auto' from an untrained encoder, on data small enough to run the minimum (or fewer epochs)...
DISTILL_LR_EPOCHS = 0.2  # ... and where distill_epochs sets the length: a shorter schedule, a higher peak
# ... and from a pretrained one at most, which 0.1 pushes past its soft targets on small data (docs/recipe.md)
PRETRAINED_DISTILL_LR = 0.01
DISTILL_SMOOTHING = 0.1
# 'auto' min_iter where distillation runs by epochs: self-training runs this many target updates before the tol
# rule may stop it. On full MNIST the paper's tol (0.1 %) stopped it after two updates (280 steps): a distilled
# encoder's labels barely move, while its accuracy was still rising on every seed (BENCHMARKS "Self-training
# length on MNIST"). Five updates take two thirds of the rise that ten give (+0.0003 of +0.0005 mean ACC over
# seeds 0-2) for 8 s more instead of 22 s on a 2-core machine
MIN_SELF_TRAIN_UPDATES = 5


def _cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed(random_state) -> int:
    """``random_state`` as an int seed: itself, or drawn from the given RandomState (None: numpy's global one)."""
    if isinstance(random_state, Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def device(name) -> torch.device:
    """The torch device of the ``device`` parameter: 'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(name: str, on: torch.device) -> str:
    """The ``precision`` parameter on device ``on``: 'auto' is bf16 on CPUs with native bf16 instructions."""
    if name == "auto":
        return "bf16" if on.type == "cpu" and _cpu_has_bf16() else "fp32"
    return name


def resolve(p: Mapping, X, *, pretraining: bool = False) -> dict:
    """What the 'auto' settings of the parameters ``p`` resolve to on raw ``X`` (n_samples, n_features).

    Returns a dict with 'scaling', 'pretrain_epochs' (of ``fit``, or with ``pretraining`` of
    ``pretrain``, which always pretrains), 'update_interval', 'min_iter', 'precision', 'device' ('cpu', 'cuda' or
    'cuda:N'), 'image_shape' (a tuple or None) and 'augment'; the pretraining rate actually used is
    known only after pretraining.
    """
    n = X.shape[0]
    epochs = p["pretrain_epochs"]
    if epochs == "auto" and starts_from_input(p) and p["n_pretrain_init"] == 1 and not pretraining:
        epochs = 0
    elif epochs == "auto":
        iters_per_epoch = math.ceil(n / min(p["pretrain_batch_size"], n))
        epochs = max(PRETRAIN_EPOCHS, math.ceil(MIN_PRETRAIN_ITER / iters_per_epoch))
    interval = p["update_interval"]
    if interval == "auto":
        interval = min(UPDATE_INTERVAL, max(1, n // min(p["batch_size"], n)))
    min_iter = p["min_iter"]
    if min_iter == "auto":
        min_iter = min(p["max_iter"], MIN_SELF_TRAIN_UPDATES * interval) if distills_by_epochs(p, n) else 0
    scaling = auto_scaling(X) if p["scaling"] == "auto" else p["scaling"]
    if p["image_shape"] == "auto":
        image_shape = infer_image_shape(X)
    else:
        image_shape = None if p["image_shape"] is None else tuple(int(s) for s in p["image_shape"])
    augment = p["augment"]
    if augment == "auto":  # images on one scale (shifting a per-feature scaled image would mix pixels' scales)
        augment = "distill" if image_shape is not None and distills(p) and scaling != "standard" else False
    on = device(p["device"])
    return {"scaling": scaling, "pretrain_epochs": int(epochs), "update_interval": int(interval), "min_iter": int(min_iter),
            "precision": precision(p["precision"], on), "device": str(on), "image_shape": image_shape,
            "augment": augment}


def augmentation(resolved: dict, augment, scale: np.ndarray, on: torch.device, seed_: int):
    """The augmentation of scaled batches (DEC-DA), or None; its randomness from its own generator.

    ``resolved`` is :func:`resolve`'s, ``augment`` the parameter as given (for the message). Shifting
    and rotating the scaled image equals doing so to the raw one only when every pixel has the same
    scale and no offset ('max' and 'none'), which is checked here.
    """
    if not resolved["augment"]:
        return None
    if resolved["image_shape"] is None:
        raise ValueError(f"augment={augment!r} needs image_shape, but none was given and the rows do not look "
                         "like square single-channel images (dec_mlflow.augment.infer_image_shape); give image_shape")
    shape = check_image_shape(resolved["image_shape"], scale.shape[0])
    if not np.allclose(scale, scale[0]):
        raise ValueError("augment=True needs one scale for every pixel (scaling 'max' or 'none'), but the "
                         "input is scaled per feature ('standard', chosen by 'auto' for this data or given)")
    # under torchrun each rank draws its own shifts for its own rows
    generator = torch.Generator(device=on).manual_seed(seed_ + distributed.rank())
    return functools.partial(random_shift_rotate, image_shape=shape, generator=generator)


def distill_steps_by_epochs(p: Mapping, n_samples: int) -> int:
    """The SGD steps of ``distill_epochs`` epochs over ``n_samples`` rows (distillation runs at least :data:`DISTILL_MIN_ITER`)."""
    return p["distill_epochs"] * max(1, n_samples // min(p["batch_size"], n_samples))


def distills_by_epochs(p: Mapping, n_samples: int) -> bool:
    """Whether fit distils and ``distill_epochs`` sets the length (data large enough to pass the minimum)."""
    return distills(p) and distill_steps_by_epochs(p, n_samples) > DISTILL_MIN_ITER


def distill_lr(p: Mapping, trained: bool, by_epochs: bool = False) -> float:
    """``distill_lr``, its 'auto' resolved for an encoder that is pretrained (``trained``) or not, and for a
    distillation whose length ``distill_epochs`` sets (``by_epochs``) rather than :data:`DISTILL_MIN_ITER`.

    From random weights, 25 epochs on full MNIST at a peak of 0.2 end where 40 at 0.1 do; on the MNIST test
    split, which runs the 2,000-step minimum (51 epochs), 0.2 ends lower than 0.1 (docs/recipe.md).
    """
    if p["distill_lr"] != "auto":
        return float(p["distill_lr"])
    if trained:
        return min(p["lr"], PRETRAINED_DISTILL_LR)
    return DISTILL_LR_EPOCHS if by_epochs else DISTILL_LR


def training_options(p: Mapping, resolved: dict, *, n_samples: int, trained: bool, transform, decoder,
                     callback) -> tuple[dict, dict]:
    """The options of distillation and of self-training (:func:`dec_mlflow.training.distill_and_self_train`).

    ``trained``: whether the encoder was pretrained, which distils as before the untrained start did:
    at a constant rate, towards sharp targets. ``transform`` is :func:`augmentation`'s; self-training
    does without it when ``augment`` resolved to 'distill'.
    """
    train = dict(alpha=p["alpha"], batch_size=p["batch_size"], lr=p["lr"], momentum=p["momentum"], callback=callback)
    by_epochs = distill_steps_by_epochs(p, n_samples)
    distill_options = dict(n_iter=max(DISTILL_MIN_ITER, by_epochs), transform=transform, one_cycle=not trained,
                           smoothing=0.0 if trained else DISTILL_SMOOTHING,
                           **{**train, "lr": distill_lr(p, trained, by_epochs > DISTILL_MIN_ITER)})
    self_train_options = dict(update_interval=resolved["update_interval"], tol=p["tol"], min_iter=resolved["min_iter"],
                              max_iter=p["max_iter"],
                              train_encoder=p["variant"] != "frozen", decoder=decoder, gamma=p["gamma"],
                              transform=None if resolved["augment"] == "distill" else transform, **train)
    return distill_options, self_train_options
