"""Evaluation and self-training figures are built from the right data, and no data makes one crash."""

import json
import os
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from dec_mlflow import plots
from dec_mlflow.callbacks import SelfTrainRecorder

M, K = 60, 3  # t-SNE stays tiny: 60 points


def test_confusion_figure_orders_clusters_by_their_matched_class():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([2, 2, 0, 0, 1, 1])  # cluster 2 is class 0, cluster 0 is class 1, ...
    fig = plots.confusion_figure(y, pred)
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(image, np.diag([2, 2, 2]))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["2", "0", "1"]


def test_cluster_sizes_figure_has_a_bar_per_cluster():
    fig = plots.cluster_sizes_figure(np.array([0, 0, 2]), 4)
    assert [p.get_height() for p in fig.axes[0].patches] == [2, 0, 1, 0]


def test_top_images_show_the_most_confident_members_of_each_cluster():
    rng = np.random.default_rng(0)
    x = rng.random((40, 6))  # 40 "images" of 2x3 pixels
    q = rng.dirichlet(np.ones(3), 40)
    fig = plots.top_images_figure(x, q, (2, 3), n_per_cluster=4)
    axes = np.array(fig.axes).reshape(3, 4)
    labels = q.argmax(1)
    for j in range(3):
        members = np.flatnonzero(labels == j)
        best = members[np.argmax(q[members, j])]
        np.testing.assert_array_equal(axes[j, 0].images[0].get_array(), x[best].reshape(2, 3))


def test_embedding_figure_scatters_every_point():
    z = np.random.default_rng(0).normal(size=(60, 5))
    fig = plots.embedding_figure(z, np.arange(60) % 3)
    assert fig.axes[0].collections[0].get_offsets().shape == (60, 2)


@pytest.fixture(autouse=True)
def close_figures():
    """Free each test's figures (pyplot keeps them alive); closed figures keep their data."""
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def recorded() -> SelfTrainRecorder:
    """A recorder played by hand over 5 target updates (steps 0, 10, ..., 40) of a moving encoder."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 6, generator=g)
    encoder = nn.Linear(6, 4).eval()
    centroids = torch.randn(K, 4, generator=g)
    rec = SelfTrainRecorder(x, np.arange(M) % K, y_full=np.arange(2 * M) % K)
    delta_label = [1.0, 0.1, 0.01, 0.0, 0.0]  # the last two updates changed no label
    for i, step in enumerate(range(0, 50, 10)):
        with torch.no_grad():
            encoder.weight.add_(0.2 * torch.randn(encoder.weight.shape, generator=g))
        full_labels = np.arange(2 * M) % K if i else np.zeros(2 * M, int)
        rec.on_update(step, full_labels, {"kl_loss": 1 / (1 + i), "delta_label": delta_label[i]})
        rec.on_state(step, encoder, centroids)
    return rec


@pytest.fixture(scope="module")
def snapshots_fig(recorded):
    return plots.embedding_snapshots_figure(recorded.snapshots, recorded.y, n_panels=3, random_state=0)


def _offsets(fig):
    return [ax.collections[0].get_offsets().data for ax in fig.axes]


def test_embedding_snapshots_shows_first_middle_and_last_update_in_titled_panels(snapshots_fig):
    assert [ax.get_title() for ax in snapshots_fig.axes] == ["iteration 0", "iteration 20", "iteration 40"]
    assert all(off.shape == (M, 2) for off in _offsets(snapshots_fig))


def test_embedding_snapshots_colours_points_by_true_class_when_y_is_given(snapshots_fig, recorded):
    np.testing.assert_array_equal(snapshots_fig.axes[0].collections[0].get_array(), recorded.y)


def test_embedding_snapshots_tsne_is_deterministic_for_the_same_seed(snapshots_fig, recorded):
    again = plots.embedding_snapshots_figure(recorded.snapshots, recorded.y, n_panels=3, random_state=0)
    for a, b in zip(_offsets(snapshots_fig), _offsets(again)):
        np.testing.assert_array_equal(a, b)


def test_embedding_snapshots_panel_depends_only_on_its_snapshot(snapshots_fig, recorded):
    # the last panel of a 2-panel figure is the same t-SNE as the last of the 3-panel one
    two = plots.embedding_snapshots_figure(recorded.snapshots, n_panels=2, random_state=0)
    assert [ax.get_title() for ax in two.axes] == ["iteration 0", "iteration 40"]
    np.testing.assert_array_equal(_offsets(two)[1], _offsets(snapshots_fig)[2])
    # without y the colours are the clusters of each snapshot
    np.testing.assert_array_equal(two.axes[1].collections[0].get_array(), recorded.snapshots[-1][2])


def test_embedding_snapshots_panel_count_rules():
    z = np.random.default_rng(0).normal(size=(10, 2))  # 2-D: no t-SNE needed
    snaps = [(s, z, np.zeros(10, int)) for s in (0, 5, 9)]
    assert [ax.get_title() for ax in plots.embedding_snapshots_figure(snaps, n_panels=1).axes] == ["iteration 9"]
    assert len(plots.embedding_snapshots_figure(snaps, n_panels=8).axes) == 3
    with pytest.raises(ValueError, match="n_panels must be >= 1; got n_panels=0"):
        plots.embedding_snapshots_figure(snaps, n_panels=0)
    with pytest.raises(ValueError, match="snapshots is empty"):
        plots.embedding_snapshots_figure([])
    with pytest.raises(ValueError, match=r"y must have shape \(m,\) = \(10,\) like the snapshots; got \(3,\)"):
        plots.embedding_snapshots_figure(snaps, y=np.zeros(3))


def test_self_training_curves_stack_delta_label_kl_and_accuracy_on_a_shared_x(recorded):
    fig = plots.self_training_curves_figure(recorded.history, tol=0.001)
    delta_ax, kl_ax, acc_ax = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["delta_label", r"KL$(P\,\|\,Q)$", "accuracy"]
    assert delta_ax.get_yscale() == "log"
    assert delta_ax.get_shared_x_axes().joined(delta_ax, acc_ax)
    # positive changes on the line, the two zero changes as markers, tol as a horizontal line
    changed, unchanged, tol_line = delta_ax.lines
    np.testing.assert_array_equal(changed.get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(unchanged.get_xdata(), [30, 40])
    assert list(tol_line.get_ydata()) == [0.001, 0.001]
    np.testing.assert_allclose(kl_ax.lines[0].get_ydata(), recorded.history["kl_loss"])
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), recorded.history["accuracy"])
    assert acc_ax.get_xlabel() == "iteration"


def test_self_training_curves_without_accuracy_has_two_axes_and_validates_history(recorded):
    history = {k: v for k, v in recorded.history.items() if k != "accuracy"}
    assert len(plots.self_training_curves_figure(history).axes) == 2
    with pytest.raises(ValueError, match="history must have the key 'delta_label'"):
        plots.self_training_curves_figure({"step": [0]})
    with pytest.raises(ValueError, match=r"history\['kl_loss'\] has 1 entries for 2 steps"):
        plots.self_training_curves_figure({"step": [0, 1], "delta_label": [1, 0.5], "kl_loss": [0.1]})


def test_gradient_vs_q_plots_every_point_against_q_of_the_largest_cluster(recorded):
    q, grad_norm = recorded.gradient["q"], recorded.gradient["grad_norm"]
    j = np.bincount(q.argmax(1), minlength=K).argmax()
    fig = plots.gradient_vs_q_figure(q, grad_norm)
    others, members = fig.axes[0].collections
    assert len(others.get_offsets()) + len(members.get_offsets()) == M
    np.testing.assert_allclose(members.get_offsets().data, np.c_[q[q.argmax(1) == j, j], grad_norm[q.argmax(1) == j]])
    assert f"$j={j}$" in fig.axes[0].get_xlabel()
    assert "partial L" in fig.axes[0].get_ylabel()


def test_gradient_vs_q_rejects_a_cluster_out_of_range(recorded):
    with pytest.raises(ValueError, match=r"cluster must be in \[0, 3\) for q with 3 clusters; got cluster=3"):
        plots.gradient_vs_q_figure(recorded.gradient["q"], recorded.gradient["grad_norm"], cluster=3)


def test_k_sweep_figure_marks_the_recommended_k():
    import pandas as pd

    table = pd.DataFrame({"k": [3, 4, 5], "generalizability": [0.9, 0.8, 0.4], "val_nmi": [0.5, 0.7, 0.6]})
    fig = plots.k_sweep_figure(table, recommended=4)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # G and, on a twin axis, NMI
    assert list(ax.lines[0].get_xdata()) == [3, 4, 5]
    assert "recommended k = 4" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_imbalance_figure_draws_a_line_per_method():
    import pandas as pd

    table = pd.DataFrame({"r_min": [0.1, 0.5, 0.1, 0.5], "method": ["dec", "dec", "kmeans", "kmeans"], "acc": [0.7, 0.8, 0.5, 0.55]})
    ax = plots.imbalance_figure(table).axes[0]
    assert [line.get_label() for line in ax.lines] == ["dec", "kmeans"]
    assert list(ax.lines[0].get_ydata()) == [0.7, 0.8]


# ---------------------------------------------------------------- degenerate embeddings never crash a figure
def test_identical_points_get_a_panel_saying_so_instead_of_a_crashed_process():
    # scikit-learn's Barnes-Hut t-SNE dies of a segmentation fault on identical points: run it where that cannot
    # take the test session down
    code = """
import json, warnings
import numpy as np
from dec_mlflow import plots
z = np.ones((1000, 10), np.float32)  # an embedding that collapsed to one point
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fig = plots.embedding_snapshots_figure([(0, z, np.zeros(1000, int)), (10, z, np.zeros(1000, int))])
    plots.embedding_figure(z, np.zeros(1000, int))
print(json.dumps([[w.category.__name__, str(w.message)] for w in caught]))
print(json.dumps([t.get_text() for t in fig.axes[0].texts]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-2000:]  # -11 was the segmentation fault
    warned, texts = proc.stdout.splitlines()[-2:]
    note = "all 1000 points share one embedding (no spread); t-SNE skipped"
    assert json.loads(warned) == [["FigureWarning", note]] * 3  # both panels and the evaluation figure
    assert json.loads(texts) == ["no t-SNE:\nall 1000 points share one embedding (no spread)"]


@pytest.mark.parametrize("make, problem", [
    (lambda z: np.where(np.arange(len(z))[:, None] == 3, np.nan, z), "the embedding has 5 NaN or infinite values"),
    (lambda z: z[:2], "2 points are too few for t-SNE"),
    (lambda z: np.zeros_like(z), f"all {M} points share one embedding (no spread)"),
    (lambda z: np.float32(1.0) + np.float32(1e-9) * z, f"all {M} points share one embedding (no spread)"),  # float32 rounding
], ids=["nan", "two-points", "zeros", "within-rounding"])
def test_an_embedding_tsne_cannot_lay_out_is_drawn_as_a_note_with_a_warning(make, problem):
    z = make(np.random.default_rng(0).normal(size=(M, 5)).astype(np.float32))
    assert plots.embedding_problem(z) == problem
    with pytest.warns(plots.FigureWarning, match=rf"^{re.escape(problem)}; t-SNE skipped$"):
        fig = plots.embedding_figure(z, np.zeros(len(z), int))
    assert [t.get_text() for t in fig.axes[0].texts] == [f"no t-SNE:\n{problem}"]


def test_an_embedding_near_float32s_limit_is_laid_out():
    z = np.random.default_rng(0).normal(size=(M, 5)) * 1e30  # PCA's eigensolver did not converge on it unscaled
    assert plots.embedding_problem(z) is None
    fig = plots.embedding_figure(z.astype(np.float32), np.arange(M) % 3)
    assert np.isfinite(fig.axes[0].collections[0].get_offsets()).all()
