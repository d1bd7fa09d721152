"""Evaluation figures are built from the right data."""

import numpy as np

from dec_mlflow import plots


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
