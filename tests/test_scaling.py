"""Input scaling: the 'auto' rule and the global factor that brings data to the learning rates' scale."""

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

from dec_mlflow.scaling import TARGET_MEAN_SQUARE, auto_scaling, fit_scaling


def scaled(x, scaling):
    offset, scale = fit_scaling(x, scaling)
    return (x - offset) * scale


@pytest.mark.parametrize("x", [
    np.random.default_rng(0).integers(0, 256, (50, 64)).astype(np.float32),  # pixels 0..255
    np.random.default_rng(0).random((50, 64), dtype=np.float32),  # pixels in [0, 1]
    load_digits().data.astype(np.float32),  # 8x8 digits, 0..16, corner pixels always 0
])
def test_auto_picks_max_for_images(x):
    assert auto_scaling(x) == "max"


def test_auto_picks_max_for_tfidf_rows():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, (200, 500)).astype(np.float32)
    tfidf = counts * np.log(200 / (1 + (counts > 0).sum(0)))
    tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-9)
    assert auto_scaling(tfidf) == "max"


@pytest.mark.parametrize("loader", [load_wine, load_breast_cancer])
def test_auto_picks_standard_for_tables_of_mixed_units(loader):
    assert auto_scaling(loader().data.astype(np.float32)) == "standard"


def test_auto_picks_standard_for_data_with_negative_values():
    assert auto_scaling(np.array([[0.0, 1.0], [-1.0, 2.0]], np.float32)) == "standard"


@pytest.mark.parametrize("scaling", ["max", "standard"])
def test_max_and_standard_end_at_the_target_mean_square(scaling):
    x = load_wine().data.astype(np.float32)
    assert np.mean(scaled(x, scaling).astype(np.float64) ** 2) == pytest.approx(TARGET_MEAN_SQUARE, rel=1e-4)


def test_standard_keeps_features_on_one_scale_and_centred():
    x = load_wine().data.astype(np.float32)
    xs = scaled(x, "standard")
    np.testing.assert_allclose(xs.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(xs.std(0), np.sqrt(TARGET_MEAN_SQUARE), rtol=1e-3)


def test_max_keeps_relative_feature_sizes():
    x = np.array([[0.0, 255.0], [51.0, 102.0]], np.float32)
    xs = scaled(x, "max")
    assert xs[1, 0] / xs[0, 1] == pytest.approx(51 / 255)


def test_none_is_the_identity():
    x = np.array([[3.0, -4.0], [5.0, 6.0]], np.float32)
    np.testing.assert_array_equal(scaled(x, "none"), x)


def test_constant_features_keep_a_finite_scale():
    x = np.zeros((10, 3), np.float32)
    x[:, 1] = np.arange(10)
    offset, scale = fit_scaling(x, "standard")
    assert np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="scaling must be one of max, standard, none; got 'minmax'"):
        fit_scaling(np.ones((2, 2), np.float32), "minmax")
