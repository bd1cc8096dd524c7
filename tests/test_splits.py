"""Tests for gendertune.data_prep.splits: split properties (stratification, identity disjointness,
determinism) and the official split's errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gendertune.data_prep.errors import PrepInputError
from gendertune.data_prep.splits import assign_splits


def make_images(n_people=300, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(n_people):
        label = int(rng.random() < 0.3)  # imbalanced like CelebA (~42% male) but harsher
        for _ in range(int(rng.integers(1, 35))):
            rows.append((f"{len(rows):06d}.jpg", label, person))
    return pd.DataFrame(rows, columns=["image_id", "label", "identity"])


def class_share(images, split):
    joined = images.assign(split=split.to_numpy())
    return joined.groupby("split")["label"].mean(), joined.groupby("split").size() / len(joined)


@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.7, 0.15, 0.15)])
def test_random_split_is_stratified_within_one_point(ratios):
    images = make_images()
    split = assign_splits(images, method="random", ratios=ratios, seed=0)
    male_share, sizes = class_share(images, split)
    overall = images["label"].mean()
    assert (abs(male_share - overall) < 0.01).all()
    names = ["train", "test"] if len(ratios) == 2 else ["train", "val", "test"]
    assert np.allclose(sizes[names].to_numpy(), ratios, atol=0.002)


def test_splits_are_deterministic_and_order_independent():
    images = make_images()
    shuffled = images.sample(frac=1.0, random_state=3)
    for method in ("random", "identity"):
        a = assign_splits(images, method=method, ratios=(0.8, 0.1, 0.1), seed=7)
        b = assign_splits(shuffled, method=method, ratios=(0.8, 0.1, 0.1), seed=7)
        assert a.sort_index().equals(b.sort_index())
    c = assign_splits(images, method="random", ratios=(0.8, 0.1, 0.1), seed=8)
    assert not a.sort_index().equals(c.sort_index())


def test_identity_split_is_disjoint_and_roughly_stratified():
    images = make_images()
    split = assign_splits(images, method="identity", ratios=(0.8, 0.1, 0.1), seed=0)
    joined = images.assign(split=split.reindex(images["image_id"]).to_numpy())
    assert (joined.groupby("identity")["split"].nunique() == 1).all()
    male_share, sizes = class_share(images, split.reindex(images["image_id"]))
    assert (abs(male_share - images["label"].mean()) < 0.03).all()
    assert np.allclose(sizes[["train", "val", "test"]].to_numpy(), (0.8, 0.1, 0.1), atol=0.02)


def test_random_split_shares_people_which_identity_split_avoids():
    """The original notebook's leak: a random split puts the same person in train and test."""
    images = make_images()
    split = assign_splits(images, method="random", ratios=(0.8, 0.2), seed=0)
    joined = images.assign(split=split.reindex(images["image_id"]).to_numpy())
    assert (joined.groupby("identity")["split"].nunique() > 1).sum() > 50


def test_official_split_and_its_errors():
    images = pd.DataFrame({"image_id": ["a.jpg", "b.jpg", "c.jpg"], "label": [0, 1, 1]})
    partition = pd.Series([0, 1, 2], index=["a.jpg", "b.jpg", "c.jpg"])
    split = assign_splits(images, method="official", ratios=(), seed=0, partition=partition)
    assert split.to_dict() == {"a.jpg": "train", "b.jpg": "val", "c.jpg": "test"}
    with pytest.raises(PrepInputError, match="1 image\\(s\\) have no partition"):
        assign_splits(images, method="official", ratios=(), seed=0, partition=partition.iloc[:2])
    with pytest.raises(PrepInputError, match="needs list_eval_partition.txt"):
        assign_splits(images, method="official", ratios=(), seed=0)
    with pytest.raises(PrepInputError, match="have no identity"):
        assign_splits(images.assign(identity=[1, None, 2]), method="identity", ratios=(0.5, 0.5), seed=0)
