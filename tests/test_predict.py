"""predict's RunModel (gendertune.tuning.evaluate.predict) on run folders the tests write themselves: an
untrained network saved as `train` saves one, so no training is needed to check what predict does
with its settings: flip test-time augmentation, the stored decision threshold, small faces in a
group photo. (tests/test_train.py checks predict against a trained run's own evaluation.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gendertune.data_prep.faces import AlignSettings
from gendertune.models.registry import build_model, get_spec
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.predict import RunModel

SIZE = 32


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", image_size=SIZE).eval()


def run_folder(folder, network, *, alignment: AlignSettings | None = None, **decision) -> RunModel:
    """`network` saved as a run folder (centre squares without `alignment`), loaded as predict loads it."""
    spec = get_spec("resnet18")
    folder.mkdir(exist_ok=True)
    torch.save(
        {
            "format_version": run_layout.MODEL_FORMAT_VERSION,
            "model": network.state_dict(),
            "model_name": "resnet18",
            "image_size": SIZE,
            "prep_image_size": SIZE,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "class_names": ["Female", "Male"],
            "alignment": alignment.to_dict() if alignment else None,
            "temperature": 1.0,
            **decision,
        },
        folder / run_layout.MODEL,
    )
    (folder / run_layout.METRICS).write_text("{}")  # finished, as far as predict's check goes
    return RunModel(folder)


def test_flip_tta_gives_a_photo_and_its_mirror_image_the_same_probability(network, tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    ImageOps.mirror(photo).save(tmp_path / "mirror.png")
    paths = [str(tmp_path / "photo.png"), str(tmp_path / "mirror.png")]
    plain = run_folder(tmp_path / "plain", network).predict_paths(paths)["prob_male"].to_numpy()
    flipped = run_folder(tmp_path / "flip", network, tta="flip").predict_paths(paths)["prob_male"].to_numpy()
    assert abs(plain[0] - plain[1]) > 1e-4 and abs(flipped[0] - flipped[1]) < 1e-6
    assert min(plain) - 1e-6 <= flipped[0] <= max(plain) + 1e-6  # the mean of the two margins lies between them


def test_predict_decides_at_the_stored_threshold(network, tmp_path):
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    prob = float(run_folder(tmp_path, network).predict_paths([str(tmp_path / "photo.png")])["prob_male"].iloc[0])
    for threshold, label in [(prob - 1e-3, "Male"), (prob + 1e-3, "Female")]:
        row = run_folder(tmp_path, network, threshold=threshold).predict_paths([str(tmp_path / "photo.png")]).iloc[0]
        assert row["label"] == label and row["confidence"] == pytest.approx(prob if label == "Male" else 1 - prob)


def test_a_small_face_beside_a_large_one_gets_its_own_row(network, tmp_path):
    """A group photo the test composes: the astronaut portrait, and the same face shrunk to about
    50 px, below HOG's window, which the upsampled pass finds."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test dependency ([test] extra)")
    astronaut = Image.fromarray(skimage_data.astronaut())
    group = Image.new("RGB", (900, 520), (200, 200, 200))
    group.paste(astronaut, (380, 0))
    group.paste(astronaut.resize((270, 270)), (40, 220))
    group.save(tmp_path / "group.png")
    alignment = AlignSettings(
        image_size=SIZE, zoom=1.0, detector="hog+upsample", no_face="keep", detect_max_side=1024, min_score=0.2
    )
    run = run_folder(tmp_path / "run", network, alignment=alignment)
    rows = run.predict_paths([str(tmp_path / "group.png")])
    assert rows["face"].tolist() == [0, 1] and rows["detector"].tolist() == ["hog", "hog-upsampled"]
    assert (rows["error"] == "").all() and rows["prob_male"].notna().all()
    assert rows["x"].iloc[0] > 380 and rows["x"].iloc[1] < 300 and rows["w"].iloc[1] < 80
    # The largest face only, as eval sets and prep take it: HOG found one, so no upsampled pass.
    assert run.predict_paths([str(tmp_path / "group.png")], every_face=False)["detector"].tolist() == ["hog"]


def test_a_fifo_or_huge_file_among_the_photos_gets_an_error_row_and_is_never_read(network, tmp_path, monkeypatch):
    import os
    import threading

    from gendertune.data_prep import images

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.jpg")  # reading it would block forever
    (tmp_path / "huge.jpg").write_bytes(b"\xff" * 20_000)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10_000)  # the cap's logic, without writing 64 MiB
    run = run_folder(tmp_path / "run", network)
    rows = []
    worker = threading.Thread(
        target=lambda: rows.append(
            run.predict_paths([str(tmp_path / n) for n in ("fifo.jpg", "huge.jpg", "ok.png")], annotate=["", "", ""])
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "predict blocked on the FIFO"
    table = rows[0].set_index(rows[0]["image"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert table.loc["fifo.jpg", "error"] == "not a regular file (a FIFO, device or socket)"
    assert table.loc["huge.jpg", "error"].startswith("larger than")
    assert table.loc["ok.png", "error"] == "" and table.loc["ok.png", "label"] in ("Male", "Female")


def test_evaluate_is_refused_while_another_run_writes_the_run_folder(network, tmp_path, capsys):
    """evaluate rewrites metrics.json: a second writer at the same time would lose one's sets."""
    from gendertune.cli import main
    from gendertune.cluster.storage import exclusive

    run = tmp_path / "run"
    run_folder(run, network)
    sets = tmp_path / "faces"
    sets.mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(sets / "a.png")
    (sets / "labels.csv").write_text("image_id,Male\na.png,1\n")
    command = ["evaluate", "--run", str(run), "--eval-set", f"faces={sets}"]
    with exclusive(run):
        assert main(command) == 2
    assert "being written by another gendertune run" in capsys.readouterr().err
    assert (run / run_layout.METRICS).read_text() == "{}"  # untouched
    assert main(command) == 0 and "faces" in json.loads((run / run_layout.METRICS).read_text())["eval_sets"]
