"""The prep stage end to end on real Ray with a generated (synthetic) sample."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import GENDERTUNE
from PIL import Image

from gendertune.cli import main
from gendertune.cluster.storage import OUTPUT_MARKER, OWNER_FILE, atomic_output_dir
from gendertune.data_prep import layout, pipeline
from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.errors import PrepInputError
from gendertune.data_prep.faces import (
    DETECTION_PASSES,
    LANDMARK_MODELS,
    NO_DETECTION,
    AlignSettings,
    FaceFinder,
    face_chips,
)
from gendertune.data_prep.images import load_photo
from gendertune.data_prep.labels import read_labels

SIZE = 32


def prep(sample, out, **overrides):
    config = PrepConfig.from_dict({"data": str(sample.path), "out": str(out), "image_size": SIZE, **overrides})
    return pipeline.run_prep(config)


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


def test_the_other_attributes_become_slices_of_every_kept_image(random_prep, synthetic_sample):
    out, _ = random_prep
    slices = pd.read_csv(out / layout.SLICES, dtype=str)
    labels = pd.read_csv(out / layout.LABELS, dtype={"image_id": str})
    assert slices["image_id"].tolist() == labels["image_id"].tolist()
    assert len(slices.columns) == 1 + 39 and "Male" not in slices.columns  # CelebA's other 39 attributes
    assert set(slices["Eyeglasses"]) <= {"yes", "no"}
    raw = pd.read_csv(synthetic_sample.path / "list_attr_celeba.txt", sep=r"\s+", skiprows=1)
    first = slices.iloc[0]
    assert first["Young"] == ("yes" if raw.loc[first["image_id"], "Young"] == 1 else "no")


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
    """The original notebook's layout: a folder of images plus images,Male with 0/1 values."""
    folder = tmp_path / "faces"
    shutil.copytree(synthetic_sample.path / "img_align_celeba", folder)
    labels = read_labels(synthetic_sample.path / "list_attr_celeba.txt", "Male")
    labels.iloc[:-5].rename(columns={"image_id": "images", "label": "Male"}).to_csv(
        tmp_path / "gender_classification.csv", index=False
    )
    out = tmp_path / "out"
    code = main(
        [
            "prep",
            "--data",
            str(folder),
            "--labels",
            str(tmp_path / "gender_classification.csv"),
            "--image-size",
            str(SIZE),
            "--ratios",
            "0.8,0.2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["unlabeled_images"] == 5
    assert list(pd.read_csv(out / layout.SLICES).columns) == ["image_id"]  # images,Male: no other columns
    assert "kept" in capsys.readouterr().out
    # A second run into the same folder is refused unless --overwrite, which then replaces it.
    assert (
        main(
            [
                "prep",
                "--data",
                str(folder),
                "--labels",
                str(tmp_path / "gender_classification.csv"),
                "--image-size",
                str(SIZE),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite never replaces a folder that is not a prep output (here: the user's images).
    assert main(["prep", "--data", str(synthetic_sample.path), "--out", str(folder), "--overwrite"]) == 2
    assert "is not a finished gendertune prep output" in capsys.readouterr().err
    assert len(list(folder.iterdir())) == synthetic_sample.n_images


def test_interrupted_run_leaves_no_complete_looking_output(ray_session, synthetic_sample, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "plot_class_distribution", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep(synthetic_sample, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writer_leaves_a_partial_folder_the_next_run_removes(tmp_path):
    final = tmp_path / "out"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from gendertune.cluster.storage import atomic_output_dir\n"
                "with atomic_output_dir(sys.argv[1], stage='prep', marker='manifest.json') as staging:\n"
                "    (staging / 'half.txt').write_text('half')\n"
                "    print('writing', flush=True)\n"
                "    time.sleep(120)\n"
            ),
            str(final),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)  # no cleanup runs: the staging folder stays
    writer.wait(timeout=10)
    left = list(tmp_path.glob(".out.partial-*"))
    assert len(left) == 1 and not final.exists()
    other_host = tmp_path / ".out.partial-elsewhere"
    other_host.mkdir()
    (other_host / OWNER_FILE).write_text(f"another-host {os.getpid()}\n")
    with atomic_output_dir(final, stage="prep", marker="manifest.json") as staging:
        (staging / "manifest.json").write_text("{}")
    assert not left[0].exists()  # its writer is dead: removed
    assert other_host.exists()  # written from another machine: not ours to judge
    assert sorted(p.name for p in final.iterdir()) == [OUTPUT_MARKER, "manifest.json"]


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


# --- face alignment ------------------------------------------------------------------------------


def test_face_alignment_is_recorded_per_image(random_prep):
    out, manifest = random_prep
    faces = pd.read_csv(out / layout.FACES, dtype={"image_id": str})
    labels = pd.read_csv(out / layout.LABELS, dtype={"image_id": str})
    assert faces["image_id"].tolist() == labels["image_id"].tolist()  # every kept image, sorted
    assert set(faces["alignment"]) == {"aligned", "centre_crop"}  # drawn faces: HOG finds most, not all
    assert manifest["faces_aligned"] == (faces["alignment"] == "aligned").sum() > manifest["kept"] / 2
    assert manifest["no_face"] == (faces["faces_found"] == 0).sum() == manifest["kept"] - manifest["faces_aligned"]
    assert manifest["several_faces"] == (faces["faces_found"] > 1).sum()
    alignment = manifest["alignment"]
    assert alignment["template"] == LANDMARK_MODELS["5"].template_name and alignment["landmarks"] == "5"
    assert alignment["image_size"] == SIZE and alignment["detector"] == "hog+upsample"
    aligned = faces[faces["alignment"] == "aligned"]
    assert aligned[pipeline.LANDMARK_COLUMNS].notna().all().all() and (aligned["w"] > 0).all()
    # dlib's 5 points, left to right: the eye corners, then the nose base below them.
    xs = aligned[["point1_x", "point2_x", "point3_x", "point4_x"]].to_numpy()
    assert (np.diff(xs, axis=1) > 0).all() and aligned["point5_y"].gt(aligned["point1_y"]).all()
    assert (
        set(aligned["detector"]) <= set(DETECTION_PASSES)
        and (faces.loc[faces["faces_found"] == 0, "detector"] == NO_DETECTION).all()
    )


def test_no_face_reject_and_align_none(ray_session, synthetic_sample, tmp_path, random_prep):
    out, aligned = random_prep
    rejecting = prep(synthetic_sample, tmp_path / "reject", no_face="reject")
    rejected = pd.read_csv(tmp_path / "reject" / layout.REJECTED, dtype=str)
    no_face = set(rejected.loc[rejected["reason"] == "no face found (--no-face reject)", "image_id"])
    faces = pd.read_csv(out / layout.FACES, dtype={"image_id": str})
    without_face = set(faces.loc[faces["alignment"] == "centre_crop", "image_id"])
    duplicates = pd.read_csv(out / layout.DUPLICATES, dtype=str)
    # Exact copies of a faceless image share its fate, as with any rejected image.
    copies = set(duplicates.loc[duplicates["kept_id"].isin(without_face), "dropped_id"])
    assert no_face == without_face | copies and rejecting["kept"] == aligned["faces_aligned"]
    plain = prep(synthetic_sample, tmp_path / "none", align="none")
    assert plain["alignment"] is None and plain["faces_aligned"] == plain["no_face"] == 0
    assert plain["kept"] == aligned["kept"] and not (tmp_path / "none" / layout.FACES).exists()


def test_real_photos_align_in_prep_exactly_as_face_chips_does(ray_session, synthetic_sample, tmp_path):
    """A real face, a two-face group photo and a photo with no face, among synthetic images."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test dependency ([test] extra)")
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_sample.path / "img_align_celeba", folder)
    astronaut = Image.fromarray(skimage_data.astronaut())
    group = Image.new("RGB", (1000, 560), (200, 200, 200))
    group.paste(astronaut.resize((360, 360)), (0, 100))
    group.paste(astronaut, (480, 20))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    photos = {"astronaut.png": astronaut, "group.png": group, "noise.png": noise}
    for name, photo in photos.items():
        photo.save(folder / name)
    labels = read_labels(synthetic_sample.path / "list_attr_celeba.txt", "Male")
    extra = pd.DataFrame({"image_id": list(photos), "label": [0, 0, 1]})
    pd.concat([labels, extra]).rename(columns={"image_id": "images", "label": "Male"}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    out = tmp_path / "out"
    manifest = prep(synthetic_sample, out, data=str(folder), labels=str(tmp_path / "labels.csv"))
    faces = pd.read_csv(out / layout.FACES).set_index("image_id")
    assert faces.loc["astronaut.png", "alignment"] == "aligned" and faces.loc["astronaut.png", "faces_found"] == 1
    assert faces.loc["group.png", "faces_found"] == 2 and faces.loc["group.png", "x"] > 480  # the larger face
    assert faces.loc["noise.png", "alignment"] == "centre_crop"
    assert manifest["several_faces"] >= 1
    shards = pd.concat([pq.read_table(out / split).to_pandas() for split in manifest["splits"]]).set_index("image_id")
    align = AlignSettings.from_dict(manifest["alignment"])
    finder = FaceFinder(align.detector, align.landmarks)
    for name in photos:
        (chip,), _ = face_chips(load_photo((folder / name).read_bytes()), finder, align, every_face=False)
        assert shards.loc[name, "pixels"] == chip.chip.tobytes(), name


def test_progress_counts_images_and_reports_the_end(caplog):
    caplog.set_level(logging.INFO, logger="gendertune")
    progress = pipeline.Progress("decode+align", [3, 2, 4], every_s=3600)
    progress(1)  # calls finish in any order
    progress(0)
    assert caplog.messages == []  # not due yet
    progress(2)
    lines = caplog.messages
    assert len(lines) == 1 and lines[0].startswith("decode+align: 9/9 images (100%), ") and lines[0].endswith(" img/s")
    every = pipeline.Progress("hash", [3, 2], every_s=0)
    every(0)
    assert caplog.messages[-1].startswith("hash: 3/5 images (60%)")


def test_fifos_and_symlinks_out_of_the_data_folder_are_rejected_with_their_reason(synthetic_sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_sample.path / "img_align_celeba", data)
    outside = tmp_path / "secret.jpg"
    shutil.copy(next(data.glob("*.jpg")), outside)
    os.mkfifo(data / "fifo.jpg")  # reading it would block forever
    (data / "escape.jpg").symlink_to(outside)
    labels = read_labels(synthetic_sample.path / "list_attr_celeba.txt", "Male")
    extra = pd.DataFrame({"image_id": ["fifo.jpg", "escape.jpg"], "label": [1, 0]})
    pd.concat([labels, extra]).rename(columns={"image_id": "image", "label": "Male"}).to_csv(
        data / "labels.csv", index=False
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *GENDERTUNE,
            "prep",
            "--data",
            str(data),
            "--out",
            str(out),
            "--image-size",
            "32",
            "--align",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = pd.read_csv(out / layout.REJECTED).set_index("image_id")["reason"]
    assert reasons["fifo.jpg"] == "not a regular file (a FIFO, device or socket)"
    assert reasons["escape.jpg"] == "a symlink leading out of the data folder"
