"""scikit-learn's estimator checks on DEC, and the conventions they stand for."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.utils.estimator_checks import parametrize_with_checks

from dec_mlflow import DEC
from tests.conftest import SMALL

# Tiny budgets so that the ~50 checks (each fits several times) take seconds. init='kmeans' because
# the manifold initialisation's UMAP spends ~30 s compiling on first use; the checks exercise the
# estimator's API, which is the same for both initialisations.
TINY = dict(n_clusters=3, hidden_dims=(8, 2), pretrain_epochs=2, pretrain_batch_size=16, batch_size=16,
            update_interval=5, max_iter=20, n_init=2, init="kmeans", precision="fp32")


# DEC fits and predicts on every scipy.sparse format (test_any_sparse_format_is_read_as_csr_and_fits_like_dense);
# these two checks then read tags.classifier_tags.multi_class after predict_proba, which a clusterer has no
# classifier tags for (None): scikit-learn's check, not DEC, raises AttributeError.
SPARSE_CHECK_LIMIT = "sklearn reads classifier_tags of a clusterer with predict_proba after a sparse fit that succeeded"


@parametrize_with_checks([DEC(**TINY)], expected_failed_checks=lambda est: {
    "check_estimator_sparse_array": SPARSE_CHECK_LIMIT, "check_estimator_sparse_matrix": SPARSE_CHECK_LIMIT})
def test_sklearn_estimator_check(estimator, check):
    check(estimator)


def test_random_state_may_be_none_or_a_random_state(blobs):
    x = blobs[0][:200]
    a = DEC(**{**SMALL, "init": "kmeans", "random_state": np.random.RandomState(3)}).fit(x)
    b = DEC(**{**SMALL, "init": "kmeans", "random_state": np.random.RandomState(3)}).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)  # the same RandomState draws the same seed
    assert a.selected_seed_ == b.selected_seed_ == np.random.RandomState(3).randint(np.iinfo(np.int32).max)
    c = DEC(**{**SMALL, "init": "kmeans", "random_state": None}).fit(x)
    assert c.labels_.shape == (200,)


def test_one_cluster_puts_every_sample_in_it(blobs):
    est = DEC(**{**SMALL, "n_clusters": 1, "init": "manifold"}).fit(blobs[0][:100])
    assert set(est.labels_) == {0}
    np.testing.assert_allclose(est.predict_proba(blobs[0][:5]), 1.0)
    assert est.trust_score_ == 0.0 and est.trust_scores_ == {"agreement": 1.0, "modularity": 0.0, "valleys": 0.0}


@pytest.mark.parametrize("make, error, message", [
    (lambda x: x + 1j, ValueError, "Complex data not supported"),
    (lambda x: x[:, :0], ValueError, r"0 feature\(s\) \(shape=\(600, 0\)\) while a minimum of 1 is required by DEC"),
    (lambda x: x[:, 0], ValueError, "Expected 2D array, got 1D array instead"),
])
def test_unsupported_input_gets_scikit_learns_message(blobs, make, error, message):
    with pytest.raises(error, match=message):
        DEC(**SMALL).fit(make(blobs[0]))


@pytest.mark.parametrize("make", [sp.coo_matrix, sp.csc_array])
def test_any_sparse_format_is_read_as_csr_and_fits_like_dense(blobs, make):
    x = np.where(np.abs(blobs[0]) < 4.0, 0.0, blobs[0]).astype(np.float32)
    got = DEC(**{**SMALL, "init": "kmeans", "pretrain_epochs": 3, "max_iter": 20}).fit(make(x))
    want = DEC(**{**SMALL, "init": "kmeans", "pretrain_epochs": 3, "max_iter": 20}).fit(x)
    np.testing.assert_array_equal(got.labels_, want.labels_)

