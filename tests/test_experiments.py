"""The paper's experiments as functions: methods, summaries, stability, k selection, imbalance."""

import numpy as np
import pandas as pd
import pytest

from dec_mlflow import DEC
from dec_mlflow import experiments as ex
from dec_mlflow.metrics import cluster_accuracy

from conftest import SMALL


@pytest.fixture(scope="module")
def pretrained(blobs):
    est = DEC(**SMALL)
    return est, est.pretrain(blobs[0])


@pytest.mark.parametrize("method", list(ex.METHODS))
def test_every_method_recovers_separated_blobs(blobs, pretrained, method):
    est, ae = pretrained
    # IDEC at its own higher rate, from the default manifold start (which is distilled at the default rate: at
    # IDEC's it merged these blobs, ACC 0.75)
    idec = {"lr": 0.05, "momentum": 0.9}
    result = ex.run_method(method, blobs[0], ae, est, overrides=idec if method == "idec" else None)
    assert result.labels.shape == (600,) and result.seconds > 0
    assert cluster_accuracy(blobs[1], result.labels) > 0.99


def test_dec_method_equals_the_estimator_fit(blobs, pretrained):
    est, ae = pretrained
    result = ex.run_method("dec", blobs[0], ae, est)
    np.testing.assert_array_equal(result.labels, DEC(**SMALL).fit(blobs[0], autoencoder=ae).labels_)
    assert set(result.info) == {"n_iter", "converged", "kl_loss", "trust_score"}


def test_unknown_method_is_named(blobs, pretrained):
    with pytest.raises(ValueError, match="method must be one of kmeans, ae_kmeans, dec_frozen, dec, idec; got 'gmm'"):
        ex.run_method("gmm", blobs[0], pretrained[1], pretrained[0])


def test_summarize_gives_mean_and_population_std_in_method_order():
    rows = [{"method": "dec", "seed": s, "acc": a, "nmi": 0.5, "ari": 0.4, "seconds": 1.0} for s, a in [(0, 0.9), (1, 0.7)]]
    rows += [{"method": "kmeans", "seed": 0, "acc": 0.5, "nmi": 0.3, "ari": 0.2, "seconds": 2.0}]
    out = ex.summarize(rows)
    assert list(out["method"]) == ["kmeans", "dec"]
    dec = out.set_index("method").loc["dec"]
    assert dec["acc_mean"] == pytest.approx(0.8) and dec["acc_std"] == pytest.approx(0.1) and dec["n_seeds"] == 2


def test_selection_spread_keeps_the_lowest_criterion_of_every_subset():
    per_seed = pd.DataFrame({"reconstruction": [0.3, 0.1, 0.2], "inertia": [0.1, 0.3, 0.2], "acc": [0.6, 0.9, 0.8]},
                            index=[0, 1, 2])
    # pairs {0,1} -> 1 (0.9), {0,2} -> 2 (0.8), {1,2} -> 1 (0.9)
    s = ex.selection_spread(per_seed, "reconstruction", 2)
    assert s["n_subsets"] == 3 and s["mean"] == pytest.approx((0.9 + 0.8 + 0.9) / 3) and s["min"] == pytest.approx(0.8)
    # by inertia: {0,1} -> 0 (0.6), {0,2} -> 0 (0.6), {1,2} -> 2 (0.8)
    assert ex.selection_spread(per_seed, "inertia", 2)["mean"] == pytest.approx((0.6 + 0.6 + 0.8) / 3)
    assert ex.selection_spread(per_seed, "inertia", 1)["std"] == pytest.approx(per_seed["acc"].std(ddof=0))
    with pytest.raises(ValueError, match="n_candidates must be between 1 and the number of seeds \\(3\\); got 4"):
        ex.selection_spread(per_seed, "inertia", 4)


def test_train_validation_split_is_disjoint_complete_and_seeded():
    train, val = ex.train_validation_split(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(100))
    np.testing.assert_array_equal(val, ex.train_validation_split(100, 0.2, seed=3)[1])
    assert not np.array_equal(val, ex.train_validation_split(100, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="validation_fraction must be > 0 and < 1; got 1.0"):
        ex.train_validation_split(100, 1.0, seed=0)


def test_generalizability_is_the_ratio_of_the_two_kl_losses(fitted, blobs):
    g = ex.generalizability(fitted, blobs[0][:400], blobs[0][400:])
    assert g["generalizability"] == pytest.approx(fitted.kl_loss(blobs[0][:400]) / fitted.kl_loss(blobs[0][400:]))


def test_recommend_k_is_the_k_before_the_largest_drop():
    assert ex.recommend_k([8, 9, 10, 11], [0.95, 0.93, 0.70, 0.65]) == 9
    assert ex.recommend_k([11, 9, 10, 8], [0.65, 0.93, 0.70, 0.95]) == 9  # order of the input does not matter
    assert ex.recommend_k([5, 6], [0.8, 0.9]) == 6  # no drop: the largest k tried
    with pytest.raises(ValueError, match="equal length"):
        ex.recommend_k([5, 6], [0.8])


def test_imbalanced_subsample_retention_rises_linearly_by_class():
    y = np.repeat(np.arange(10), 20000)
    idx = ex.imbalanced_subsample(y, 0.1, seed=0)
    kept = np.bincount(y[idx], minlength=10) / 20000
    np.testing.assert_allclose(kept, 0.1 + 0.9 * np.arange(10) / 9, atol=0.01)
    assert kept[9] == 1.0
    np.testing.assert_array_equal(idx, ex.imbalanced_subsample(y, 0.1, seed=0))
    with pytest.raises(ValueError, match="r_min must be > 0 and <= 1; got 0.0"):
        ex.imbalanced_subsample(y, 0.0, seed=0)


def test_comparison_markdown_puts_the_papers_numbers_beside_ours():
    rows = [{"method": m, "seed": s, "acc": 0.8 + 0.01 * s, "nmi": 0.7, "ari": 0.6, "seconds": 3.0}
            for m in ("kmeans", "dec") for s in (0, 1)]
    per_seed = pd.DataFrame({"reconstruction": [0.2, 0.1], "inertia": [0.3, 0.4], "acc": [0.80, 0.81]}, index=[0, 1])
    md = ex.comparison_markdown("mnist", ex.summarize(rows), ex.stability_report(per_seed, 1), per_seed)
    assert "| DEC | 80.5 ± 0.5 | 70.0 ± 0.0 | 60.0 ± 0.0 | 3.0 | 84.3 |" in md
    assert "| k-means | 80.5 ± 0.5 | 70.0 ± 0.0 | 60.0 ± 0.0 | 3.0 | 53.5 |" in md
    assert "| reconstruction | 2 | 80.5 ± 0.5 | 80.0 | 81.0 |" in md


def test_imbalance_markdown_lists_ours_and_table_4():
    table = pd.DataFrame([{"r_min": 0.1, "n_samples": 100, "method": "dec", "acc": 0.5}])
    md = ex.imbalance_markdown(table)
    assert "| DEC | 50.0 / n/t |" in md and "r_min 0.1: 100" in md
