"""Sample-quality figures on Inception features (fid.py): Kernel Inception Distance and improved
precision and recall."""

import numpy as np
import pytest

import fid


def gaussian_feats(n, dims=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dims))


# ---------------------------------------------------------------- KID

def test_kid_is_zero_for_one_distribution_and_positive_for_a_shift():
    feats = gaussian_feats(1200)
    same_mean, same_std = fid.kernel_inception_distance(feats[:600], feats[600:], n_subsets=20, subset_size=300)
    shifted_mean, _ = fid.kernel_inception_distance(feats[:600], gaussian_feats(600, shift=0.5, seed=1),
                                                    n_subsets=20, subset_size=300)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * max(abs(same_mean), same_std)


def naive_unbiased_mmd2(x, y):
    """Gretton et al. 2012's unbiased MMD^2_u, pair by pair, with KID's kernel."""
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_textbook_formula_on_a_small_case():
    x, y = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [2.0, 0.0]])
    # By hand, D = 2: k(x1,x2) = 1, k(y1,y2) = 8, k(x,y) = 3.375, 1, 3.375, 8, so the MMD^2 is
    # (1 + 1) / 2 + (8 + 8) / 2 - 2 (3.375 + 1 + 3.375 + 8) / 4 = 1.125.
    mean, std = fid.kernel_inception_distance(x, y, n_subsets=3, subset_size=2)
    assert mean == pytest.approx(1.125) and std == pytest.approx(0.0, abs=1e-12)
    a, b = gaussian_feats(12, dims=5, seed=2), gaussian_feats(9, dims=5, shift=0.3, seed=3)
    mean, _ = fid.kernel_inception_distance(a, b, n_subsets=1, subset_size=100, seed=4)
    rng = np.random.RandomState(4)  # the subsets KID draws: capped at 9, real set first
    assert mean == pytest.approx(naive_unbiased_mmd2(a[rng.choice(12, 9, replace=False)],
                                                     b[rng.choice(9, 9, replace=False)]), rel=1e-10)


def test_kid_refuses_mismatched_or_tiny_sets():
    with pytest.raises(ValueError, match="same D"):
        fid.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        fid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- precision and recall

def test_precision_recall_of_a_set_against_itself_is_one_and_against_a_far_set_zero():
    feats = gaussian_feats(500)
    assert fid.precision_recall(feats, feats) == (1.0, 1.0)
    # Two draws of one distribution: near 1 (k-NN balls miss some of the support's edge).
    two_draws = fid.precision_recall(gaussian_feats(1000, dims=4, seed=1), gaussian_feats(1000, dims=4, seed=2))
    assert min(two_draws) > 0.9
    assert fid.precision_recall(feats, gaussian_feats(500, shift=10.0, seed=1)) == (0.0, 0.0)


def test_precision_recall_on_a_hand_computable_case():
    # Real: 0, 1, 3 on a line; with k = 1 the radii are 1, 1, 2. Fake: 0.5, 5, 10; radii 4.5, 4.5, 5.
    real, fake = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [5.0], [10.0]])
    precision, recall = fid.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)  # 0.5 (by 0 and 1) and 5 (on 3's boundary) are in
    assert recall == 1.0  # 0, 1, 3 all lie within 4.5 of 0.5


def test_precision_recall_chunks_give_the_unchunked_answer(monkeypatch):
    real, fake = gaussian_feats(230, dims=8), gaussian_feats(170, dims=8, shift=0.4, seed=1)
    whole = fid.precision_recall(real, fake, k=5)
    monkeypatch.setattr(fid, "ROWS_PER_CHUNK", 7)
    assert fid.precision_recall(real, fake, k=5) == whole


def test_precision_recall_refuses_k_as_large_as_a_set():
    with pytest.raises(ValueError, match="k must"):
        fid.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
