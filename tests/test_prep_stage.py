"""The prep stage end to end on real Ray with a generated (synthetic) sample."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from data_prep import layout, pipeline
from data_prep.config import PrepConfig
from data_prep.errors import PrepInputError
from data_prep.labels import read_labels

SIZE = 32


def prep(sample, out, **overrides):
    config = PrepConfig.from_dict({"data": str(sample.path), "out": str(out), "image_size": SIZE, **overrides})
    return pipeline.run_prep(config, log=lambda *_: None)


@pytest.fixture(scope="module")
def random_prep(ray_session, synthetic_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "random"
    return out, prep(synthetic_sample, out)


def test_counts_duplicates_and_rejects(random_prep, synthetic_sample):
    out, manifest = random_prep
    n = synthetic_sample.n_images
    assert manifest["images_found"] == n
    assert manifest["rejected"] == synthetic_sample.n_corrupt
    assert manifest["duplicates_dropped"] == synthetic_sample.n_duplicates
    assert manifest["kept"] == n - synthetic_sample.n_corrupt - synthetic_sample.n_duplicates
    assert manifest["unlabeled_images"] == 0 and manifest["labels_without_image"] == 0
    rejected = pd.read_csv(out / layout.REJECTED)
    assert set(rejected["image_id"]) == set(synthetic_sample.corrupt_ids)
    assert rejected["reason"].str.contains("truncated|corrupt").all()
    duplicates = pd.read_csv(out / layout.DUPLICATES, dtype=str)
    expected = {(original, copy) for copy, original in synthetic_sample.duplicate_pairs}
    assert set(zip(duplicates["kept_id"], duplicates["dropped_id"])) == expected
    # Files are recorded, never touched.
    for _, copy in expected:
        assert (synthetic_sample.path / "img_align_celeba" / copy).is_file()


def test_split_shards_match_manifest_and_labels(random_prep):
    out, manifest = random_prep
    labels = pd.read_csv(out / layout.LABELS, dtype={"image_id": str})
    assert set(manifest["splits"]) == {"train", "test"}
    overall = labels["label"].mean()
    for split, info in manifest["splits"].items():
        table = pq.read_table(out / split).to_pandas()
        assert len(table) == info["count"] == (labels["split"] == split).sum()
        assert info["classes"] == {"Female": int((table["label"] == 0).sum()), "Male": int((table["label"] == 1).sum())}
        assert table["pixels"].map(len).eq(SIZE * SIZE * 3).all()
        assert set(table.columns) >= set(layout.PARQUET_COLUMNS)
        merged = table.merge(labels, on="image_id", suffixes=("", "_csv"))
        assert (merged["label"] == merged["label_csv"]).all() and len(merged) == len(table)
        assert abs(table["label"].mean() - overall) < 0.03
    assert abs(manifest["splits"]["train"]["count"] / manifest["kept"] - 0.8) < 0.01
    assert json.loads((out / layout.CONFIG).read_text())["prep"]["image_size"] == SIZE
    assert (out / layout.CLASS_PLOT).stat().st_size > 1000
    assert not list(out.parent.glob(".*partial*"))


def test_rerun_gives_identical_splits_and_manifest(random_prep, synthetic_sample, tmp_path):
    out, manifest = random_prep
    again = prep(synthetic_sample, tmp_path / "again")
    assert again == manifest
    assert (tmp_path / "again" / layout.LABELS).read_bytes() == (out / layout.LABELS).read_bytes()


def test_official_and_identity_splits_keep_people_apart(ray_session, synthetic_sample, tmp_path):
    official = prep(synthetic_sample, tmp_path / "official", split="official")
    assert set(official["splits"]) == {"train", "val", "test"}
    assert official["identities_in_several_splits"] == 0
    ident = prep(synthetic_sample, tmp_path / "identity", split="identity", ratios=[0.7, 0.15, 0.15])
    assert ident["identities_in_several_splits"] == 0
    assert abs(ident["splits"]["train"]["count"] / ident["kept"] - 0.7) < 0.08


def test_csv_labels_with_a_plain_image_folder_via_cli(ray_session, synthetic_sample, tmp_path, capsys):
    """The seed's layout: a folder of images plus images,Male with 0/1 values."""
    folder = tmp_path / "faces"
    shutil.copytree(synthetic_sample.path / "img_align_celeba", folder)
    labels = read_labels(synthetic_sample.path / "list_attr_celeba.txt", "Male")
    labels.iloc[:-5].rename(columns={"image_id": "images", "label": "Male"}).to_csv(
        tmp_path / "gender_classification.csv", index=False)
    out = tmp_path / "out"
    code = main(["prep", "--data", str(folder), "--labels", str(tmp_path / "gender_classification.csv"),
                 "--image-size", str(SIZE), "--ratios", "0.8,0.2", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["unlabeled_images"] == 5
    assert "kept" in capsys.readouterr().out
    # A second run into the same folder is refused unless --overwrite, which then replaces it.
    assert main(["prep", "--data", str(folder), "--labels", str(tmp_path / "gender_classification.csv"),
                 "--image-size", str(SIZE), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite never replaces a folder that is not a prep output (here: the user's images).
    assert main(["prep", "--data", str(synthetic_sample.path), "--out", str(folder), "--overwrite"]) == 2
    assert "not a gendertune output" in capsys.readouterr().err
    assert len(list(folder.iterdir())) == synthetic_sample.n_images


def test_interrupted_run_leaves_no_complete_looking_output(ray_session, synthetic_sample, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "plot_class_distribution", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep(synthetic_sample, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_name_the_problem(synthetic_sample, tmp_path):
    with pytest.raises(PrepInputError, match="does not exist"):
        prep(synthetic_sample, tmp_path / "o", data=str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    shutil.copytree(synthetic_sample.path / "img_align_celeba", bare / "img_align_celeba")
    shutil.copy(synthetic_sample.path / "list_attr_celeba.txt", bare)
    with pytest.raises(PrepInputError, match="--split identity needs identity_CelebA.txt"):
        prep(synthetic_sample, tmp_path / "o", data=str(bare), split="identity")
    with pytest.raises(PrepInputError, match="--split official needs list_eval_partition.txt"):
        prep(synthetic_sample, tmp_path / "o", data=str(bare), split="official")
    other = tmp_path / "other.csv"
    other.write_text("images,Male\nsomeone_else.jpg,1\n")
    with pytest.raises(PrepInputError, match="none of the .* images .* has a label"):
        prep(synthetic_sample, tmp_path / "o", data=str(bare), labels=str(other))
    assert not (tmp_path / "o").exists()
