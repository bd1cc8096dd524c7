"""Export a trained run to one ONNX or TorchScript file that needs neither gendertune, Ray nor MLflow.

The exported graph takes what predict hands the network: face chips, uint8 N x S x S x 3 RGB at the
run's prep size S, framed as its training images were (the alignment settings in the metadata; see
gendertune.data_prep.faces). Inside it are the run's resize and normalisation
(gendertune.models.transforms.EvalPreprocess) and its calibration temperature, so it returns
calibrated probabilities, N x 2 in the order of `class_names`: the same numbers as RunModel.prob_positive.
The settings a user needs to make those chips travel in the file: ONNX metadata_props (string
values, JSON where not plain text) or a TorchScript extra file, `metadata.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from gendertune.base.errors import UserInputError
from gendertune.cluster.environment import package_version
from gendertune.models.registry import split_outputs
from gendertune.tuning.evaluate.predict import RunModel

FORMATS = ("onnx", "torchscript")
INPUT, OUTPUT = "faces", "probabilities"
METADATA_FILE = "metadata.json"  # the TorchScript extra file holding the metadata
ONNX_PACKAGES = ("onnx", "onnxscript")  # torch.onnx's exporter needs both


class ExportUnavailable(UserInputError):
    """The format's optional packages are not installed."""


class CalibratedClassifier(nn.Module):
    """uint8 face chips -> calibrated class probabilities: the run's preprocessing, network and temperature."""

    def __init__(self, run: RunModel):
        super().__init__()
        self.network = run.model
        self.preprocess = run.preprocess
        self.temperature = run.temperature

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        logits, _ = split_outputs(self.network(self.preprocess(faces)))
        # softmax(logits / T)[1] = sigmoid(margin / T): the calibration predict applies.
        return torch.softmax(logits.float() / self.temperature, dim=1)


def metadata(run: RunModel) -> dict[str, str]:
    """What a user of the file needs to make its input and read its output."""
    return {
        "producer": f"gendertune {package_version('gendertune')}",
        "model_name": run.model_name,
        "input": f"{INPUT}: uint8 N x {run.prep_image_size} x {run.prep_image_size} x 3 RGB face chips, "
        "framed as `alignment` says (null: the photo's centre square, resized)",
        "output": f"{OUTPUT}: float32 N x 2 calibrated probabilities, in the order of class_names",
        "class_names": json.dumps(run.class_names),
        "prep_image_size": str(run.prep_image_size),
        "image_size": str(run.preprocess.image_size),
        "mean": json.dumps(list(run.preprocess.mean)),
        "std": json.dumps(list(run.preprocess.std)),
        "temperature": repr(run.temperature),
        "alignment": json.dumps(run.align.to_dict() if run.align else None),
    }


def _require(packages: tuple[str, ...], fmt: str) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportUnavailable(f"--format {fmt} needs {', '.join(missing)}: pip install 'gendertune[export]'")


def _write_onnx(module: nn.Module, example: torch.Tensor, info: dict[str, str], path: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch")
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    graph = onnx.load(str(path))
    for key, value in info.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _write_torchscript(module: nn.Module, example: torch.Tensor, info: dict[str, str], path: Path) -> None:
    traced = torch.jit.trace(module, (example,))
    torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(info, indent=2)})


def export_run(run_dir: str | Path, *, fmt: str, out: str | Path) -> Path:
    """Write the run in `run_dir` to the file `out` as `fmt` (onnx or torchscript); returns its path."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _require(ONNX_PACKAGES, fmt)
    run = RunModel(run_dir)
    module = CalibratedClassifier(run).eval()
    size = run.prep_image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # the file appears whole or not at all
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The checks on the input's shape are constants of the graph: every size but the batch is fixed.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, on every call
            writer(module, example, metadata(run), partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
