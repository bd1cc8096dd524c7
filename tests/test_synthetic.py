"""Tests for gendertune.data_prep.synthetic: CelebA file-format fidelity, identity and
partition consistency, planted duplicates/corrupt files, determinism, and a
cheap check that the Male signal is learnable but not trivial."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gendertune.data_prep.synthetic import SampleSummary, make_sample

# Spelled out independently of the module so a typo there cannot hide.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
)
MALE_COLUMN = CELEBA_ATTRIBUTES.split().index("Male")
N = 240


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleSummary:
    return make_sample(tmp_path_factory.mktemp("syn") / "celeba", n=N, seed=0)


def _pairs(path: Path) -> dict[str, str]:
    return dict(line.split() for line in path.read_text().splitlines())


def _attr_rows(root: Path) -> dict[str, list[int]]:
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()[2:]
    return {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines}


def _ids(n: int) -> list[str]:
    return [f"{i:06d}.jpg" for i in range(1, n + 1)]


def test_attr_file_matches_celeba_format(sample: SampleSummary) -> None:
    raw = (sample.path / "list_attr_celeba.txt").read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    lines = raw.decode("ascii").split("\n")[:-1]
    assert lines[0] == str(N)
    assert lines[1] == CELEBA_ATTRIBUTES
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == _ids(N)
    # Every value sits right-aligned in a 2-wide column after one separator
    # space, so a positive value is preceded by two spaces, as in CelebA.
    row_re = re.compile(r"\d{6}\.jpg( -1|  1){40}")
    assert all(row_re.fullmatch(r) for r in rows)
    assert any("  1" in r for r in rows) and any(" -1" in r for r in rows)


def test_every_image_listed_once_in_every_file(sample: SampleSummary) -> None:
    on_disk = sorted(p.name for p in (sample.path / "img_align_celeba").iterdir())
    assert on_disk == _ids(N)
    for name in ("list_eval_partition.txt", "identity_CelebA.txt"):
        lines = (sample.path / name).read_text().splitlines()
        assert [line.split()[0] for line in lines] == _ids(N)
    assert set(_pairs(sample.path / "list_eval_partition.txt").values()) == {"0", "1", "2"}
    assert sample.n_images == N


def test_identity_has_one_male_label_and_one_partition(sample: SampleSummary) -> None:
    identity = _pairs(sample.path / "identity_CelebA.txt")
    partition = _pairs(sample.path / "list_eval_partition.txt")
    attrs = _attr_rows(sample.path)
    males: dict[str, set[int]] = defaultdict(set)
    parts: dict[str, set[str]] = defaultdict(set)
    for img, person in identity.items():
        males[person].add(attrs[img][MALE_COLUMN])
        parts[person].add(partition[img])
    assert len(males) == sample.n_people == N // 8
    assert all(len(v) == 1 for v in males.values())
    assert all(len(v) == 1 for v in parts.values()), "an identity crosses partitions"
    # Identities are split ~80/10/10 like CelebA; allow slack for small counts.
    train_share = sum(p == {"0"} for p in parts.values()) / len(parts)
    assert 0.7 <= train_share <= 0.9


def test_class_balance(sample: SampleSummary) -> None:
    male = [row[MALE_COLUMN] for row in _attr_rows(sample.path).values()]
    assert sum(v == 1 for v in male) == sample.n_male
    assert 0.35 <= sample.n_male / N <= 0.65


def test_planted_duplicates_are_the_only_byte_copies(sample: SampleSummary) -> None:
    assert sample.n_duplicates == len(sample.duplicate_pairs) == 3
    by_hash: dict[str, list[str]] = defaultdict(list)
    for p in sorted((sample.path / "img_align_celeba").iterdir()):
        by_hash[hashlib.sha256(p.read_bytes()).hexdigest()].append(p.name)
    found = {tuple(names) for names in by_hash.values() if len(names) > 1}
    assert found == {(orig, dup) for dup, orig in sample.duplicate_pairs}
    attrs = _attr_rows(sample.path)
    identity = _pairs(sample.path / "identity_CelebA.txt")
    partition = _pairs(sample.path / "list_eval_partition.txt")
    for dup, orig in sample.duplicate_pairs:
        assert attrs[dup] == attrs[orig]
        assert identity[dup] == identity[orig] and partition[dup] == partition[orig]


def test_only_planted_files_are_corrupt(sample: SampleSummary) -> None:
    assert sample.n_corrupt == len(sample.corrupt_ids) == 1
    for p in sorted((sample.path / "img_align_celeba").iterdir()):
        if p.name in sample.corrupt_ids:
            with pytest.raises(OSError), Image.open(p) as im:
                im.load()
        else:
            with Image.open(p) as im:
                im.load()
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (178, 218))
    assert set(sample.corrupt_ids) <= set(_attr_rows(sample.path))


def test_readme_says_synthetic(sample: SampleSummary) -> None:
    text = (sample.path / "README.txt").read_text()
    assert "SYNTHETIC" in text and "NOT CelebA" in text and "seed: 0" in text


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path: Path) -> None:
    a = make_sample(tmp_path / "a", n=40, seed=7)
    b = make_sample(tmp_path / "b", n=40, seed=7)
    c = make_sample(tmp_path / "c", n=40, seed=8)
    assert _tree_bytes(a.path) == _tree_bytes(b.path)
    assert a.duplicate_pairs == b.duplicate_pairs and a.corrupt_ids == b.corrupt_ids
    first_image = "img_align_celeba/000001.jpg"
    assert _tree_bytes(a.path)[first_image] != _tree_bytes(c.path)[first_image]


def test_image_size_is_honoured(tmp_path: Path) -> None:
    s = make_sample(tmp_path / "small", n=6, seed=1, image_size=(89, 109), n_duplicates=1, n_corrupt=1)
    with Image.open(s.path / "img_align_celeba" / "000001.jpg") as im:
        assert im.size == (89, 109)


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_sample(tmp_path, n=10)
    assert precious.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_sample(empty, n=10).n_images == 10


def test_rejects_impossible_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_sample(tmp_path / "x", n=4, n_duplicates=3, n_corrupt=1)
    with pytest.raises(ValueError):
        make_sample(tmp_path / "y", n=10, people=20)


@pytest.mark.integration  # trains a classifier for seconds
def test_male_signal_is_learnable_but_not_trivial(tmp_path: Path) -> None:
    # Folds are split by identity, so it is the number of identities, not of
    # images, that limits what a 256-feature linear model can learn; two
    # images per identity keeps this check stable across generator tweaks.
    s = make_sample(tmp_path / "learn", n=400, seed=0, people=200)
    skip = set(s.corrupt_ids) | {dup for dup, _ in s.duplicate_pairs}
    identity = _pairs(s.path / "identity_CelebA.txt")
    features, labels, groups = [], [], []
    for img, row in _attr_rows(s.path).items():
        if img in skip:
            continue
        with Image.open(s.path / "img_align_celeba" / img) as im:
            small = im.convert("L").resize((16, 16), Image.Resampling.BILINEAR)
        features.append(np.asarray(small, np.float32).ravel() / 255.0)
        labels.append(row[MALE_COLUMN] == 1)
        groups.append(identity[img])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    acc = cross_val_score(model, np.array(features), np.array(labels), groups=groups, cv=GroupKFold(5)).mean()
    assert 0.6 < acc < 0.99, f"held-out accuracy {acc:.3f}"
