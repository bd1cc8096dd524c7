"""The Python API (gendertune/__init__.py, gendertune/api.py) and export (gendertune.tuning.evaluate.export):
`import gendertune` is light, the configs validate when built, the README's example runs as written on a
generated sample, a run predicts from paths, PIL images and arrays alike, and its ONNX and TorchScript
files give the run's own calibrated probabilities with its preprocessing settings in their metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gendertune
from gendertune.base.config import ConfigError
from gendertune.cli import main
from gendertune.cluster.environment import ENVIRONMENT
from gendertune.models.transforms import AUGMENTATIONS

ROOT = Path(__file__).resolve().parents[1]


def test_import_gendertune_loads_no_torch_and_no_ray_until_used():
    code = (
        "import sys, gendertune; heavy = lambda: sorted({'torch', 'ray'} & set(sys.modules)); "
        "before = heavy(); gendertune.TrainConfig; print(before, heavy())"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[] ['torch']"  # a config's model names come from the registry; still no Ray


def test_the_command_lines_help_and_version_load_no_torch_ray_or_pyarrow():
    code = (
        "import sys; from gendertune import cli; cli.build_parser(flags_for=[]).format_help(); "
        "print(sorted({'torch', 'ray', 'pyarrow'} & set(sys.modules)))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"


def test_every_public_name_resolves():
    for name in gendertune.__all__:
        assert getattr(gendertune, name).__name__ == name
    assert set(gendertune.__all__) <= set(dir(gendertune))
    with pytest.raises(AttributeError, match="no attribute 'tuning_run'"):
        gendertune.tuning_run  # noqa: B018


def test_configs_validate_when_constructed():
    with pytest.raises(ConfigError, match=r"train.epochs: must be in \[1, inf\), got -3"):
        gendertune.TrainConfig(data="prep", out="run", epochs=-3)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'abc'"):
        gendertune.TrainConfig(data="prep", out="run", lr="abc")
    with pytest.raises(ConfigError, match="prep.data"):
        gendertune.PrepConfig()
    with pytest.raises(ConfigError, match="search.trials"):
        gendertune.SearchConfig(trials=0)
    with pytest.raises(ConfigError, match="compare.models: name at least one"):
        gendertune.CompareConfig(data="prep", out="cmp", models=[])
    config = gendertune.TrainConfig(data="prep", out="run", lr="0.01", eval_sets=["a=x"])
    assert (config.lr, config.eval_sets) == (0.01, ("a=x",))  # typed as a config file's values are
    with pytest.raises(ConfigError, match="train.hflip is a probability"):
        dataclasses.replace(config, hflip=2.0)


def test_from_dict_and_resolve_check_the_merged_settings(tmp_path):
    # The file lacks data and out, which the flags give: only the merged settings must be complete.
    (tmp_path / "c.toml").write_text('[train]\nepochs = 2\nmodel = "resnet18"\n')
    config = gendertune.TrainConfig.resolve(config_file=tmp_path / "c.toml", overrides={"data": "d", "out": "o"})
    assert (config.epochs, config.model, config.data) == (2, "resnet18", "d")
    with pytest.raises(ConfigError, match="train.data"):
        gendertune.TrainConfig.resolve(config_file=tmp_path / "c.toml")


def test_the_augmentations_are_the_train_configs_settings():
    fields = {field.name: field for field in dataclasses.fields(gendertune.TrainConfig)}
    assert all(name in fields and fields[name].metadata["help"] for name in AUGMENTATIONS)
    assert set(gendertune.TrainConfig(data="d", out="o").augment_strengths()) == set(AUGMENTATIONS)


def test_a_stage_takes_a_config_object_with_settings_over_it_and_makes_paths_absolute(monkeypatch, tmp_path):
    from gendertune import api

    monkeypatch.chdir(tmp_path)
    given = gendertune.TrainConfig(data="prep", out="s3://bucket/run", epochs=3, eval_sets=("faces=photos",))
    config = api._config(gendertune.TrainConfig, given, {"epochs": 2}, source="test")
    assert (config.epochs, config.lr) == (2, given.lr)
    # Ray's workers need not share the notebook's current folder; an object-store URI stays as it is.
    assert (config.data, config.out) == (str(tmp_path / "prep"), "s3://bucket/run")
    assert config.eval_sets == (f"faces={tmp_path / 'photos'}",)
    with pytest.raises(ConfigError, match="train.epochs"):
        api._config(gendertune.TrainConfig, given, {"epochs": 0}, source="test")


def test_compare_refuses_an_unknown_setting_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.s. epoch$"):
        gendertune.compare(data=str(tmp_path), out=str(tmp_path / "cmp"), epoch=1)
    assert not (tmp_path / "cmp").exists()


def test_onnx_export_without_onnx_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "gendertune export: error: --format onnx needs onnx: pip install 'gendertune[export]'"


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def example(ray_session, tmp_path_factory):
    """The README's example, run as written in a folder holding a generated sample as `celeba/`."""
    from gendertune.data_prep.synthetic import make_sample

    folder = tmp_path_factory.mktemp("readme-example")
    sample = make_sample(folder / "celeba", n=100, seed=3)
    before = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(readme_example(), "README.md", "exec"), {})
    finally:
        os.chdir(before)
    return folder, sample


def test_the_readme_example_runs_and_every_output_records_its_environment(example):
    folder, _ = example
    assert (folder / "runs/resnet18/metrics.json").is_file() and (folder / "resnet18.onnx").is_file()
    assert len(gendertune.read_leaderboard(folder / "comparison")) >= 1
    for output in ("prepared", "runs/resnet18", "comparison"):
        environment = json.loads((folder / output / ENVIRONMENT).read_text())
        assert environment["packages"]["gendertune"] and environment["packages"]["torch"], output
        assert environment["ray_cluster_resources"]["CPU"] >= 1, output  # each stage ran on Ray


def test_a_run_predicts_from_paths_pil_images_and_arrays_alike(example):
    folder, sample = example
    predictor = gendertune.load_run(folder / "runs/resnet18")
    images = sorted((folder / "celeba/img_align_celeba").iterdir())
    good = [path for path in images if path.name not in sample.corrupt_ids][:3]
    by_path = predictor.predict([str(path) for path in good])
    photos = [Image.open(path) for path in good]
    by_pil = predictor.predict(photos)
    by_array = predictor.predict(np.stack([np.asarray(photo) for photo in photos]))
    column = f"prob_{predictor.class_names[1].lower()}"
    assert len(by_path) == len(by_pil) == len(by_array) >= 3 and (by_path["error"] == "").all()
    np.testing.assert_allclose(by_pil[column], by_path[column], atol=1e-6)
    np.testing.assert_allclose(by_array[column], by_path[column], atol=1e-6)
    assert list(by_pil["image"].unique()) == ["image[0]", "image[1]", "image[2]"]
    corrupt = predictor.predict(folder / "celeba/img_align_celeba" / sample.corrupt_ids[0])
    assert corrupt["error"].iloc[0] != "" and np.isnan(corrupt[column].iloc[0])


def _assert_same_as_the_run(probabilities: np.ndarray, run, chips: np.ndarray) -> None:
    """The exported probabilities are the run's, within 1e-4; and so are the margins behind them: a 1-epoch
    run's fitted temperature can be large, squeezing every probability near 0.5, where 1e-4 alone would
    let a different network pass."""
    assert probabilities.shape == (len(chips), 2)
    np.testing.assert_allclose(probabilities[:, 1], run.prob_positive(chips), atol=1e-4, rtol=0)
    p = probabilities[:, 1].astype(np.float64)
    np.testing.assert_allclose(run.temperature * np.log(p / (1 - p)), run.margins(chips), atol=1e-3, rtol=1e-3)


def _chips(run, folder: Path, sample) -> np.ndarray:
    """Face chips of the sample's photos, made as predict makes them for this run."""
    paths = sorted(
        path for path in (folder / "celeba/img_align_celeba").iterdir() if path.name not in sample.corrupt_ids
    )
    chips = [face.chip for path in paths[:24] for face in run.chips(path.read_bytes(), every_face=False)]
    return np.stack(chips)


def test_the_onnx_file_gives_the_runs_calibrated_probabilities_with_its_settings(example):
    import onnx
    import onnxruntime

    from gendertune.tuning.evaluate.predict import RunModel

    folder, sample = example
    run = RunModel(folder / "runs/resnet18")
    chips = _chips(run, folder, sample)
    session = onnxruntime.InferenceSession(str(folder / "resnet18.onnx"))
    _assert_same_as_the_run(session.run(["probabilities"], {"faces": chips})[0], run, chips)
    meta = {prop.key: prop.value for prop in onnx.load(str(folder / "resnet18.onnx")).metadata_props}
    assert float(meta["temperature"]) == run.temperature and json.loads(meta["class_names"]) == run.class_names
    assert json.loads(meta["alignment"]) == (run.align.to_dict() if run.align else None)
    assert (int(meta["prep_image_size"]), json.loads(meta["mean"])) == (run.prep_image_size, list(run.preprocess.mean))


def test_the_torchscript_file_from_the_command_line_matches_too(example, tmp_path, capsys):
    import torch

    from gendertune.tuning.evaluate.export import METADATA_FILE
    from gendertune.tuning.evaluate.predict import RunModel

    folder, sample = example
    out = tmp_path / "model.pt"
    assert main(["export", str(folder / "runs/resnet18"), "--format", "torchscript", "--out", str(out)]) == 0
    run = RunModel(folder / "runs/resnet18")
    chips = _chips(run, folder, sample)
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        probabilities = module(torch.from_numpy(chips)).numpy()
    _assert_same_as_the_run(probabilities, run, chips)
    assert float(json.loads(extra[METADATA_FILE])["temperature"]) == run.temperature
    assert not list(tmp_path.glob(".*partial"))
