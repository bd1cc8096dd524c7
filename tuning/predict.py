"""Predict the label of face images with a trained run, using exactly its preprocessing.

Each image goes through the prep stage's own decode -> centre square crop -> resize to the
prepared size (data_prep.images.decode_face), then the model's resize and normalisation
(models.transforms.EvalPreprocess) — the same path its test images took. (The seed's inference
helper skipped normalisation.) A few files run in-process; many run as Ray Data batch inference
on an actor pool, each actor loading the model once. Unreadable images get an error, not a crash.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from cluster import object_store
from cluster.runtime import compute_parallelism, ensure_ray
from cluster.shared_storage import require_shared
from data_prep.images import ImageRejected, decode_face
from data_prep.pipeline import IMAGE_EXTENSIONS
from models.registry import build_model, split_outputs
from models.transforms import EvalPreprocess
from tuning import run_layout

RAY_THRESHOLD = 256  # below this many files, starting an actor pool costs more than it saves


class RunModel:
    """A trained run's best weights plus the preprocessing it was trained with."""

    def __init__(self, run_dir: str | Path):
        path = object_store.join(run_dir, run_layout.MODEL)  # a folder or an object-store URI
        if not object_store.is_file(path):
            raise FileNotFoundError(f"{run_dir} has no {run_layout.MODEL}; pass a finished `gendertune train` run folder")
        try:
            saved = torch.load(io.BytesIO(object_store.read_bytes(path)), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise ValueError(f"{path} is not a readable gendertune model ({type(err).__name__}: {err})") from None
        self.class_names = list(saved["class_names"])
        self.prep_image_size = int(saved["prep_image_size"])
        self.model = build_model(saved["model_name"], image_size=int(saved["image_size"]))
        self.model.load_state_dict(saved["model"])
        self.model.eval().to(memory_format=torch.channels_last)
        self.preprocess = EvalPreprocess(image_size=int(saved["image_size"]), mean=tuple(saved["mean"]), std=tuple(saved["std"]))

    @torch.no_grad()
    def prob_positive(self, faces: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 faces at the prep size -> P(label 1) per face (fp32, deterministic)."""
        logits, _ = split_outputs(self.model(self.preprocess(torch.from_numpy(faces))))
        return logits.float().softmax(1)[:, 1].numpy()

    def predict_paths(self, paths: list[str]) -> pd.DataFrame:
        faces, ok, errors = [], [], []
        for path in paths:
            try:
                faces.append(decode_face(Path(path).read_bytes(), image_size=self.prep_image_size))
                ok.append(True)
                errors.append("")
            except (OSError, ImageRejected) as err:
                ok.append(False)
                errors.append(str(err) if isinstance(err, ImageRejected) else f"unreadable file: {err.strerror or err}")
        probs = np.full(len(paths), np.nan)
        if faces:
            probs[np.array(ok)] = self.prob_positive(np.stack(faces))
        return self.rows(paths, probs, errors)

    def rows(self, paths, probs: np.ndarray, errors) -> pd.DataFrame:
        positive = probs >= 0.5
        return pd.DataFrame({
            "image": list(paths),
            "label": [("" if np.isnan(p) else self.class_names[int(pos)]) for p, pos in zip(probs, positive)],
            "confidence": np.where(positive, probs, 1 - probs),
            f"prob_{self.class_names[1].lower()}": probs,
            "error": list(errors),
        })


class _PredictActor:
    """Ray Data actor: loads the run once, then predicts batches of paths."""

    def __init__(self, run_dir: str, threads: int):
        torch.set_num_threads(threads)
        self.run = RunModel(run_dir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.run.predict_paths(batch["image"].tolist())


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders become their image files (sorted, recursive)."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            paths.append(str(path))  # a missing file is reported per file, like a corrupt one
    if not paths:
        raise FileNotFoundError(f"no images found in {', '.join(inputs)}")
    return paths


def predict(run_dir: str, inputs: list[str], *, batch_size: int = 64) -> pd.DataFrame:
    run = RunModel(run_dir)  # a bad run folder fails before anything else happens
    paths = expand_inputs(inputs)
    if len(paths) < RAY_THRESHOLD:
        return pd.concat([run.predict_paths(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)], ignore_index=True)
    ensure_ray()
    require_shared(reads=[run_dir, *inputs])
    actors = max(1, min(compute_parallelism(), len(paths) // batch_size))
    dataset = ray.data.from_pandas(pd.DataFrame({"image": paths})).repartition(max(actors * 2, len(paths) // (batch_size * 4)))
    predictions = dataset.map_batches(
        _PredictActor, fn_constructor_args=(object_store.absolute(run_dir), max(1, compute_parallelism() // actors)),
        batch_format="pandas", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )
    return predictions.to_pandas().set_index("image").loc[paths].reset_index()
