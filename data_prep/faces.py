"""Face detection and landmark alignment: a photo -> one chip per face, framed like every other.

Shared by prep (the largest face per image), evaluation (through prep's shards) and predict (every
face in a photo), so a model always sees faces framed the way it was trained on them.

- Detection: dlib's HOG frontal-face detector (built into `dlib-bin`), in up to three passes, each
  only where the ones before found nothing (`DETECTION_PASSES`): HOG on the photo, HOG on the
  photo upsampled once (faces of 40-80 px), dlib's CNN (MMOD) detector. Every face records the
  pass that found it. For a group photo (`every_face`) the upsampled pass always runs and adds
  the small faces beside the large ones.
- Landmarks (`LANDMARK_MODELS`): dlib's 5-point model by default (eye corners and the nose base;
  its file's licence allows commercial use, README: Model files and licences), or dlib's 68-point
  model reduced to the eye centres, nose tip and mouth corners (iBUG 300-W: no commercial use).
  Both come from the `face_recognition_models` wheel; nothing is fetched.
- Alignment: the least-squares similarity transform (rotation, uniform scale, translation; no
  shear, so faces keep their proportions) from those five points onto the landmark model's
  template, then one bilinear warp into an `image_size`^2 chip.
- Each template is the mean layout of its five points on aligned CelebA faces inside their centre
  square, as these detectors find them, made left-right symmetric (README: Face alignment;
  `bench/bench_faces.py template` measures it). So zoom 1 frames any face the way the original
  notebook's crop framed CelebA: eyes at 52% of the height, hair and chin inside, whichever
  landmark model found them.
- Out-of-image areas (a face near the edge, a tight crop) are filled with one colour, `FILL_RGB`,
  the ImageNet mean: it enters the networks as ~0 after normalisation, the most neutral input
  there is, and it is easy to reproduce in training augmentation (gendertune.models.transforms).

Pure functions do the geometry; `FaceFinder` holds the loaded models (load it once per process).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from gendertune.base.errors import MissingInputError, UserInputError
from gendertune.data_prep.images import center_square_box

FILL_RGB = (124, 116, 104)  # ImageNet mean as uint8
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"

Landmarks = Literal["5", "68"]
Detector = Literal["hog", "hog+upsample", "hog+cnn", "hog+upsample+cnn"]
FacePath = Literal["aligned", "centre_crop"]
# What found a face, in the order the passes run (faces.csv and predict rows name it; "none": no face).
DETECTION_PASSES = ("hog", "hog-upsampled", "cnn")
NO_DETECTION = "none"


@dataclass(frozen=True)
class LandmarkModel:
    """A dlib shape predictor file and the five points alignment takes from it, with their template:
    (x, y) in unit chip coordinates (0..1, y down); left and right as seen in the image."""

    file: str
    template_name: str
    template: np.ndarray
    indices: tuple[tuple[int, ...], ...]  # per point, the dlib parts whose mean it is

    def points(self, parts: np.ndarray) -> np.ndarray:
        """dlib's landmarks (pixel indices) -> the five points in continuous coordinates."""
        return np.stack([parts[list(group)].mean(0) for group in self.indices]) + 0.5


LANDMARK_MODELS: dict[str, LandmarkModel] = {
    # Outer and inner corner of the left eye (as seen), inner and outer of the right, the nose base.
    "5": LandmarkModel(
        file="shape_predictor_5_face_landmarks.dat",
        template_name="celeba-mean-dlib5-v1",
        template=np.array([(0.3493, 0.5224), (0.4365, 0.5288), (0.5635, 0.5288), (0.6507, 0.5224), (0.5000, 0.6925)]),
        indices=((2,), (3,), (1,), (0,), (4,)),
    ),
    # Left and right eye centre, nose tip, left and right mouth corner.
    "68": LandmarkModel(
        file="shape_predictor_68_face_landmarks.dat",
        template_name="celeba-mean-5pt-v1",
        template=np.array([(0.3926, 0.5209), (0.6074, 0.5209), (0.5000, 0.6453), (0.4022, 0.7462), (0.5978, 0.7462)]),
        indices=(tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,)),
    ),
}
# Every model file the code can load (README: Model files and licences lists each one's licence).
MODEL_FILES = (*(model.file for model in LANDMARK_MODELS.values()), CNN_DETECTOR_MODEL)


@dataclass(frozen=True, kw_only=True)
class AlignSettings:
    """Everything that decides a chip; stored in the prep manifest and in every model.pt (with the
    template's name), so that predict and evaluation reproduce training's framing exactly."""

    image_size: int
    zoom: float  # > 1 frames tighter (face larger in the chip), < 1 looser
    detector: Detector
    no_face: Literal["keep", "reject"]  # keep = fall back to the centre square of the photo
    detect_max_side: int  # photos are detected at most this large (speed); chips use full resolution
    min_score: float  # HOG detections scoring lower are ignored
    landmarks: Landmarks = "5"
    fill: tuple[int, int, int] = FILL_RGB

    @property
    def template(self) -> str:
        return LANDMARK_MODELS[self.landmarks].template_name

    def to_dict(self) -> dict:
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        return {**values, "template": self.template}

    @classmethod
    def from_dict(cls, values: dict) -> AlignSettings:
        """Settings saved by `to_dict`; UserInputError when they come from a version that aligned differently."""
        if "landmarks" not in values and values.get("template") == LANDMARK_MODELS["68"].template_name:
            values = {**values, "landmarks": "68"}  # saved before the 5-point model became the default
        expected = {f.name for f in dataclasses.fields(cls)} | {"template"}
        known = values.get("landmarks") in LANDMARK_MODELS
        if (
            set(values) != expected
            or not known
            or values["template"] != LANDMARK_MODELS[values["landmarks"]].template_name
        ):
            differences = sorted(expected ^ set(values)) or ["template"]
            raise UserInputError(
                f"face alignment settings {values} differ from this version's ({', '.join(differences)}): "
                "this version cannot reproduce that alignment; re-run prep and training"
            )
        fields = {k: v for k, v in values.items() if k != "template"}
        return cls(**{**fields, "fill": tuple(values["fill"])})


@dataclass(frozen=True)
class Face:
    """One detected face, in the photo's pixel coordinates (continuous: pixel i spans [i, i+1))."""

    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray  # 5 x 2, in the landmark model's template order
    score: float  # the detector's own score (HOG margin or CNN confidence): compare within one detector only
    detector: str  # the pass that found it, one of DETECTION_PASSES

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


@dataclass(frozen=True)
class FaceChip:
    chip: np.ndarray  # image_size x image_size x 3 uint8
    face: Face | None  # None: no face was found and the centre square was used
    path: FacePath
    box: tuple[float, float, float, float]  # x, y, w, h in the photo: the face's, or the centre square


def template_points(image_size: int, zoom: float, landmarks: Landmarks = "5") -> np.ndarray:
    """The landmark model's template points in chip pixel coordinates for this size and zoom."""
    return ((LANDMARK_MODELS[landmarks].template - 0.5) * zoom + 0.5) * image_size


def similarity_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2 x 3 matrix of the similarity transform that maps `source` points onto `target` points
    with the least squared error (Umeyama 1991, reflections excluded)."""
    source, target = np.asarray(source, float), np.asarray(target, float)
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    u, singular, vt = np.linalg.svd(centred_t.T @ centred_s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / centred_s.var(0).sum()
    return np.hstack([scale * rotation, (mean_t - scale * rotation @ mean_s)[:, None]])


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, float) @ matrix[:, :2].T + matrix[:, 2]


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear, (-linear @ matrix[:, 2])[:, None]])


def warp_to_chip(
    image: Image.Image, matrix: np.ndarray, *, image_size: int, fill: tuple[int, int, int] = FILL_RGB
) -> np.ndarray:
    """The `image_size`^2 chip that `matrix` (photo -> chip coordinates) maps the RGB `image` onto.

    Only the photo region the chip covers is touched; where the chip shrinks the photo by 2x or
    more that region is box-filtered down first, because a bilinear warp alone would alias."""
    to_photo = invert_matrix(matrix)
    corners = apply_matrix(to_photo, [(0, 0), (image_size, 0), (0, image_size), (image_size, image_size)])
    left, top = np.floor(corners.min(0)).astype(int) - 2
    right, bottom = np.ceil(corners.max(0)).astype(int) + 2
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, image.width), min(bottom, image.height)
    if right <= left or bottom <= top:  # the chip lies wholly outside the photo
        return np.broadcast_to(np.array(fill, np.uint8), (image_size, image_size, 3)).copy()
    region = image.crop((left, top, right, bottom))
    to_region = to_photo - np.array([[0, 0, left], [0, 0, top]])
    photo_pixels_per_chip_pixel = math.sqrt(abs(np.linalg.det(to_photo[:, :2])))
    factor = int(photo_pixels_per_chip_pixel)
    if factor >= 2:
        region = region.reduce(factor)
        to_region = to_region / factor
    chip = region.transform(
        (image_size, image_size),
        Image.AFFINE,
        data=tuple(to_region.ravel()),
        resample=Image.BILINEAR,
        fillcolor=tuple(fill),
    )
    return np.asarray(chip, dtype=np.uint8)


def align_face(image: Image.Image, face: Face, settings: AlignSettings) -> np.ndarray:
    matrix = similarity_matrix(face.landmarks, template_points(settings.image_size, settings.zoom, settings.landmarks))
    return warp_to_chip(image, matrix, image_size=settings.image_size, fill=settings.fill)


def centre_square_framing(size: tuple[int, int], settings: AlignSettings) -> tuple[np.ndarray, tuple[float, ...]]:
    """The photo -> chip matrix, and the photo box (x, y, w, h) it shows, for a photo with no face
    found: its centre square, as if framed like aligned CelebA, zoomed like the template."""
    left, top, right, bottom = center_square_box(*size)
    side = (right - left) / settings.zoom
    x, y = (left + right - side) / 2, (top + bottom - side) / 2
    scale = settings.image_size / side
    return np.array([[scale, 0.0, -x * scale], [0.0, scale, -y * scale]]), (x, y, side, side)


def model_file(name: str) -> Path:
    """A model file of the `face_recognition_models` package, found without importing it: its
    __init__ imports pkg_resources, which current setuptools no longer ships."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face alignment needs the face_recognition_models package: "
            "pip install face_recognition_models (or prep with --align none)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: reinstall face_recognition_models")
    return path


def overlaps(box: tuple[float, ...], other: tuple[float, ...]) -> bool:
    """Whether two (x, y, w, h) boxes share more than half of the smaller one: the same face."""
    width = min(box[0] + box[2], other[0] + other[2]) - max(box[0], other[0])
    height = min(box[1] + box[3], other[1] + other[3]) - max(box[1], other[1])
    return max(width, 0) * max(height, 0) > 0.5 * min(box[2] * box[3], other[2] * other[3])


class FaceFinder:
    """dlib's detectors and a landmark model, loaded once per process (loading takes longer than
    aligning a photo); then `find` per photo."""

    def __init__(self, detector: Detector = "hog", landmarks: Landmarks = "5"):
        import dlib  # imported here: only processes that align faces pay for it

        passes = detector.split("+")
        self._hog = dlib.get_frontal_face_detector()
        self._upsample = "upsample" in passes
        self._cnn = dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_MODEL))) if "cnn" in passes else None
        self._model = LANDMARK_MODELS[landmarks]
        self._landmarks = dlib.shape_predictor(str(model_file(self._model.file)))

    def detect(self, pixels: np.ndarray, *, min_score: float, every_face: bool) -> list[tuple[object, float, str]]:
        """(dlib rectangle, score, pass) of the faces in `pixels`. A later pass runs only where the
        ones before found nothing, except that with `every_face` the upsampled pass always runs and
        adds the faces the first one missed (the small faces of a group photo)."""
        found = [(box, float(score), "hog") for box, score in zip(*self._hog.run(pixels, 0, min_score)[:2])]
        if self._upsample and (every_face or not found):
            boxes, scores, _ = self._hog.run(pixels, 1, min_score)
            found += [
                (box, float(score), "hog-upsampled")
                for box, score in zip(boxes, scores)
                if not any(overlaps(_xywh(box), _xywh(seen)) for seen, _, _ in found)
            ]
        if not found and self._cnn is not None:
            found = [(hit.rect, float(hit.confidence), "cnn") for hit in self._cnn(pixels, 0)]
        return found

    def find(self, image: Image.Image, *, max_side: int, min_score: float, every_face: bool = False) -> list[Face]:
        """The faces in the RGB `image` (HOG detections scoring under `min_score` ignored), largest first."""
        scale = min(1.0, max_side / max(image.size))
        small = (
            image
            if scale == 1.0
            else image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
        )
        pixels = np.asarray(small)
        # Scale by the exact per-axis ratio the resize used, so landmarks land on the full photo.
        ratio = np.array([image.width / small.width, image.height / small.height])
        faces = []
        for box, score, detector in self.detect(pixels, min_score=min_score, every_face=every_face):
            parts = np.array([(p.x, p.y) for p in self._landmarks(pixels, box).parts()], float)
            x, y, w, h = _xywh(box)
            faces.append(
                Face(
                    box=(x * ratio[0], y * ratio[1], w * ratio[0], h * ratio[1]),
                    landmarks=self._model.points(parts) * ratio,
                    score=score,
                    detector=detector,
                )
            )
        return sorted(faces, key=lambda f: -f.area)


def _xywh(rectangle) -> tuple[float, float, float, float]:
    return float(rectangle.left()), float(rectangle.top()), float(rectangle.width()), float(rectangle.height())


def face_chips(
    image: Image.Image, finder: FaceFinder, settings: AlignSettings, *, every_face: bool
) -> tuple[list[FaceChip], int]:
    """The chip of the largest face (or of every face), largest first, and how many faces were
    found. No face: the centre square under the `keep` policy, no chip under `reject`."""
    faces = finder.find(image, max_side=settings.detect_max_side, min_score=settings.min_score, every_face=every_face)
    if not faces:
        if settings.no_face == "reject":
            return [], 0
        matrix, box = centre_square_framing(image.size, settings)
        return [
            FaceChip(
                warp_to_chip(image, matrix, image_size=settings.image_size, fill=settings.fill),
                None,
                "centre_crop",
                box,
            )
        ], 0
    chosen = faces if every_face else faces[:1]
    return [FaceChip(align_face(image, face, settings), face, "aligned", face.box) for face in chosen], len(faces)
