"""The fg/bg mini-batch sampler's guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.training.sampling import FgBgSampler


def make_labels(n_fg: int, n_bg: int, n_ignored: int = 0, seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.random.default_rng(seed).integers(1, 21, n_fg), np.zeros(n_bg, int), -np.ones(n_ignored, int)])
    return np.random.default_rng(seed + 1).permutation(labels)


def composition(labels, batch):
    return int((labels[batch] > 0).sum()), int((labels[batch] == 0).sum())


def test_batches_hold_32_fg_and_96_bg_and_an_epoch_sees_every_fg_once():
    labels = make_labels(320, 5000, 300)
    sampler = FgBgSampler(labels)
    batches = list(sampler.epoch_batches(0))
    assert len(batches) == 10
    assert all(composition(labels, b) == (32, 96) for b in batches)
    fg = np.concatenate([b[labels[b] > 0] for b in batches])
    assert sorted(fg.tolist()) == np.flatnonzero(labels > 0).tolist()
    assert all(len(np.unique(b)) == len(b) for b in batches)


def test_last_batch_of_an_epoch_is_topped_up_with_background():
    labels = make_labels(70, 1000)
    batches = list(FgBgSampler(labels).epoch_batches(1))
    assert [composition(labels, b) for b in batches] == [(32, 96), (32, 96), (6, 122)]


def test_iteration_mode_keeps_the_fg_share_across_passes():
    labels = make_labels(70, 1000)
    batches = list(FgBgSampler(labels).epoch_batches(2, n_batches=50))
    assert len(batches) == 50
    assert all(composition(labels, b) == (32, 96) and len(np.unique(b)) == 128 for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=len(labels))[labels > 0]
    assert counts.max() - counts.min() <= 1  # 1600 draws from 70 in whole passes


def test_all_fg_when_background_runs_out():
    labels = make_labels(300, 40)
    batches = list(FgBgSampler(labels).epoch_batches(3, n_batches=5))
    assert all(composition(labels, b) == (88, 40) for b in batches)
    labels = make_labels(300, 0)
    batches = list(FgBgSampler(labels).epoch_batches(3))
    assert [composition(labels, b) for b in batches] == [(128, 0), (128, 0), (44, 0)]


def test_without_fg_an_epoch_covers_the_background_once():
    labels = make_labels(0, 300, 10)
    batches = list(FgBgSampler(labels).epoch_batches(4))
    assert [composition(labels, b) for b in batches] == [(0, 128), (0, 128), (0, 44)]
    assert sorted(np.concatenate(batches).tolist()) == np.flatnonzero(labels == 0).tolist()


def test_fewer_regions_than_a_batch():
    labels = make_labels(5, 10, 3)
    batches = list(FgBgSampler(labels).epoch_batches(5, n_batches=3))
    assert all(sorted(b.tolist()) == np.flatnonzero(labels >= 0).tolist() for b in batches)
    assert list(FgBgSampler(-np.ones(4, int)).epoch_batches(5)) == []


def test_ignored_regions_are_never_drawn():
    labels = make_labels(100, 400, 500)
    batches = list(FgBgSampler(labels).epoch_batches(6, n_batches=40))
    assert (labels[np.concatenate(batches)] >= 0).all()


def test_same_seed_same_batches():
    sampler = FgBgSampler(make_labels(200, 3000, 100))
    first = list(sampler.epoch_batches(7, n_batches=12))
    again = list(sampler.epoch_batches(np.random.default_rng(7), n_batches=12))
    other = list(sampler.epoch_batches(8, n_batches=12))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_fg_in_a_batch_is_a_uniform_draw():
    # Which fg land in the first batch, over many seeds: chi-square against uniform.
    labels = make_labels(64, 500)
    fg = np.flatnonzero(labels > 0)
    sampler = FgBgSampler(labels)
    counts = np.zeros(len(labels))
    n_seeds = 600
    for seed in range(n_seeds):
        counts += np.bincount(next(iter(sampler.epoch_batches(seed))), minlength=len(labels))
    expected = n_seeds * 32 / len(fg)
    chi2 = (((counts[fg] - expected) ** 2) / expected).sum()
    # 63 degrees of freedom: mean 63, sd ~11; 110 is p < 1e-4.
    assert chi2 < 110


def test_per_image_construction_locates_regions():
    per_image = [np.array([0, 1, -1]), np.array([], int), np.array([3, 0])]
    sampler = FgBgSampler.from_image_labels(per_image, batch_size=4, fg_fraction=0.5)
    assert sampler.labels.tolist() == [0, 1, -1, 3, 0]
    image, region = sampler.locate(np.array([0, 3, 4]))
    assert image.tolist() == [0, 2, 2] and region.tolist() == [0, 0, 1]
    (batch,) = sampler.epoch_batches(0)
    assert sorted(batch.tolist()) == [0, 1, 3, 4]


def test_small_fg_fraction_still_draws_fg_and_zero_is_rejected():
    sampler = FgBgSampler(make_labels(10, 100), batch_size=4, fg_fraction=0.1)
    assert sampler.fg_per_batch == 1
    with pytest.raises(ValueError, match="fg_fraction"):
        FgBgSampler(make_labels(10, 100), fg_fraction=0.0)
