"""Predict the label of every face in photos with a trained run, using exactly its preprocessing.

A run trained on aligned faces (the default) detects every face in a photo and aligns each with
the settings stored in its model.pt (gendertune.data_prep.faces), the same function prep applied to its
training and test images; a run trained on centre-square crops (`prep --align none`) gets the prep
stage's own decode -> centre square -> resize (gendertune.data_prep.images.decode_face). Then comes the
model's resize and normalisation (gendertune.models.transforms.EvalPreprocess), and the probability is
calibrated with the temperature fitted on validation (gendertune.tuning.evaluate.calibration). (The original notebook's
inference helper skipped normalisation and had no face detector.) A few files run in-process;
many run as Ray Data batch inference on an actor pool, each actor loading the model and the face
models once. An unreadable or missing image, or one with no face, gets an error row, not a crash.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from PIL import Image, ImageDraw

from gendertune.base.errors import MissingInputError, UserInputError
from gendertune.cluster import storage
from gendertune.cluster.runtime import compute_parallelism, ensure_ray
from gendertune.cluster.shared_storage import require_shared
from gendertune.cluster.storage import OutputExistsError
from gendertune.data_prep.faces import NO_DETECTION, AlignSettings, FaceChip, FaceFinder, face_chips
from gendertune.data_prep.images import (
    IMAGE_EXTENSIONS,
    ImageRejected,
    center_square_box,
    decode_face,
    load_photo,
    read_image_file,
)
from gendertune.models.registry import build_model, split_outputs
from gendertune.models.transforms import EvalPreprocess
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.calibration import calibrated_probability
from gendertune.tuning.evaluate.decision import FIXED_THRESHOLD, with_tta

RAY_THRESHOLD = 256  # below this many files, starting an actor pool costs more than it saves
NO_FACE = "no face found"
ANNOTATION_COLOUR = (255, 200, 0)


class RunModel:
    """A trained run's best weights plus the preprocessing it was trained with."""

    def __init__(self, run_dir: str | Path):
        path = storage.join(run_dir, run_layout.MODEL)  # a folder or an object-store URI
        if not storage.is_file(path):
            raise MissingInputError(
                f"{run_dir} has no {run_layout.MODEL}; pass a finished `gendertune train` run folder"
            )
        # metrics.json is written last: without it model.pt may be half-written, or a diverged run's.
        if not storage.is_file(storage.join(run_dir, run_layout.METRICS)):
            raise MissingInputError(
                f"{run_dir} is not a finished training run (no {run_layout.METRICS}); "
                f"run or resume `gendertune train --out {run_dir}`"
            )
        try:
            saved = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise UserInputError(f"{path} is not a readable gendertune model ({type(err).__name__}: {err})") from None
        missing = [key for key in run_layout.MODEL_KEYS if key not in saved]
        if missing or saved["format_version"] != run_layout.MODEL_FORMAT_VERSION:
            raise UserInputError(
                f"{path} was written by another gendertune version (model format {saved.get('format_version', 1)}, "
                f"this version reads {run_layout.MODEL_FORMAT_VERSION}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + "): train it again with this version, or predict with the version that trained it"
            )
        self.class_names = list(saved["class_names"])
        self.prep_image_size = int(saved["prep_image_size"])
        self.align = AlignSettings.from_dict(saved["alignment"]) if saved["alignment"] else None
        self.finder = FaceFinder(self.align.detector, self.align.landmarks) if self.align else None
        self.model_name = saved["model_name"]
        network = build_model(self.model_name, image_size=int(saved["image_size"]))
        network.load_state_dict(saved["model"])
        # Test-time augmentation and the decision threshold (gendertune.tuning.evaluate.decision):
        # optional keys, absent from runs trained before they existed.
        self.tta = saved.get("tta", "none")
        self.threshold = float(saved.get("threshold", FIXED_THRESHOLD))
        self.model = with_tta(network.eval().to(memory_format=torch.channels_last), self.tta)
        self.preprocess = EvalPreprocess(
            image_size=int(saved["image_size"]), mean=tuple(saved["mean"]), std=tuple(saved["std"])
        )
        # Fitted on validation after training (gendertune.tuning.evaluate.calibration); 1 = the network's own probabilities.
        self.temperature = float(saved["temperature"])

    @property
    def prob_column(self) -> str:
        return f"prob_{self.class_names[1].lower()}"

    @torch.no_grad()
    def margins(self, faces: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 faces at the prep size -> logit_1 - logit_0 per face (fp32, deterministic)."""
        logits, _ = split_outputs(self.model(self.preprocess(torch.from_numpy(faces))))
        logits = logits.float()
        return (logits[:, 1] - logits[:, 0]).numpy()

    def prob_positive(self, faces: np.ndarray) -> np.ndarray:
        """P(label 1) per face, calibrated with the run's temperature."""
        return calibrated_probability(self.margins(faces), self.temperature)

    def chips(self, data: bytes, *, every_face: bool) -> list[FaceChip]:
        """The photo's face chips, framed as this run's training images were."""
        if self.align is None:
            chip = decode_face(data, image_size=self.prep_image_size)  # raises ImageRejected first
            return [FaceChip(chip, None, "centre_crop", square_box(*Image.open(io.BytesIO(data)).size))]
        return face_chips(load_photo(data), self.finder, self.align, every_face=every_face)[0]

    def predict_paths(
        self,
        paths: list[str],
        *,
        every_face: bool = True,
        annotate: list[str] | None = None,
        with_margin: bool = False,
        photos: list[bytes | None] | None = None,
    ) -> pd.DataFrame:
        """One row per face (one error row per image without any), in the order of `paths`;
        `annotate[i]`, when given and not empty, receives a copy of image i with its faces boxed;
        `with_margin` adds the uncalibrated logit margin (evaluation reports ECE before calibration);
        `photos[i]`, when not None, is image i's encoded bytes, in memory (the Python API's): `paths[i]` only names it."""
        rows, chips = [], []
        for index, path in enumerate(paths):
            try:
                photo = photos[index] if photos is not None else None
                found = self.chips(read_image_file(path) if photo is None else photo, every_face=every_face)
            except (OSError, ImageRejected) as err:
                rows.append(
                    _error_row(
                        path, str(err) if isinstance(err, ImageRejected) else f"unreadable file: {err.strerror or err}"
                    )
                )
                continue
            if not found:
                rows.append(_error_row(path, NO_FACE))
            for number, face in enumerate(found):
                rows.append(
                    {
                        "image": path,
                        "face": number,
                        **dict(zip("xywh", face.box)),
                        "detector": face.face.detector if face.face else NO_DETECTION,
                        "detector_score": face.face.score if face.face else np.nan,
                        "error": "",
                    }
                )
                chips.append(face.chip)
        table = pd.DataFrame(rows, columns=["image", "face", "x", "y", "w", "h", "detector", "detector_score", "error"])
        margins = np.full(len(table), np.nan)
        if chips:
            margins[(table["error"] == "").to_numpy()] = self.margins(np.stack(chips))
        table = self.labelled(table, calibrated_probability(margins, self.temperature))
        if with_margin:
            table["margin"] = margins
        # Annotation decodes each photo again rather than keeping a batch of full-size photos in memory.
        for path, out in zip(paths, annotate or []):
            rows_of_image = table[table["image"] == path]
            if out and rows_of_image["error"].isin(["", NO_FACE]).all():  # a readable photo
                faces = rows_of_image[rows_of_image["error"] == ""]
                write_annotated(load_photo(read_image_file(path)), faces, out)
        return table

    def labelled(self, table: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
        positive = probs >= self.threshold
        labels = [("" if np.isnan(p) else self.class_names[int(pos)]) for p, pos in zip(probs, positive)]
        error = table.pop("error")
        # Every row has a label or says why not: a face the model scores NaN is an error, not a blank.
        error = error.mask((error == "") & np.isnan(probs), "the model gave no finite score")
        return table.assign(
            label=labels, confidence=np.where(positive, probs, 1 - probs), **{self.prob_column: probs}, error=error
        )


def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre square as (x, y, w, h)."""
    left, top, right, bottom = center_square_box(width, height)
    return left, top, right - left, bottom - top


def _error_row(path: str, error: str) -> dict:
    return {
        "image": path,
        "face": -1,
        "x": np.nan,
        "y": np.nan,
        "w": np.nan,
        "h": np.nan,
        "detector": NO_DETECTION,
        "detector_score": np.nan,
        "error": error,
    }


def write_annotated(photo: Image.Image, faces: pd.DataFrame, out: str) -> None:
    """A copy of `photo` with every face boxed and labelled with its predicted class and confidence."""
    canvas = photo.copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(photo.size) / 300))
    for face in faces.itertuples():
        draw.rectangle((face.x, face.y, face.x + face.w, face.y + face.h), outline=ANNOTATION_COLOUR, width=line)
        text, size = f"{face.label} {face.confidence:.0%}", max(12, round(face.w / 5))
        # Above the box on a dark band, so it stays readable on any photo and hides no face.
        _, _, right, bottom = draw.textbbox((0, 0), text, font_size=size)
        band = (face.x, max(0, face.y - bottom - 2 * line))  # ends a line above the box's outline
        draw.rectangle((band[0], band[1], band[0] + right + 2 * line, band[1] + bottom + line), fill=(0, 0, 0))
        draw.text((band[0] + line, band[1]), text, fill=ANNOTATION_COLOUR, font_size=size)
    canvas.save(out, quality=92)


class _PredictActor:
    """Ray Data actor: loads the run (and its face models) once, then predicts batches of paths."""

    def __init__(self, run_dir: str, threads: int, every_face: bool, with_margin: bool):
        torch.set_num_threads(threads)
        self.run = RunModel(run_dir)
        self.every_face = every_face
        self.with_margin = with_margin

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        annotate = batch["annotated"].tolist()
        return self.run.predict_paths(
            batch["image"].tolist(),
            every_face=self.every_face,
            annotate=annotate if any(annotate) else None,
            with_margin=self.with_margin,
        )


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders become their image files (sorted, recursive); each path once."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            paths.append(str(path))  # a missing file is reported per file, like a corrupt one
    if not paths:
        raise MissingInputError(f"no images found in {', '.join(inputs)}")
    return list(dict.fromkeys(paths))


def annotated_names(paths: list[str], folder: str) -> list[str]:
    """A distinct output file in `folder` per input path: its name, numbered where names repeat."""
    names, seen = [], {}
    for path in paths:
        name = Path(path).name
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            name = f"{Path(name).stem}-{count}{Path(name).suffix}"
        names.append(str(Path(folder) / name))
    return names


def _writable_folder(path: Path, what: str) -> None:
    """Raise unless `path`'s nearest existing ancestor is a folder this process may write in."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserInputError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{what} {path}: {existing} is not writable")


def check_outputs(paths: list[str], annotate: list[str], csv_out: str | None) -> None:
    """Refuse, before any work, outputs that would replace a file: an annotated copy never
    overwrites anything (the input photo itself, when --annotate names the photos' folder), and
    the CSV is never an input, an image or a folder."""
    clash = next((name for name in annotate if Path(name).exists()), None)
    if clash:
        raise OutputExistsError(
            f"--annotate would overwrite {clash} (annotated copies keep the photos' names); "
            "choose an empty or new folder"
        )
    if annotate:
        _writable_folder(Path(annotate[0]).parent, "--annotate")
    if csv_out is None:
        return
    out = Path(csv_out).absolute()
    if out.is_dir():
        raise UserInputError(f"--out {csv_out} is a folder; name the CSV file to write, e.g. {out / 'predictions.csv'}")
    if out.suffix.lower() in IMAGE_EXTENSIONS or any(out == Path(p).absolute() for p in paths):
        raise OutputExistsError(f"--out {csv_out} is an image (or one of the inputs); name a .csv file to write")
    _writable_folder(out.parent, "--out")


def predict(
    run_dir: str,
    inputs: list[str],
    *,
    batch_size: int = 64,
    every_face: bool = True,
    annotate_dir: str | None = None,
    with_margin: bool = False,
    csv_out: str | None = None,
) -> pd.DataFrame:
    """Predict every face in `inputs`; `csv_out` (checked first, like the annotation folder)
    receives the table."""
    paths = expand_inputs(inputs)
    annotate = annotated_names(paths, str(Path(annotate_dir).absolute())) if annotate_dir else None
    check_outputs(paths, annotate or [], csv_out)
    run = RunModel(run_dir)  # a bad run folder fails before any image is read
    if annotate_dir:
        Path(annotate_dir).mkdir(parents=True, exist_ok=True)
    table = _predict(
        run,
        run_dir,
        inputs,
        paths,
        batch_size=batch_size,
        every_face=every_face,
        annotate=annotate,
        with_margin=with_margin,
        annotate_dir=annotate_dir,
    )
    if csv_out:
        storage.write_text_atomic(csv_out, table.to_csv(index=False))
    return table


def _predict(
    run: RunModel,
    run_dir: str,
    inputs: list[str],
    paths: list[str],
    *,
    batch_size: int,
    every_face: bool,
    annotate: list[str] | None,
    with_margin: bool,
    annotate_dir: str | None,
) -> pd.DataFrame:
    if len(paths) < RAY_THRESHOLD:
        return pd.concat(
            [
                run.predict_paths(
                    paths[i : i + batch_size],
                    every_face=every_face,
                    with_margin=with_margin,
                    annotate=annotate[i : i + batch_size] if annotate else None,
                )
                for i in range(0, len(paths), batch_size)
            ],
            ignore_index=True,
        )
    ensure_ray()
    require_shared(reads=[run_dir, *inputs], writes=[annotate_dir] if annotate_dir else [])
    actors = max(1, min(compute_parallelism(), len(paths) // batch_size))
    table = pd.DataFrame({"image": paths, "annotated": annotate or [""] * len(paths)})
    dataset = ray.data.from_pandas(table).repartition(max(actors * 2, len(paths) // (batch_size * 4)))
    predictions = dataset.map_batches(
        _PredictActor,
        fn_constructor_args=(
            storage.absolute(run_dir),
            max(1, compute_parallelism() // actors),
            every_face,
            with_margin,
        ),
        batch_format="pandas",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        # Ray Data keeps the actors' constructor arguments in the object store and, by default,
        # restarts a dead actor forever, which Ray 2.60 flags with a core_worker error line on the
        # console (ray-project/ray#53727). An actor that dies here fails the prediction instead.
        max_restarts=0,
    )
    result = predictions.to_pandas()
    order = {path: i for i, path in enumerate(paths)}
    return result.sort_values(
        ["image", "face"], key=lambda col: col.map(order) if col.name == "image" else col, ignore_index=True
    )
