"""Face finding on real photos: the landmark templates, and what each detection path finds at what cost.

Two sections, each run on its own (`template`, `detect`), both on the shared real data:

- `template`: the mean layout of each landmark model's five points (gendertune.data_prep.faces.
  LANDMARK_MODELS) on aligned CelebA, inside each image's centre square, made left-right
  symmetric: the template the code ships. Measured on the first --template-n images (sorted by
  name) where HOG finds a face. Then, on the next --check-n images, how close the two paths'
  chips are: the 68-point model's eye centres, nose tip and mouth corners (the points the old
  template was made of) are mapped into the chip by each path's transform, and their mean
  distance from the 68-point template is reported in chip pixels at 64 and 128 px. The 68-point
  path's own number is its residual; the 5-point path's is how far its chips frame the same
  faces from where the 68-point chips did. RATIO: 5-point error / 68-point error.
- `detect`: on --n images per set (every k-th, sorted) of the CelebA sample and utkface-dev, each
  `--detector` setting through FaceFinder.find (detection + landmarks, as prep runs it): faces
  missed, faces found by each pass, CPU and wall ms per image. Plus the group-photo path (every_face, where
  the upsampled pass always runs). RATIO: speed (CPU time) of each setting / the previous default's ("hog"),
  measured in the same run (goal: at most twice its cost).

    .venv/bin/python bench/bench_faces.py template --json template.json
    .venv/bin/python bench/bench_faces.py detect --n 300 --json detect.json
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
from benchlib import REPO, format_table, machine_info, ratio_line, write_json
from PIL import Image

from gendertune.data_prep.faces import (
    DETECTION_PASSES,
    LANDMARK_MODELS,
    NO_DETECTION,
    FaceFinder,
    apply_matrix,
    model_file,
    similarity_matrix,
    template_points,
)
from gendertune.data_prep.images import center_square_box

CELEBA = "celeba-sample/img_align_celeba"
UTKFACE = "utkface-dev/images"
DETECTORS = ("hog", "hog+upsample", "hog+cnn", "hog+upsample+cnn")
MIN_SCORE = 0.2  # PrepConfig's default face_min_score
# dlib-5 order -> mirrored order: a left-right flip swaps the eyes and each eye's outer/inner corner.
MIRROR = {"5": [3, 2, 1, 0, 4], "68": [1, 0, 2, 4, 3]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("section", choices=["template", "detect"])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="folder holding celeba-sample/ and utkface-dev/ (default ../shared/data)",
    )
    parser.add_argument("--template-n", type=int, default=1500, help="images the template is measured on")
    parser.add_argument("--check-n", type=int, default=500, help="the next images, where the two paths are compared")
    parser.add_argument("--n", type=int, default=300, help="detect: images per set")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    return parser.parse_args()


def landmark_points(detector, predictors: dict, pixels: np.ndarray) -> dict[str, np.ndarray] | None:
    """Each landmark model's five points on the first HOG face of `pixels`, or None."""
    boxes, _, _ = detector.run(pixels, 0, MIN_SCORE)
    if not boxes:
        return None
    box = max(boxes, key=lambda b: b.area())
    return {
        name: LANDMARK_MODELS[name].points(np.array([(p.x, p.y) for p in predictor(pixels, box).parts()], float))
        for name, predictor in predictors.items()
    }


def symmetric(layout: np.ndarray, name: str) -> np.ndarray:
    mirrored = layout[MIRROR[name]] * np.array([-1.0, 1.0]) + np.array([1.0, 0.0])
    return (layout + mirrored) / 2


def template_section(args: argparse.Namespace) -> dict:
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictors = {name: dlib.shape_predictor(str(model_file(model.file))) for name, model in LANDMARK_MODELS.items()}
    files = sorted((args.data / CELEBA).glob("*.jpg"))[: args.template_n + args.check_n]
    unit = {name: [] for name in LANDMARK_MODELS}
    checked = []
    for index, path in enumerate(files):
        image = Image.open(path).convert("RGB")
        points = landmark_points(detector, predictors, np.asarray(image))
        if points is None:
            continue
        if index < args.template_n:
            left, top, right, _ = center_square_box(*image.size)
            for name, found in points.items():
                unit[name].append((found - (left, top)) / (right - left))
        else:
            checked.append(points)
    templates = {name: symmetric(np.mean(layouts, 0), name) for name, layouts in unit.items()}
    print(f"templates from {len(unit['5'])} of the first {args.template_n} images (HOG found a face):")
    for name, template in templates.items():
        print(f"  {name}: " + ", ".join(f"({x:.4f}, {y:.4f})" for x, y in template))
    shipped = {name: float(np.abs(templates[name] - model.template).max()) for name, model in LANDMARK_MODELS.items()}
    print("largest difference from the shipped template: " + ", ".join(f"{k} {v:.4f}" for k, v in shipped.items()))
    rows, errors = [], {}
    for size in (64, 128):
        reference = template_points(size, 1.0, "68")
        in_68_chip = [apply_matrix(similarity_matrix(points["68"], reference), points["68"]) for points in checked]
        for name in LANDMARK_MODELS:
            target = template_points(size, 1.0, name)
            mapped = [apply_matrix(similarity_matrix(points[name], target), points["68"]) for points in checked]
            distances = [np.hypot(*(m - reference).T).mean() for m in mapped]
            moved = [np.hypot(*(m - old).T).mean() for m, old in zip(mapped, in_68_chip)]
            errors[f"{name}@{size}"] = float(np.mean(distances))
            rows.append(
                (
                    size,
                    f"{name}-point",
                    len(checked),
                    np.mean(distances),
                    np.percentile(distances, 95),
                    np.mean(moved),
                    np.percentile(moved, 95),
                )
            )
    print(format_table(["chip px", "path", "faces", "error px", "p95", "from 68-pt chip px", "p95"], rows))
    for size in (64, 128):
        print(
            ratio_line(
                f"68-point / 5-point framing error at {size} px", errors[f"68@{size}"] / errors[f"5@{size}"], 0.5
            )
        )
    return {
        "templates": {k: v.tolist() for k, v in templates.items()},
        "faces": len(unit["5"]),
        "checked": len(checked),
        "errors_px": errors,
        "shipped_difference": shipped,
    }


def sample(folder: Path, n: int) -> list[Path]:
    files = sorted(folder.glob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def detect_set(finder: FaceFinder, images: list[Image.Image], *, every_face: bool) -> tuple[Counter, float, float]:
    """Per image, the pass that found its largest face; and CPU and wall ms per image. The CPU time
    is this process's own: on a shared machine it moves much less with the others' load."""
    paths = Counter()
    cpu, wall = time.process_time(), time.perf_counter()
    for image in images:
        faces = finder.find(image, max_side=1024, min_score=MIN_SCORE, every_face=every_face)
        paths[faces[0].detector if faces else NO_DETECTION] += 1
    return paths, (time.process_time() - cpu) * 1000 / len(images), (time.perf_counter() - wall) * 1000 / len(images)


def detect_section(args: argparse.Namespace) -> dict:
    sets = {
        name: [Image.open(p).convert("RGB") for p in sample(args.data / folder, args.n)]
        for name, folder in (("celeba", CELEBA), ("utkface", UTKFACE))
    }
    results, rows = {}, []
    settings = [(detector, False) for detector in DETECTORS] + [("hog+upsample", True)]
    for detector, every_face in settings:
        finder = FaceFinder(detector)
        label = detector + (" (every face)" if every_face else "")
        for name, images in sets.items():
            paths, cpu_ms, wall_ms = detect_set(finder, images, every_face=every_face)
            results[f"{label}/{name}"] = {"cpu_ms_per_image": cpu_ms, "wall_ms_per_image": wall_ms, **paths}
            rows.append(
                (label, name, len(images), paths[NO_DETECTION], *(paths[p] for p in DETECTION_PASSES), cpu_ms, wall_ms)
            )
    print(
        format_table(["detector", "set", "images", "missed", *DETECTION_PASSES, "CPU ms/image", "wall ms/image"], rows)
    )
    for label in dict.fromkeys(key.split("/")[0] for key in results):
        for name in sets:
            ratio = results[f"hog/{name}"]["cpu_ms_per_image"] / results[f"{label}/{name}"]["cpu_ms_per_image"]
            print(ratio_line(f"speed of {label} / hog's, {name}", ratio, 0.5))
    return results


def main() -> None:
    args = parse_args()
    numbers = template_section(args) if args.section == "template" else detect_section(args)
    write_json(args.json, {"machine": machine_info(), args.section: numbers})


if __name__ == "__main__":
    main()
