"""Ray Train end to end: 2-worker CPU DDP learns, a failed worker resumes from its checkpoint,
predict reproduces the evaluation, and bad inputs fail clearly before any work starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GENDERTUNE, PROJECT_WORKER_LINE, prep_sample
from PIL import Image

from gendertune.cli import main
from gendertune.data_prep import layout
from gendertune.data_prep.errors import PrepInputError
from gendertune.tuning.evaluate import predict as predict_module
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.predict import ANNOTATION_COLOUR, predict
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.run import RunAlreadyComplete, RunFailed, run_training

EPOCHS = 4


@pytest.fixture(scope="module")
def prepared(ray_session, synthetic_sample_large, tmp_path_factory):
    return prep_sample(
        synthetic_sample_large,
        tmp_path_factory.mktemp("train-prep") / "prep",
        image_size=64,
        split="identity",
        ratios=[0.7, 0.15, 0.15],
    )


def train_config(prepared, out, **overrides):
    # Flips only: stronger augmentation needs more epochs than a test can afford to show learning.
    values = {
        "data": str(prepared),
        "out": str(out),
        "model": "resnet18",
        "epochs": EPOCHS,
        "batch_size": 16,
        "lr": 1e-3,
        "workers": 2,
        "rotation": 0.0,
        "color_jitter": 0.0,
        "random_erasing": 0.0,
        "random_resized_crop": 0.0,
        "zoom": 0.0,
        "translate": 0.0,
        "random_border": 0.0,
        **overrides,
    }
    return TrainConfig.from_dict(values)


def _kill_a_worker_after_checkpoints(run_folder, count: int, stop: threading.Event) -> None:
    """SIGKILL one Ray Train worker process once the run has written `count` checkpoints, as a
    crashed node or an out-of-memory kill would: nothing in the project knows it is coming."""
    ray_run = run_folder / run_layout.RAY_RUN_NAME
    while not stop.wait(0.1):
        # Ray Train lists a checkpoint in its manager's snapshot once it has registered it.
        snapshot = ray_run / "checkpoint_manager_snapshot.json"
        listed = snapshot.read_text() if snapshot.is_file() else ""
        if sum(path.is_dir() and path.name in listed for path in ray_run.glob("checkpoint_*")) >= count:
            os.kill(next(_train_worker_pids()), signal.SIGKILL)
            return


def _train_worker_pids():
    """Ray names each worker process after its actor (ray::RayTrainWorker...) on its command line.
    Only this test's own (descendants of this process, through the session's raylet): on a
    machine shared with other Ray runs, another's worker must never be the one killed."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"RayTrainWorker" in cmdline.read_bytes() and _descends_from_us(int(cmdline.parent.name)):
                yield int(cmdline.parent.name)
        except OSError:  # the process has ended
            continue


def _descends_from_us(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


@pytest.fixture(scope="module")
def ddp_run(prepared, eval_set_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "resnet18"
    # A worker is killed after epoch 2's checkpoint and max_failures=0 lets the whole run fail.
    # Running the same command again (same --out) must resume from the latest checkpoint, as after a
    # crash. (Recovery inside one run, max_failures >= 1, is tested by killing a node in test_cluster.)
    # Flip test-time augmentation and the balanced threshold on, so that predict is checked against them too.
    config = train_config(
        prepared, out, max_failures=0, eval_sets=[f"faces={eval_set_folder}"], tta="flip", threshold="balanced"
    )
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_checkpoints, args=(out, 2, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(RunFailed, match="re-run the same command to resume"):
            run_training(config)
    finally:
        stop.set()
        killer.join()
    assert not run_layout.is_complete(out)
    # The re-run is the user's command in its own process with its own Ray, so its console is
    # all a user sees, from the start-up to the last line.
    config_file = out.parent / "train.json"
    config_file.write_text(config.to_json())
    rerun = subprocess.run(
        [*GENDERTUNE, "train", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    (out.parent / "console.log").write_text(rerun.stdout)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    return out, run_layout.read_metrics(out)


def _resumed_from(out) -> int:
    """The epoch whose checkpoint the re-run started from."""
    return int(pd.read_csv(out / run_layout.HISTORY)["attempt_start_epoch"].iloc[-1])


def test_each_epoch_line_reaches_the_console_once(ddp_run):
    console = (ddp_run[0].parent / "console.log").read_text()
    for epoch in range(_resumed_from(ddp_run[0]) + 1, EPOCHS + 1):  # the resumed run's epochs
        assert console.count(f"resnet18 epoch {epoch}/{EPOCHS} ") == 1, console
    foreign = [line for line in console.splitlines() if line.strip() and not PROJECT_LINE.match(line)]
    assert foreign == [], "lines that are neither the project's nor a warning to act on:\n" + "\n".join(foreign)


# The project's own console lines in a `train` run: the workers' epoch and resume lines (Ray
# prefixes them with the process), and the driver's summary lines.
PROJECT_LINE = re.compile(
    PROJECT_WORKER_LINE.pattern + r"|^best epoch \d+ \(val acc "
    r"|^resnet18: (test|faces) accuracy "
)


def test_two_worker_ddp_run_learns(ddp_run):
    out, metrics = ddp_run
    assert metrics["evaluated_on"] == "test" and metrics["workers"] == 2
    assert metrics["accuracy"] > metrics["majority_rate"] + 0.1, metrics
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high
    for key in (
        "per_class",
        "macro_f1",
        "roc_auc",
        "ece",
        "confusion_matrix",
        "params",
        "wall_seconds",
        "train_images_per_s",
        "inference_images_per_s",
    ):
        assert key in metrics
    for name in (
        run_layout.CONFIG,
        run_layout.MODEL,
        run_layout.HISTORY,
        run_layout.PREDICTIONS,
        "accuracy_per_epoch.png",
        "loss_per_epoch.png",
        "confusion_matrix.png",
    ):
        assert (out / name).stat().st_size > 0, name


def test_run_is_scored_on_its_eval_set_and_evaluate_adds_another(ddp_run, eval_set_folder, capsys):
    out, metrics = ddp_run
    scores = metrics["eval_sets"]["faces"]
    assert scores["n"] == 60 and scores["no_prediction"] == 1 and 0 <= scores["accuracy"] <= 1
    assert {"macro_f1", "roc_auc", "ece", "ece_calibrated", "per_class", "accuracy_ci95"} <= set(scores)
    assert metrics["slices"]["faces"]["worst_slice"].split("=")[0] in {"age", "group"}
    assert main(["evaluate", "--run", str(out), "--eval-set", f"again={eval_set_folder}"]) == 0
    printed = capsys.readouterr().out
    assert f"again: 60 images, accuracy {scores['accuracy']:.4f}" in printed and "worst slice" in printed
    assert set(run_layout.read_metrics(out)["eval_sets"]) == {"faces", "again"}
    assert main(["evaluate", "--run", str(out), "--eval-set", f"bad={eval_set_folder / 'nowhere'}"]) == 2


def test_rerun_of_a_failed_run_resumes_from_the_latest_checkpoint(ddp_run):
    out, metrics = ddp_run
    history = pd.read_csv(out / run_layout.HISTORY)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    # The first epochs ran in the failed run; the re-run began at its latest checkpoint (epoch 2's,
    # unless epoch 3's report landed before the kill), not at 0.
    resumed = _resumed_from(out)
    assert resumed in (2, 3)
    assert history["attempt_start_epoch"].tolist() == [0] * resumed + [resumed] * (EPOCHS - resumed)
    assert metrics["epochs_run"] == EPOCHS


def test_history_dates_each_attempt_start_up(ddp_run):
    out, _ = ddp_run
    history = pd.read_csv(out / run_layout.HISTORY)
    assert (history["run_started_at"] <= history["loop_started_at"]).all()
    assert (history["loop_started_at"] <= history["epoch_started_at"]).all()
    assert (history["epoch_started_at"] < history["first_step_at"]).all() and (history["train_seconds"] > 0).all()
    failed, rerun = history[history["attempt_start_epoch"] == 0], history[history["attempt_start_epoch"] == 2]
    assert failed["run_started_at"].nunique() == failed["loop_started_at"].nunique() == 1
    assert rerun["run_started_at"].min() > failed["first_step_at"].max()  # the re-run's own start


def test_best_epoch_is_chosen_on_validation_not_test(ddp_run):
    out, metrics = ddp_run
    history = pd.read_csv(out / run_layout.HISTORY)
    assert metrics["best_val_acc"] == pytest.approx(history["val_acc"].max())
    assert history.loc[metrics["best_epoch"] - 1, "val_acc"] == pytest.approx(history["val_acc"].max())


def test_predict_matches_the_evaluation(ddp_run, prepared, synthetic_sample_large):
    """The same photo through prep + evaluation and through predict: the same probability, for
    aligned faces and for the centre-square fallback alike."""
    out, _ = ddp_run
    evaluated = pd.read_csv(out / run_layout.PREDICTIONS, dtype={"image_id": str}).head(40)
    faces = pd.read_csv(prepared / layout.FACES, dtype={"image_id": str}).set_index("image_id")
    assert set(faces.loc[evaluated["image_id"], "alignment"]) == {"aligned", "centre_crop"}
    images = [str(synthetic_sample_large.path / "img_align_celeba" / i) for i in evaluated["image_id"]]
    predicted = predict(str(out), images, every_face=False)
    assert predicted["image"].tolist() == images
    assert np.allclose(predicted["prob_male"].to_numpy(), evaluated["prob_positive"].to_numpy(), atol=1e-5)
    # Both flip-averaged, both deciding at the threshold chosen on validation.
    saved, metrics = torch.load(out / run_layout.MODEL, weights_only=True), run_layout.read_metrics(out)
    assert saved["tta"] == metrics["tta"] == "flip" and saved["threshold"] == metrics["threshold"]
    assert ((predicted["label"] == "Male") == (evaluated["prob_positive"] >= metrics["threshold"])).all()


def test_ray_data_batch_inference_gives_the_in_process_rows(ddp_run, synthetic_sample_large, monkeypatch, capfd):
    out, _ = ddp_run
    folder = synthetic_sample_large.path / "img_align_celeba"
    paths = [str(p) for p in sorted(folder.iterdir())[:12]]
    inputs = [*paths, paths[0], str(folder / "missing.jpg")]  # a path twice, and one that is not there
    in_process = predict(str(out), inputs)
    monkeypatch.setattr(predict_module, "RAY_THRESHOLD", 4)  # the actor-pool path, on a few images
    on_ray = predict(str(out), inputs)
    assert on_ray["image"].tolist() == in_process["image"].tolist() == [*paths, inputs[-1]]
    assert np.allclose(on_ray["prob_male"], in_process["prob_male"], atol=1e-5, equal_nan=True)
    assert on_ray["error"].iloc[-1].startswith("unreadable file") and (on_ray["error"].iloc[:-1] == "").sum() >= 11
    # Ray's core_worker error about restarting the pool's actors (ray#53727) stays off the console.
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def test_predict_boxes_every_face_of_a_group_photo(ddp_run, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test dependency ([test] extra)")
    astronaut = Image.fromarray(skimage_data.astronaut())
    group = Image.new("RGB", (1000, 560), (200, 200, 200))
    group.paste(astronaut.resize((360, 360)), (0, 100))
    group.paste(astronaut, (480, 20))
    group.save(tmp_path / "group.jpg", quality=95)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        tmp_path / "noise.jpg"
    )
    csv = tmp_path / "faces.csv"
    photos = [str(tmp_path / "group.jpg"), str(tmp_path / "noise.jpg"), str(tmp_path / "missing.jpg")]
    assert (
        main(
            [
                "predict",
                "--run",
                str(out := ddp_run[0]),
                *photos,
                photos[0],
                "--out",
                str(csv),
                "--annotate",
                str(tmp_path / "boxed"),
            ]
        )
        == 0
    )
    table = pd.read_csv(csv).fillna({"error": "", "label": ""})
    assert list(table.columns) == [
        "image",
        "face",
        "x",
        "y",
        "w",
        "h",
        "detector",
        "detector_score",
        "label",
        "confidence",
        "prob_male",
        "error",
    ]
    group_rows = table[table["image"] == photos[0]]  # given twice, predicted once
    assert group_rows["face"].tolist() == [0, 1] and (group_rows["error"] == "").all()
    assert group_rows["w"].iloc[0] > group_rows["w"].iloc[1] and (group_rows["detector"] == "hog").all()
    # The model was trained with --no-face keep: a photo without a face falls back to its centre.
    noise = table[table["image"] == photos[1]]
    assert len(noise) == 1 and noise["error"].iloc[0] == "" and np.isnan(noise["detector_score"].iloc[0])
    assert noise["detector"].iloc[0] == "none"
    assert table.loc[table["image"] == photos[2], "error"].iloc[0].startswith("unreadable file")
    boxed = np.asarray(Image.open(tmp_path / "boxed" / "group.jpg"))
    assert boxed.shape == (560, 1000, 3)
    for face in group_rows.itertuples():  # the box's top edge is drawn in the annotation colour (JPEG-blurred)
        edge = boxed[round(face.y), round(face.x + face.w / 3) : round(face.x + 2 * face.w / 3)].astype(int)
        assert (np.abs(edge - ANNOTATION_COLOUR).max(axis=1) < 70).all()
        inside = boxed[round(face.y + face.h / 2), round(face.x + face.w / 3) : round(face.x + 2 * face.w / 3)].astype(
            int
        )
        assert (np.abs(inside - ANNOTATION_COLOUR).max(axis=1) >= 70).mean() > 0.9  # the face itself is not painted
    assert (tmp_path / "boxed" / "noise.jpg").is_file() and not (tmp_path / "boxed" / "missing.jpg").exists()
    assert "1 of 3 image(s) gave no prediction" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot reproduce that alignment"):
        saved = torch.load(out / run_layout.MODEL, weights_only=True)
        saved["alignment"]["template"] = "another-template"
        save_as_finished_run(saved, out, tmp_path)
        predict(str(tmp_path), photos[:1])


def save_as_finished_run(saved: dict, run: Path, dest: Path) -> None:
    """An edited model file in a folder that otherwise looks like `run`, finished (metrics.json last)."""
    torch.save(saved, dest / run_layout.MODEL)
    (dest / run_layout.METRICS).write_bytes((run / run_layout.METRICS).read_bytes())


def test_a_model_file_of_another_version_is_a_one_line_error(ddp_run, tmp_path, capsys):
    saved = torch.load(ddp_run[0] / run_layout.MODEL, weights_only=True)
    del saved["temperature"], saved["format_version"]
    save_as_finished_run(saved, ddp_run[0], tmp_path)
    assert main(["predict", "--run", str(tmp_path), str(tmp_path / "any.jpg")]) == 2
    error = capsys.readouterr().err
    assert (
        "another gendertune version (model format 1, this version reads 2; missing format_version, temperature)"
        in error
    )
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_rerun_of_a_finished_run_is_refused(ddp_run, prepared):
    out, _ = ddp_run
    with pytest.raises(RunAlreadyComplete):
        run_training(train_config(prepared, out))


def test_predict_cli_many_images_via_ray_data_and_bad_files(ddp_run, synthetic_sample_large, tmp_path, capsys):
    out, _ = ddp_run
    folder = synthetic_sample_large.path / "img_align_celeba"
    csv = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(out), str(folder), "--out", str(csv)]) == 0
    table = pd.read_csv(csv, keep_default_na=False)
    assert table["image"].nunique() == synthetic_sample_large.n_images  # above the Ray Data threshold
    bad = table[table["error"] != ""]
    assert {p.rsplit("/", 1)[-1] for p in bad["image"]} == set(synthetic_sample_large.corrupt_ids)
    assert set(table.loc[table["error"] == "", "label"]) <= {"Female", "Male"}
    assert "gave no prediction" in capsys.readouterr().err


def test_bad_inputs_fail_before_training(prepared, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        run_training(train_config(prepared, tmp_path / "a", model="resnet5"))
    with pytest.raises(PrepInputError, match="not a prepared dataset"):
        run_training(train_config(tmp_path, tmp_path / "b"))
    with pytest.raises(ValueError, match="too small for vgg19"):
        run_training(train_config(prepared, tmp_path / "c", model="vgg19", image_size=16))
    corrupt = tmp_path / "corrupt-run"
    corrupt.mkdir()
    (corrupt / run_layout.MODEL).write_bytes(b"not a checkpoint")
    (corrupt / run_layout.METRICS).write_text("{}")  # finished, as far as the marker says
    assert main(["predict", "--run", str(corrupt), str(tmp_path / "any.jpg")]) == 2
    assert "not a readable gendertune model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert json.loads(TrainConfig.from_dict({"data": "d", "out": "o"}).to_json())["train"]["model"] == "resnet50"


def test_a_run_whose_loss_turns_nan_stops_with_a_clear_error_and_predict_refuses_it(prepared, tmp_path, capsys):
    import torchvision

    weights = tmp_path / "nan.pt"
    state = torchvision.models.resnet18(num_classes=2).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")  # what a NaN weight decay left after one step
    torch.save(state, weights)
    out = tmp_path / "diverged"
    code = main(
        [
            "train",
            "--data",
            str(prepared),
            "--out",
            str(out),
            "--model",
            "resnet18",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--max-failures",
            "0",
            "--weights",
            str(weights),
        ]
    )
    error = capsys.readouterr().err
    assert code == 1 and "training stopped: the training loss became nan" in error, error
    assert not (out / run_layout.MODEL).exists() and not run_layout.is_complete(out)


def test_a_face_scored_nan_gets_an_error_not_a_blank_label():
    run = object.__new__(predict_module.RunModel)  # labelled() reads only the class names and threshold
    run.class_names, run.threshold = ["Female", "Male"], 0.5
    table = pd.DataFrame({"image": ["a.jpg", "b.jpg", "c.jpg"], "error": ["", "", predict_module.NO_FACE]})
    rows = run.labelled(table, np.array([0.9, np.nan, np.nan]))
    assert list(rows["label"]) == ["Male", "", ""]
    assert list(rows["error"]) == ["", "the model gave no finite score", predict_module.NO_FACE]
    assert ((rows["label"] != "") | (rows["error"] != "")).all()
