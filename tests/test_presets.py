"""Presets: named bundles of estimator parameters."""

import pytest

from dec_mlflow import DEC
from dec_mlflow.presets import PRESETS, preset_params


def test_best_augments_images_only():
    assert preset_params("best", image_shape=(28, 28)) == {"image_shape": (28, 28), "augment": "distill",
                                                           "distill_epochs": 40, "distill_rounds": 2}
    assert preset_params("best", image_shape=None) == preset_params("default", image_shape=None) == {"image_shape": None}


def test_paper_uses_kmeans_initialisation():
    assert preset_params("paper")["init"] == "kmeans"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_a_valid_estimator(preset):
    DEC(**preset_params(preset, image_shape=(28, 28))).validate_params()


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset must be one of default, best, paper; got 'fast'"):
        preset_params("fast")


def test_stage_options_left_at_auto_take_the_presets_values_and_given_ones_win():
    from dec_mlflow.lifecycle import build_estimator

    best = build_estimator({"image_shape": "28,28"}, preset="best")
    assert (best.augment, best.distill_epochs, best.distill_rounds, best.init) == ("distill", 40, 2, "manifold")
    given = build_estimator({"image_shape": "28,28", "distill_epochs": 5, "distill_rounds": 1, "augment": "finetune"},
                            preset="best")
    assert (given.augment, given.distill_epochs, given.distill_rounds) == ("finetune", 5, 1)
    tables = build_estimator({}, preset="best")  # no image shape: nothing to augment, the default's distillation
    assert (tables.augment, tables.distill_epochs, tables.distill_rounds) == (False, 2, 1)
