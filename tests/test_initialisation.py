"""Initial clusterings of an embedding: k-means and the manifold (UMAP + GMM) initialisation."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA

from dec_mlflow.initialisation import (
    K_HIDDEN_DEPTH, K_SPLIT_STARTS, VALLEY_DEPTH, InputSpace, choose_k, cluster_map, describe_k_choice, k_candidates,
    split_in_two,
    supported_cuts, valley_depth, valley_splits, initial_clustering, kmeans_init, manifold_init, prototypes,
)
from dec_mlflow.metrics import cluster_accuracy


@pytest.fixture(scope="module")
def blobs():
    z, y = make_blobs(400, n_features=5, centers=4, cluster_std=0.5, random_state=0)
    return z.astype(np.float32), y


def test_kmeans_init_recovers_blobs_and_has_no_posteriors(blobs):
    init = kmeans_init(blobs[0], 4, n_init=3, seed=0)
    assert cluster_accuracy(blobs[1], init.labels) == 1.0
    assert init.centroids.shape == (4, 5) and init.posteriors is None


def test_manifold_init_recovers_blobs_with_posteriors(blobs):
    init = manifold_init(blobs[0], 4, seed=0)
    assert cluster_accuracy(blobs[1], init.labels) == 1.0
    assert init.posteriors.shape == (400, 4)
    np.testing.assert_allclose(init.posteriors.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(init.posteriors.argmax(1), init.labels)
    # centroids are the mean embedding of each cluster
    for j in range(4):
        np.testing.assert_allclose(init.centroids[j], blobs[0][init.labels == j].mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_manifold_init_separates_stretched_blobs_where_kmeans_cuts_them(seed):
    # scikit-learn's "k-means assumptions" example: three blobs sheared so that k-means cuts across them.
    # (Two moons are not a case it holds: a 2-d UMAP of them breaks into pieces and the GMM joins pieces of
    # both moons on some seeds; docs/recipe.md says so.)
    x, y = make_blobs(n_samples=600, random_state=170)
    z = (x @ [[0.6, -0.6], [-0.4, 0.8]]).astype(np.float32)
    assert cluster_accuracy(y, kmeans_init(z, 3, n_init=10, seed=0).labels) < 0.85
    assert cluster_accuracy(y, manifold_init(z, 3, seed=seed).labels) > 0.99


def test_manifold_init_same_seed_same_result(blobs):
    a, b = manifold_init(blobs[0], 4, seed=3), manifold_init(blobs[0], 4, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_manifold_init_needs_more_samples_than_clusters():
    with pytest.raises(ValueError, match="needs more samples than clusters; got n_samples=3, n_clusters=3"):
        manifold_init(np.zeros((3, 2), np.float32), 3, seed=0)


def test_cluster_map_keeps_the_most_likely_of_several_gmm_starts():
    # 8 blobs where the single GMM start of seed 1 merges two of them (ACC 0.80); the most likely of ten does not
    u, y = make_blobs(n_samples=[300] * 8, n_features=2, cluster_std=[0.5] * 4 + [2, 2] + [0.5] * 2, random_state=0,
                      center_box=(-12, 12))
    init = cluster_map(u, u, 8, seed=1)
    assert cluster_accuracy(y, init.labels) > 0.95


def test_exact_neighbours_match_scikit_learns_and_report_progress():
    from sklearn.neighbors import NearestNeighbors

    from dec_mlflow.callbacks import Callback
    from dec_mlflow.initialisation import nearest_neighbours

    f = np.random.default_rng(0).standard_normal((3000, 7)).astype(np.float32)
    steps = []

    class Steps(Callback):
        def on_step(self, stage, step, metrics):
            steps.append((stage, step))

    index, distance = nearest_neighbours(f, 5, block=1000, callback=Steps())
    want_d, want_i = NearestNeighbors(n_neighbors=5).fit(f).kneighbors(f)
    np.testing.assert_array_equal(index, want_i)
    np.testing.assert_allclose(distance, want_d, atol=5e-3)  # |a|^2 - 2ab + |b|^2 in float32
    assert steps == [("init/neighbours", 1000), ("init/neighbours", 2000), ("init/neighbours", 3000)]


def test_prototypes_are_orthogonal_at_the_radius_and_seeded():
    from dec_mlflow.initialisation import PROTOTYPE_RADIUS, prototypes

    p = prototypes(4, 10, seed=3)
    np.testing.assert_allclose(p @ p.T, PROTOTYPE_RADIUS ** 2 * np.eye(4), atol=1e-4)
    np.testing.assert_array_equal(p, prototypes(4, 10, seed=3))
    assert not np.allclose(p, prototypes(4, 10, seed=4))
    wide = prototypes(12, 3, seed=0)  # more clusters than dimensions: unit directions at the radius
    np.testing.assert_allclose(np.linalg.norm(wide, axis=1), PROTOTYPE_RADIUS, rtol=1e-5)


def test_input_space_reduces_wide_input_and_blurs_and_shifts_small_image_sets_only():
    from dec_mlflow.initialisation import blur_images, input_space, shifted_images

    rng = np.random.default_rng(0)
    x = rng.random((300, 64)).astype(np.float32)
    offset, scale = np.zeros(64, np.float32), np.full(64, 0.5, np.float32)
    reduced = input_space(x, offset, scale, seed=0, n_components=10)
    assert reduced.points.shape == (300, 10) and reduced.points.dtype == np.float32 and reduced.shifted is None
    np.testing.assert_array_equal(reduced.points, input_space(x, offset, scale, seed=0, n_components=10).points)
    narrow = input_space(x, offset, scale, seed=0, image_shape=(8, 8), n_components=100)  # not wider: kept, blurred
    np.testing.assert_allclose(narrow.points, blur_images(x * 0.5, (8, 8)), rtol=1e-5)
    assert not np.allclose(narrow.points, x * 0.5)
    assert narrow.shifted.shape == (8, 300, 64)  # the eight one-pixel shifts of each blurred image
    np.testing.assert_allclose(narrow.shifted[0], shifted_images(narrow.points, (8, 8))[0], rtol=1e-6)
    wide = input_space(x, offset, scale, seed=0, image_shape=(8, 8), n_components=10)  # reduced alike
    assert wide.points.shape == (300, 10) and wide.shifted.shape == (8, 300, 10)
    image = np.zeros((1, 81), np.float32)
    image[0, 40] = 1.0  # one lit pixel in the middle of a 9 x 9 image spreads to its neighbours, keeping its mass
    blurred = blur_images(image, (9, 9)).reshape(9, 9)
    assert blurred[4, 4] < 1.0 and blurred[4, 5] > 0 and blurred.sum() == pytest.approx(1.0, abs=1e-3)


def test_shifted_images_move_each_image_one_pixel_and_fill_with_zeros():
    from dec_mlflow.initialisation import shifted_images

    image = np.arange(1, 10, dtype=np.float32).reshape(1, 9)  # 3 x 3: 1 2 3 / 4 5 6 / 7 8 9
    views = [v.reshape(3, 3) for v in shifted_images(image, (3, 3))]
    assert len(views) == 8
    np.testing.assert_array_equal(views[7], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])  # (1, 1): down and right by one
    np.testing.assert_array_equal(views[3], [[2, 3, 0], [5, 6, 0], [8, 9, 0]])  # (0, -1): left by one


@pytest.mark.parametrize("search", ["all pairs", "reranked candidates"])
def test_shift_invariant_neighbours_find_the_same_image_moved_a_pixel(search, monkeypatch):
    from dec_mlflow import initialisation
    from dec_mlflow.initialisation import nearest_neighbours, shifted_images

    if search == "reranked candidates":  # as above 30,000 rows: the plain nearest (here all) ranked by shifts
        monkeypatch.setattr(initialisation, "SHIFT_EXACT_MAX_ROWS", 10)

    rng = np.random.default_rng(0)
    strokes = (rng.random((40, 6, 6)) > 0.6).astype(np.float32)
    images = np.zeros((40, 8, 8), np.float32)
    images[:, 1:7, 1:7] = strokes  # a blank border: a one-pixel shift loses nothing
    moved = np.zeros_like(images)
    moved[:, 1:8, 1:8] = images[:, :7, :7]  # each image one pixel down and right
    x = np.concatenate([images, moved]).reshape(80, 64)
    shifted = np.stack(shifted_images(x, (8, 8)))
    plain, _ = nearest_neighbours(x, 2)
    index, distance = nearest_neighbours(x, 2, shifted=shifted, block=32)
    twin = np.r_[np.arange(40, 80), np.arange(40)]
    assert (index[:, 0] == np.arange(80)).all() and (index[:, 1] == twin).all()
    np.testing.assert_allclose(distance, 0.0, atol=1e-3)  # the same strokes, a pixel apart
    assert (plain[:, 1] != twin).mean() > 0.5  # plain distances mostly miss them
    again, _ = nearest_neighbours(x, 2, shifted=shifted, block=32)
    np.testing.assert_array_equal(index, again)


def test_reranked_neighbours_are_the_nearest_by_the_shift_invariant_distance_computed_directly(monkeypatch):
    from dec_mlflow import initialisation
    from dec_mlflow.initialisation import nearest_neighbours, shifted_images

    monkeypatch.setattr(initialisation, "SHIFT_EXACT_MAX_ROWS", 10)  # rerank every row's candidates (here all rows)
    x = np.random.default_rng(1).random((60, 36)).astype(np.float32)
    views = np.stack(shifted_images(x, (6, 6)))  # (8, 60, 36)
    pair = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))  # |a - b|
    for view in views:  # |v(a) - b| and |a - v(b)|
        pair = np.minimum(pair, np.sqrt(((view[:, None] - x[None]) ** 2).sum(-1)))
        pair = np.minimum(pair, np.sqrt(((x[:, None] - view[None]) ** 2).sum(-1)))
    np.fill_diagonal(pair, 0.0)
    index, distance = nearest_neighbours(x, 5, shifted=views, block=16)
    np.testing.assert_allclose(distance, np.sort(pair, 1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(index[:, 0], np.arange(60))
    np.testing.assert_allclose(np.take_along_axis(pair, index, 1), distance, rtol=1e-4, atol=1e-4)


def test_input_space_reduces_each_shifted_view_exactly_as_a_separate_copy_of_it():
    from dec_mlflow.initialisation import blur_images, input_space, shifted_images

    x = np.random.default_rng(0).random((300, 64)).astype(np.float32)
    offset, scale = np.zeros(64, np.float32), np.full(64, 0.5, np.float32)
    space = input_space(x, offset, scale, seed=0, image_shape=(8, 8), n_components=10)
    pca = PCA(10, svd_solver="randomized", random_state=0).fit(blur_images(x * 0.5, (8, 8)))  # as input_space fits it
    views = shifted_images(blur_images(x * 0.5, (8, 8)), (8, 8))  # eight separate arrays
    assert len({id(v) for v in views}) == 8 and not np.array_equal(views[0], views[1])
    np.testing.assert_array_equal(space.shifted, np.stack([pca.transform(v).astype(np.float32) for v in views]))


@pytest.fixture(scope="module")
def unequal_blobs():
    # three groups of sizes 1:2:4 in 20 dimensions, as n_clusters='auto' meets them in the benchmark
    z, y = make_blobs(n_samples=[100, 200, 400], n_features=20, center_box=(-10, 10), cluster_std=2.5, random_state=0)
    return z.astype(np.float32), y


def test_auto_k_finds_unequal_groups_and_scores_every_candidate(unequal_blobs):
    z, y = unequal_blobs
    init = manifold_init(z, "auto", seed=0, k_range=(2, 8))
    assert len(init.centroids) == 3 and sorted(init.k_scores) == list(range(2, 9))
    # the two cuts between the groups cross empty gaps; the next one cuts a group where it is dense
    assert init.k_scores[2] < 0.05 and init.k_scores[3] < 0.05 and init.k_scores[4] > VALLEY_DEPTH
    assert cluster_accuracy(y, init.labels) > 0.99
    assert init.posteriors.shape == (700, 3)


def test_auto_k_range_is_capped_at_the_samples_and_checked():
    u = np.random.default_rng(0).normal(size=(6, 2))
    assert choose_k(u, 2, 20, seed=0) == (2, {})  # too few points to cut: the smallest k considered
    assert choose_k(u, 4, 20, seed=0) == (4, {})
    with pytest.raises(ValueError, match="n_clusters='auto' needs 2 <= k_min <= k_max <= n_samples - 1; got k_min=6"):
        choose_k(u, 6, 20, seed=0)


def test_valley_depth_is_zero_across_a_gap_and_one_without_a_valley():
    rng = np.random.default_rng(0)
    assert valley_depth(np.concatenate([rng.normal(-5, 1, 500), rng.normal(5, 1, 500)])) < 0.05
    assert valley_depth(rng.normal(0, 1, 1000)) > 0.9
    assert valley_depth(rng.uniform(0, 1, 2000)) > 0.6  # flat: no valley to speak of, however noisy
    touching = valley_depth(np.concatenate([rng.normal(-1.5, 1, 500), rng.normal(1.5, 1, 500)]))
    assert 0.3 < touching < 0.9  # two modes that touch: a shallow valley
    assert valley_depth(np.ones(10)) == 1.0


def test_choose_k_cuts_touching_groups_only_where_the_valley_is_deep():
    rng = np.random.default_rng(0)
    pair = lambda gap: np.vstack([rng.normal(0, 1, (600, 2)), rng.normal(0, 1, (600, 2)) + [gap, 0]])
    far, near = choose_k(pair(6.0), 2, 6, seed=0), choose_k(pair(1.5), 2, 6, seed=0)
    assert far[0] == 2 and far[1][2] < VALLEY_DEPTH and far[1][3] >= VALLEY_DEPTH
    assert near[1][2] >= VALLEY_DEPTH  # one bump: its best cut crosses no valley, so the range's smallest k
    assert choose_k(pair(6.0), 3, 6, seed=0)[0] == 3  # held within [k_min, k_max]
    one = rng.normal(0, 1, (1200, 2))
    assert choose_k(one, 2, 6, seed=0)[1] == choose_k(one, 2, 6, seed=0)[1]  # seeded


def test_choose_k_counts_a_group_that_every_split_of_its_cluster_ran_past():
    # a far group, and a flat bar with a clump 6 past its end: every two-component fit of bar and clump halves
    # the bar (no valley there: the cut is not supported), and the half holding the clump parts it across a gap
    rng = np.random.default_rng(0)
    bar = np.column_stack([rng.uniform(-10, 10, 1500), rng.normal(0, 0.3, 1500)])
    u = np.vstack([bar, rng.normal([16, 0], 0.3, (300, 2)), rng.normal([0, 30], 1.0, (600, 2))])
    depths, hidden = valley_splits(u, 8, seed=0)
    assert supported_cuts(depths) == 2 and depths[3] >= VALLEY_DEPTH  # far group | the rest, then the bar halved
    assert hidden == 1 and depths[4] < K_HIDDEN_DEPTH  # the clump, parted once the bar is halved
    assert choose_k(u, 2, 8, seed=0) == (3, depths)
    assert choose_k(u, 2, 2, seed=0)[0] == 2  # still held within [k_min, k_max]
    pair = np.vstack([rng.normal(0, 1, (600, 2)), rng.normal(0, 1, (600, 2)) + [6, 0]])
    assert valley_splits(pair, 6, seed=0)[1] == 0  # two groups and nothing past them: no hidden valley


def test_the_sentence_on_the_choice_of_k_says_what_made_k_and_how_deep_the_next_cut_is():
    depths = {2: 0.01, 3: 0.05, 4: 0.24, 5: 0.6}  # three clusters, then a cut the map does not support
    plain = describe_k_choice(3, depths, 2, 20)
    assert plain.startswith(f"n_clusters=auto chose k = 3: 3 clusters parted by density valleys below {VALLEY_DEPTH}")
    assert "the first cut it does not support, to 4 clusters, has a valley of 0.24" in plain and "k_min" not in plain and "plus" not in plain
    assert "plus 1 inside a cut the map does not support" in describe_k_choice(4, depths, 2, 20)
    assert ", raised to k_min = 5" in describe_k_choice(5, depths, 5, 20)
    assert ", held at k_max = 2" in describe_k_choice(2, {2: 0.01, 3: 0.05}, 2, 2)
    assert "does not support, to" not in describe_k_choice(3, {2: 0.01, 3: 0.05}, 2, 3)  # every possible cut was supported


def test_a_split_from_several_starts_keeps_the_deepest_valley_never_a_shallower_one():
    # a far small group and two big groups that touch (a mixture of three groups found by a search over seeded
    # draws): the more likely two-component fit cuts between the touching pair, across a shallow valley with the
    # far group on one side; another start parts the far group across an empty gap
    rng = np.random.default_rng(116)
    sizes = rng.integers(50, 600, rng.integers(3, 5))  # three groups: 144, 326 and 532 points
    centres = rng.uniform(-5, 5, (len(sizes), 3))
    x = np.vstack([rng.normal(size=(m, 3)) * rng.uniform(0.4, 1.5, 3) + c for m, c in zip(sizes, centres)])
    one, _ = split_in_two(x, seed=0)
    deepest, labels = split_in_two(x, seed=0, starts=K_SPLIT_STARTS)
    assert one > VALLEY_DEPTH and deepest < 0.1
    assert sorted(np.bincount(labels)) == [sizes.min(), sizes.sum() - sizes.min()]  # the far group, whole
    for draw in range(3):  # more starts never give up the first start's valley
        y = make_blobs(600, n_features=3, centers=3, cluster_std=2.0, random_state=draw)[0]
        assert split_in_two(y, seed=draw, starts=K_SPLIT_STARTS)[0] <= split_in_two(y, seed=draw)[0]


def test_k_candidates_refuse_a_bad_range_before_fitting_and_score_each_k_by_its_silhouette(unequal_blobs):
    z, _ = unequal_blobs
    with pytest.raises(ValueError, match="got k_min=5, k_max=4"):
        k_candidates(z, 5, 4, seed=0)  # at the call, not at the first candidate
    candidates = list(k_candidates(z, 2, 5, seed=0))
    assert [c[0] for c in candidates] == [2, 3, 4, 5]
    assert all(c[2].n_components == c[0] and len(c[3]) == len(z) for c in candidates)
    scores = {k: silhouette for k, silhouette, _, _ in candidates}
    assert max(scores, key=scores.get) == 3 and all(-1 <= v <= 1 for v in scores.values())


def test_initial_clustering_of_an_untrained_encoder_starts_at_prototypes_at_scale_one(unequal_blobs):
    z, y = unequal_blobs
    embedding = np.random.default_rng(0).normal(size=(len(z), 4)).astype(np.float32)  # an untrained encoder's: no clusters
    init, scale = initial_clustering(embedding, 3, init="manifold", seed=0, n_init=3, space=InputSpace(z))
    assert scale == 1.0 and cluster_accuracy(y, init.labels) > 0.99  # the clusters come from the input space
    np.testing.assert_array_equal(init.centroids, prototypes(3, 4, seed=0))


def test_initial_clustering_by_kmeans_scales_the_embedding_to_the_kernels_distance(blobs):
    init, scale = initial_clustering(blobs[0], 4, init="kmeans", seed=0, n_init=3)
    assert init.posteriors is None and cluster_accuracy(blobs[1], init.labels) == 1.0
    within = np.square(blobs[0] * scale - init.centroids[init.labels] * scale).sum(1).mean()
    assert within == pytest.approx(9.0, rel=1e-4)  # WITHIN_CLUSTER_SQ_DIST
