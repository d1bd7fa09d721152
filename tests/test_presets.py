"""Presets: named bundles of estimator parameters."""

import pytest

from dec_mlflow import DEC
from dec_mlflow.presets import BEST_DISTILL_ROUNDS, PRESETS, preset_params


def test_best_adds_a_round():
    assert preset_params("best") == {"distill_rounds": BEST_DISTILL_ROUNDS}
    assert BEST_DISTILL_ROUNDS > DEC().distill_rounds
    assert preset_params("default") == {}


def test_paper_uses_kmeans_initialisation_and_so_pretrains():
    assert preset_params("paper")["init"] == "kmeans"
    import numpy as np

    x = np.random.default_rng(0).random((300, 5)).astype(np.float32)
    assert DEC(**preset_params("paper")).resolve(x)["pretrain_epochs"] > 0
    assert DEC().resolve(x)["pretrain_epochs"] == 0  # the default recipe clusters the input, no pretraining


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_a_valid_estimator(preset):
    DEC(**preset_params(preset)).validate_params()


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset must be one of default, best, paper; got 'fast'"):
        preset_params("fast")


def test_stage_options_left_at_auto_take_the_presets_values_and_given_ones_win():
    from dec_mlflow.lifecycle import build_estimator

    best = build_estimator({"image_shape": "28,28"}, preset="best")
    assert (best.augment, best.distill_epochs, best.distill_rounds, best.init) == ("auto", DEC().distill_epochs,
                                                                                  BEST_DISTILL_ROUNDS, "manifold")
    given = build_estimator({"image_shape": "28,28", "distill_epochs": 5, "distill_rounds": 1, "augment": "finetune"},
                            preset="best")
    assert (given.augment, given.distill_epochs, given.distill_rounds) == ("finetune", 5, 1)
    assert build_estimator({}).image_shape == "auto"  # not given, no dataset shape: inferred at fit
    assert build_estimator({"image_shape": "none"}).image_shape is None
