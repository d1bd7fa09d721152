"""Image-shape inference: square pixel rows get a shape; tables, text, signals and negative data never do."""

import numpy as np
import pytest
from scipy import sparse
from sklearn import datasets as skdata
from sklearn.feature_extraction.text import TfidfVectorizer

from dec_mlflow.augment import infer_image_shape


def _strokes(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Synthetic grey images: a bright blurred bar at a random place and angle on a dark background, 0..255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    out = np.empty((n, side * side), np.float32)
    for i in range(n):
        cy, cx, angle = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0, np.pi)
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        out[i] = (255 * np.exp(-(distance / 0.08) ** 2)).ravel()
    return out


def test_square_non_negative_pixel_rows_get_their_shape():
    assert infer_image_shape(_strokes(500, 28)) == (28, 28)
    assert infer_image_shape(skdata.load_digits().data) == (8, 8)


def test_tables_get_no_shape():
    assert infer_image_shape(skdata.load_wine().data) is None  # 13 features: not a square
    assert infer_image_shape(skdata.load_breast_cancer().data) is None  # 30 features
    x, _ = skdata.make_blobs(1000, n_features=64, centers=5, random_state=0)  # 8 x 8 but a table
    assert infer_image_shape(np.abs(x)) is None


def test_tfidf_rows_get_no_shape_sparse_or_dense():
    """A 2,500-word vocabulary is 50 x 50, but neither the sparse matrix nor its dense copy is an image."""
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i:04d}" for i in range(2500)]
    docs = [" ".join(rng.choice(vocabulary, size=60, p=None)) for _ in range(800)]
    tfidf = TfidfVectorizer(vocabulary=vocabulary).fit_transform(docs)
    assert tfidf.shape == (800, 2500)
    assert infer_image_shape(tfidf) is None
    assert infer_image_shape(tfidf.toarray()) is None
    assert infer_image_shape(sparse.csr_matrix(_strokes(200, 28))) is None  # sparse input is never an image


def test_negative_values_get_no_shape():
    x = _strokes(500, 28)
    assert infer_image_shape(x - 100.0) is None


def test_uncorrelated_neighbouring_columns_get_no_shape():
    x = _strokes(500, 28)
    permuted = x[:, np.random.default_rng(0).permutation(x.shape[1])]  # the same values, pixels shuffled
    assert infer_image_shape(permuted) is None
    assert infer_image_shape(np.random.default_rng(1).random((500, 784))) is None


def test_a_one_dimensional_signal_folded_into_a_square_gets_no_shape():
    t = np.linspace(0, 1, 64)
    rng = np.random.default_rng(0)
    signals = np.stack([np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)) + 1.5 for _ in range(500)])
    assert infer_image_shape(signals) is None  # neighbours along one axis only


@pytest.mark.parametrize("n_features", [783, 785, 16])
def test_non_square_or_tiny_widths_get_no_shape(n_features):
    x = np.abs(np.random.default_rng(0).normal(size=(300, n_features)))
    assert infer_image_shape(x) is None
