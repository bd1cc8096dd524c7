"""PrepConfig: every setting of the prep stage, validated before any work starts."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from gendertune.base.config import SEED_BOUNDS, ConfigError, StageConfig, setting
from gendertune.data_prep.faces import AlignSettings, Detector, Landmarks


@dataclasses.dataclass
class PrepConfig(StageConfig):
    section = "prep"

    data: str = setting("", help="data folder: img_align_celeba/ + list_attr_celeba.txt, or images + a CSV")
    out: str = setting("", help="output folder (created atomically) or object-store URI (s3://, gs://)")
    # Unset: list_attr_celeba.txt, else the single *.csv in --data.
    labels: str | None = setting(None, help="label file (CelebA list_attr format or CSV); unset = found in --data")
    attribute: str = setting("Male", help="the target attribute column; 1/-1 or 1/0 become 1/0")
    image_column: str | None = setting(None, help="CSV column with image names, CSV labels only; unset = auto-detected")
    split: Literal["random", "official", "identity"] = setting("random", help="split method")
    ratios: tuple[float, ...] = setting((0.8, 0.2), help="split ratios: 2 = train,test, 3 = train,val,test")
    image_size: int = setting(128, help="square output side in px", bounds="[16, 1024]")
    seed: int = setting(0, help="split seed", bounds=SEED_BOUNDS)
    overwrite: bool = setting(False, help="replace an existing prep output")
    # Large enough to amortise Ray's per-task scheduling.
    rows_per_task: int = setting(256, help="most images per Ray task", flag=False, bounds="[1, inf)")
    parallelism: int = setting(0, help="concurrent decode tasks; 0 = one per CPU Ray can see", bounds="[0, inf)")
    # Face alignment (gendertune.data_prep.faces): detect, find landmarks, warp onto one template.
    align: Literal["faces", "none"] = setting(
        "faces", help="faces = detect each face and align it by its landmarks; none = centre square"
    )
    no_face: Literal["keep", "reject"] = setting(
        "keep", help="an image with no face found: keep its centre square, or reject it"
    )
    # 1.4: the face and less hair, the way tight photo crops (UTKFace's) show it; on the shared
    # sample it gained 3.5 points on UTKFace over 1 with CelebA unchanged (docs/results.md, issue 22).
    face_zoom: float = setting(
        1.4,
        help="aligned framing: 1 = CelebA's own (face, hair, chin), > 1 tighter (1.4: face, less hair), < 1 looser",
        bounds="[0.5, 3]",
    )
    # hog+upsample: on 300 images each of CelebA and UTKFace it found a third to a half of the faces
    # HOG missed for 1.15x HOG's time; the CNN finds the rest at 2-3x (README: Face alignment).
    detector: Detector = setting(
        "hog+upsample",
        help="face detector: hog; +upsample = HOG on the photo upsampled once (faces of 40-80 px) where "
        "HOG finds nothing; +cnn = dlib's CNN where the HOG passes find nothing, slower",
    )
    # 68 = dlib's 68-point model: its training data (iBUG 300-W) excludes commercial use (README: Model files and licences).
    landmarks: Landmarks = setting(
        "5",
        help="landmark model: 5 = dlib's 5-point (eye corners, nose base; public domain), "
        "68 = dlib's 68-point (iBUG 300-W: NOT for commercial use)",
    )
    detect_max_side: int = setting(1024, help="detect faces on photos downscaled to this side", bounds="[160, inf)")
    # Between the scores of HOG's false positives (clothing, texture) and of real faces (README: Face alignment).
    face_min_score: float = setting(0.2, help="ignore HOG detections scoring below this", bounds="[0, inf)")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("prep.data: give the data folder with --data DIR")
        if not self.out:
            raise ConfigError("prep.out: give the output folder with --out DIR")
        if self.split != "official":
            if len(self.ratios) not in (2, 3):
                raise ConfigError(
                    f"prep.ratios: give 2 (train,test) or 3 (train,val,test) ratios, got {list(self.ratios)}"
                )
            if any(r <= 0 for r in self.ratios) or not math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6):
                raise ConfigError(
                    f"prep.ratios: each ratio must be > 0 and they must sum to 1, got {list(self.ratios)} "
                    f"(sum {sum(self.ratios):g})"
                )

    def align_settings(self) -> AlignSettings | None:
        """The alignment every chip of this prep gets, or None for --align none."""
        if self.align == "none":
            return None
        return AlignSettings(
            image_size=self.image_size,
            zoom=self.face_zoom,
            detector=self.detector,
            no_face=self.no_face,
            detect_max_side=self.detect_max_side,
            min_score=self.face_min_score,
            landmarks=self.landmarks,
        )
