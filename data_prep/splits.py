"""Deterministic train/val/test assignment (pure functions of the kept images and a seed).

- `random`: stratified by label; ratios of 2 give train/test (the original notebook's 80/20), 3 give
  train/val/test. Note the original notebook's random split put the same *people* in train and test, which
  inflates accuracy: a model can recognise the person rather than the gender.
- `official`: CelebA's partition file (0 train, 1 val, 2 test), identity-disjoint by design.
- `identity`: no person in two splits; labels stratified as far as whole people allow.
Every function sorts its input first, so the result depends only on the set of images and the seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gendertune.data_prep import celeba
from gendertune.data_prep.errors import PrepInputError

PARTITION_NAMES = {0: "train", 1: "val", 2: "test"}


def split_names(n_ratios: int) -> tuple[str, ...]:
    return ("train", "test") if n_ratios == 2 else ("train", "val", "test")


def _allocate(n: int, ratios: tuple[float, ...]) -> np.ndarray:
    """Split n items by ratios with the largest-remainder rule (counts sum to n exactly)."""
    exact = np.asarray(ratios) * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def random_stratified_split(images: pd.DataFrame, ratios: tuple[float, ...], seed: int) -> pd.Series:
    """Shuffle each class separately and cut it by `ratios`; returns split name per image_id."""
    names = split_names(len(ratios))
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in sorted(images["label"].unique()):
        ids = np.sort(images.loc[images["label"] == label, "image_id"].to_numpy())
        ids = ids[rng.permutation(len(ids))]
        start = 0
        for name, count in zip(names, _allocate(len(ids), ratios)):
            assignment.update(dict.fromkeys(ids[start : start + count], name))
            start += count
    return pd.Series(assignment, name="split").reindex(images["image_id"].to_numpy())


def official_split(images: pd.DataFrame, partition: pd.Series, partition_path: str) -> pd.Series:
    """Use CelebA's own partition; every kept image must be listed in it."""
    found = partition.reindex(images["image_id"].to_numpy())
    missing = found[found.isna()]
    if len(missing):
        raise PrepInputError(
            f"{partition_path}: {len(missing)} image(s) have no partition (e.g. {missing.index[0]}); "
            "use --split random or identity, or add them to the partition file"
        )
    return found.astype(int).map(PARTITION_NAMES).rename("split")


def identity_split(images: pd.DataFrame, ratios: tuple[float, ...], seed: int) -> pd.Series:
    """Assign whole identities to splits, keeping each split's size and class mix near the ratios.

    Greedy balanced partitioning: people are visited largest first (ties in seeded random order),
    each going to the split whose per-class deficit against its target is largest. Largest-first
    is what keeps the final sizes close to the ratios when group sizes differ.
    """
    if images["identity"].isna().any():
        missing = images.loc[images["identity"].isna(), "image_id"].iloc[0]
        raise PrepInputError(
            f"identity split: {images['identity'].isna().sum()} image(s) have no identity "
            f"(e.g. {missing}); every image needs a line in the identity file"
        )
    names = split_names(len(ratios))
    ratios_arr = np.asarray(ratios)
    per_person = images.groupby("identity")["label"].agg(["size", "sum"]).rename(columns={"sum": "male"}).sort_index()
    per_person["female"] = per_person["size"] - per_person["male"]
    rng = np.random.default_rng(seed)
    per_person["tiebreak"] = rng.permutation(len(per_person))
    per_person = per_person.sort_values(["size", "tiebreak"], ascending=[False, True])

    totals = per_person[["female", "male"]].sum().to_numpy(dtype=float)
    targets = ratios_arr[:, None] * totals[None, :]  # split x class
    filled = np.zeros_like(targets)
    person_split = {}
    for identity, row in per_person.iterrows():
        counts = np.array([row["female"], row["male"]], dtype=float)
        # Deficit of each split for the classes this person brings, relative to its target.
        deficit = ((targets - filled) * counts[None, :]).sum(axis=1) / np.maximum(
            (targets * counts[None, :]).sum(axis=1), 1e-9
        )
        choice = int(np.argmax(deficit))
        filled[choice] += counts
        person_split[identity] = names[choice]
    return images["identity"].map(person_split).set_axis(images["image_id"].to_numpy()).rename("split")


def assign_splits(
    images: pd.DataFrame,
    *,
    method: str,
    ratios: tuple[float, ...],
    seed: int,
    partition: pd.Series | None = None,
    partition_path: str = celeba.PARTITION_FILE,
) -> pd.Series:
    """Dispatch to one split method; `images` has image_id, label and (for identity) identity."""
    images = images.sort_values("image_id").reset_index(drop=True)
    if method == "random":
        return random_stratified_split(images, ratios, seed)
    if method == "official":
        if partition is None:
            raise PrepInputError(f"--split official needs {celeba.PARTITION_FILE} in the data folder")
        return official_split(images, partition, partition_path)
    if method == "identity":
        return identity_split(images, ratios, seed)
    raise PrepInputError(f"unknown split method {method!r}; use random, official or identity")
