"""Face detection and alignment (gendertune.data_prep.faces): the geometry as pure functions, then dlib's real
detectors and landmark models on a real face photo that scikit-image ships (NASA's astronaut
portrait of Eileen Collins, public domain), alone and composed into group photos; and the README's
table of the model files' licences."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gendertune.data_prep.faces import (
    FILL_RGB,
    LANDMARK_MODELS,
    MODEL_FILES,
    AlignSettings,
    FaceFinder,
    apply_matrix,
    face_chips,
    similarity_matrix,
    template_points,
    warp_to_chip,
)
from gendertune.data_prep.images import ImageRejected, load_photo

SIZE = 96
README = Path(__file__).resolve().parents[1] / "README.md"


def settings(**overrides) -> AlignSettings:
    values = {
        "image_size": SIZE,
        "zoom": 1.0,
        "detector": "hog",
        "no_face": "keep",
        "detect_max_side": 1024,
        "min_score": 0.2,
    }
    return AlignSettings(**{**values, **overrides})


def rotation_scale(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), shift[0]], [scale * math.sin(a), scale * math.cos(a), shift[1]]]
    )


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test dependency ([test] extra)")
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder("hog")


# --- geometry, pure ----------------------------------------------------------------------------


def test_similarity_matrix_recovers_a_known_transform():
    target = template_points(SIZE, 1.0)
    known = rotation_scale(23.0, 2.7, (40.0, -13.0))
    landmarks = apply_matrix(known, target)  # the template as it would sit in some photo
    recovered = similarity_matrix(landmarks, target)
    assert np.abs(apply_matrix(recovered, landmarks) - target).max() < 1e-9


def test_similarity_matrix_is_least_squares_and_never_reflects():
    target = template_points(SIZE, 1.0)
    mirrored = target * np.array([-1.0, 1.0])  # a mirror image cannot be matched by a similarity
    matrix = similarity_matrix(mirrored, target)
    assert np.linalg.det(matrix[:, :2]) > 0
    noisy = target + np.random.default_rng(0).normal(0, 1.0, target.shape)
    assert np.abs(apply_matrix(similarity_matrix(noisy, target), noisy) - target).mean() < 1.5


def test_zoom_scales_the_template_about_the_chip_centre():
    one, tight = template_points(SIZE, 1.0), template_points(SIZE, 1.5)
    assert np.allclose(tight - SIZE / 2, (one - SIZE / 2) * 1.5)


def _dots(size: tuple[int, int], points: np.ndarray, radius: float) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for x, y in points:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255))
    return image


def _centroids(chip: np.ndarray, near: np.ndarray) -> np.ndarray:
    """The brightness-weighted centre of the blob nearest each expected point."""
    weight = chip[..., 0].astype(float)
    ys, xs = np.mgrid[: chip.shape[0], : chip.shape[1]] + 0.5  # pixel centres, continuous coordinates
    found = []
    for x, y in near:
        mask = (np.hypot(xs - x, ys - y) < 6) * weight
        found.append(((xs * mask).sum() / mask.sum(), (ys * mask).sum() / mask.sum()))
    return np.array(found)


@pytest.mark.parametrize("landmarks", ["5", "68"])
@pytest.mark.parametrize("angle, scale", [(0.0, 1.0), (17.0, 3.0), (-30.0, 0.6)])
def test_landmarks_land_on_the_template_within_a_pixel(angle, scale, landmarks):
    target = template_points(SIZE, 1.0, landmarks)
    photo_points = apply_matrix(rotation_scale(angle, scale, (150.0, 90.0)), target)
    photo = _dots((700, 600), photo_points, radius=2.5 * scale)
    chip = warp_to_chip(photo, similarity_matrix(photo_points, target), image_size=SIZE)
    assert np.abs(_centroids(chip, target) - target).max() < 1.0


@pytest.mark.parametrize("landmarks", ["5", "68"])
def test_templates_are_mirror_symmetric(landmarks):
    template = LANDMARK_MODELS[landmarks].template
    mirrored = template * (-1, 1) + (1, 0)
    pairs = {"5": [3, 2, 1, 0, 4], "68": [1, 0, 2, 4, 3]}[landmarks]  # each point's mirror image
    assert np.abs(mirrored[pairs] - template).max() < 1e-9


def test_five_point_template_frames_faces_as_the_68_point_one_did():
    """The 5-point template was measured on the same CelebA images as the 68-point one: the middle
    of each eye's two corners sits where the 68-point template has the eye centre, within half a
    pixel of a 64 px chip, so CelebA aligns to nearly what it did; the nose base lies between the
    nose tip and the mouth."""
    five, old = template_points(64, 1.0, "5"), template_points(64, 1.0, "68")
    eye_middles = np.stack([five[:2].mean(0), five[2:4].mean(0)])
    assert np.abs(eye_middles - old[:2]).max() < 0.5
    assert old[2, 1] < five[4, 1] < old[3, 1] and five[4, 0] == old[2, 0] == 32


def test_out_of_photo_area_gets_the_fill_colour():
    target = template_points(SIZE, 1.0)
    # A face whose landmarks sit at the photo's corner: most of the chip lies outside the photo.
    photo = Image.new("RGB", (30, 30), (10, 200, 30))  # covers chip pixels 0-75 only
    chip = warp_to_chip(photo, similarity_matrix(target * 0.4, target), image_size=SIZE)
    assert tuple(chip[-1, -1]) == FILL_RGB and tuple(chip[0, 0]) == (10, 200, 30)
    nowhere = warp_to_chip(photo, rotation_scale(0, 1.0, (500.0, 500.0)), image_size=SIZE)
    assert (nowhere == np.array(FILL_RGB, np.uint8)).all()


# --- the real detector --------------------------------------------------------------------------


def test_model_files_are_found_without_importing_face_recognition_models(finder):
    assert "face_recognition_models" not in sys.modules


def test_readme_states_the_licence_of_every_model_file_the_code_loads():
    section = README.read_text().split("## Model files and licences", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for name in MODEL_FILES:
        (row,) = [line for line in rows if f"`{name}`" in line]
        assert row.split("|")[3].strip(), f"{name}: no licence given"
    (five,) = [line for line in rows if LANDMARK_MODELS["5"].file in line]
    (sixty_eight,) = [line for line in rows if LANDMARK_MODELS["68"].file in line]
    assert "default" in five and "commercial" in sixty_eight


def test_detector_finds_the_astronaut_face(finder, astronaut):
    (face,) = finder.find(astronaut, max_side=1024, min_score=0.2)
    x, y, w, h = face.box
    # Her face spans about x 180-270, y 80-170 in the 512 x 512 portrait.
    assert 160 < x < 200 and 60 < y < 110 and 70 < w < 120 and 70 < h < 120
    # dlib's 5 points, left to right in the image: outer and inner corner of each eye; then the nose base.
    outer_left, inner_left, inner_right, outer_right, nose = face.landmarks
    assert outer_left[0] < inner_left[0] < nose[0] < inner_right[0] < outer_right[0]
    assert max(outer_left[1], outer_right[1]) + 15 < nose[1] < y + h and face.score > 0 and face.detector == "hog"
    (face68,) = FaceFinder("hog", "68").find(astronaut, max_side=1024, min_score=0.2)
    left_eye, right_eye, tip, mouth_left, mouth_right = face68.landmarks
    assert left_eye[0] < tip[0] < right_eye[0] and max(left_eye[1], right_eye[1]) < tip[1] < mouth_left[1]
    assert mouth_left[0] < mouth_right[0]


def test_five_point_chip_of_a_real_face_matches_the_68_point_chip(astronaut):
    """The same face aligned through the 5-point model and through the 68-point model: the 68-point
    landmarks land within 1.5 px (of a 96 px chip) of where the 68-point chip puts them."""
    five, sixty_eight = FaceFinder("hog", "5"), FaceFinder("hog", "68")
    (face68,) = sixty_eight.find(astronaut, max_side=1024, min_score=0.2)
    (face5,) = five.find(astronaut, max_side=1024, min_score=0.2)
    old = similarity_matrix(face68.landmarks, template_points(SIZE, 1.0, "68"))
    new = similarity_matrix(face5.landmarks, template_points(SIZE, 1.0, "5"))
    moved = np.hypot(*(apply_matrix(new, face68.landmarks) - apply_matrix(old, face68.landmarks)).T)
    assert moved.mean() < 1.5, moved
    chip5 = face_chips(astronaut, five, settings(), every_face=False)[0][0].chip.astype(float)
    chip68 = face_chips(astronaut, sixty_eight, settings(landmarks="68"), every_face=False)[0][0].chip
    assert np.abs(chip5 - chip68).mean() < 12


def _with_small_face(astronaut: Image.Image, *, large: bool) -> Image.Image:
    """A group photo: the astronaut at a size HOG finds unaided (if `large`) and once more, shrunk
    so that her face is about 50 px wide, below HOG's ~80 px window."""
    photo = Image.new("RGB", (900, 520), (200, 200, 200))
    if large:
        photo.paste(astronaut, (380, 0))
    photo.paste(astronaut.resize((270, 270)), (40, 220))
    return photo


def test_small_faces_are_found_by_the_upsampled_pass(astronaut):
    plain, upsampling = FaceFinder("hog"), FaceFinder("hog+upsample")
    alone = _with_small_face(astronaut, large=False)
    assert plain.find(alone, max_side=1024, min_score=0.2) == []
    (small,) = upsampling.find(alone, max_side=1024, min_score=0.2)
    assert small.detector == "hog-upsampled" and 30 < small.box[2] < 80 and small.box[0] < 300
    group = _with_small_face(astronaut, large=True)
    # The largest face only (prep): HOG found one, so the upsampled pass does not run.
    assert [f.detector for f in upsampling.find(group, max_side=1024, min_score=0.2)] == ["hog"]
    # Every face (predict): the upsampled pass adds the small face, and finds the large one only once.
    large, small = upsampling.find(group, max_side=1024, min_score=0.2, every_face=True)
    assert (large.detector, small.detector) == ("hog", "hog-upsampled") and large.box[0] > 380 and small.box[0] < 300
    chips, found = face_chips(group, upsampling, settings(detector="hog+upsample"), every_face=True)
    assert found == 2 and [c.face.detector for c in chips] == ["hog", "hog-upsampled"]


@pytest.mark.integration  # runs dlib's CNN detector for seconds
def test_cnn_detector_takes_over_where_hog_finds_nothing(astronaut):
    # No HOG detection reaches a score of 10, so every face here comes from the CNN (MMOD) detector.
    (face,) = FaceFinder("hog+cnn").find(astronaut, max_side=1024, min_score=10.0)
    assert face.detector == "cnn" and 150 < face.box[0] + face.box[2] / 2 < 280
    assert FaceFinder("hog").find(astronaut, max_side=1024, min_score=10.0) == []


def _similar_photo(photo: Image.Image, matrix: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """`photo` moved by the similarity `matrix` (photo -> new photo coordinates)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    return photo.transform(
        size, Image.AFFINE, data=tuple(inverse.ravel()), resample=Image.BICUBIC, fillcolor=(90, 90, 90)
    )


def test_the_same_face_at_other_scales_offsets_and_rotations_aligns_to_the_same_chip(finder, astronaut):
    align = settings()
    (reference,), _ = face_chips(astronaut, finder, align, every_face=False)
    for angle, scale, shift, size in [
        (0, 1.8, (60, 30), (1100, 1000)),
        (12, 1.0, (120, -20), (700, 600)),
        (-10, 0.75, (-40, 50), (450, 500)),
    ]:
        moved = _similar_photo(astronaut, rotation_scale(angle, scale, shift), size)
        (chip,), _ = face_chips(moved, finder, align, every_face=False)
        assert chip.path == "aligned"
        centre = slice(SIZE // 4, 3 * SIZE // 4)  # the face itself, where the photos agree
        difference = np.abs(chip.chip[centre, centre].astype(float) - reference.chip[centre, centre]).mean()
        unaligned = np.abs(
            np.asarray(moved.resize((SIZE, SIZE)), float)[centre, centre] - reference.chip[centre, centre]
        ).mean()
        assert difference < 12 and difference < unaligned / 3, (angle, scale, difference, unaligned)


def test_group_photo_gives_every_face_largest_first(finder, astronaut):
    group = Image.new("RGB", (1000, 560), (200, 200, 200))
    group.paste(astronaut.resize((360, 360)), (0, 100))
    group.paste(astronaut, (480, 20))
    chips, found = face_chips(group, finder, settings(), every_face=True)
    assert found == 2 and [c.path for c in chips] == ["aligned", "aligned"]
    assert chips[0].box[0] > 480 and chips[1].box[0] < 360  # the larger face (right) first
    assert chips[0].box[2] > chips[1].box[2]
    (largest,), _ = face_chips(group, finder, settings(), every_face=False)
    assert largest.box == chips[0].box


def test_no_face_policy(finder):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    (kept,), found = face_chips(noise, finder, settings(no_face="keep"), every_face=True)
    assert found == 0 and kept.path == "centre_crop" and kept.face is None
    assert kept.chip.shape == (SIZE, SIZE, 3) and kept.box == (0, 50, 200, 200)
    # The fallback is the centre square, resized: compare with PIL's own resize of it.
    ys, xs = np.mgrid[:300, :200]
    gradient = Image.fromarray(np.stack([xs, ys * 0.8, (xs + ys) * 0.5], -1).astype(np.uint8))
    (plain,), _ = face_chips(gradient, finder, settings(), every_face=True)
    reference = np.asarray(gradient.crop((0, 50, 200, 250)).resize((SIZE, SIZE), Image.BILINEAR), float)
    assert plain.path == "centre_crop" and np.abs(plain.chip.astype(float) - reference).max() <= 3
    # A tighter template zooms the fallback the same way: the centre half of the square at zoom 2.
    (zoomed,), _ = face_chips(noise, finder, settings(zoom=2.0), every_face=True)
    assert zoomed.box == (50, 100, 100, 100)
    assert face_chips(noise, finder, settings(no_face="reject"), every_face=True) == ([], 0)


def test_load_photo_honours_exif_orientation_and_rejects_junk():
    image = Image.new("RGB", (120, 80), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_photo(buffer.getvalue()).size == (80, 120)
    with pytest.raises(ImageRejected, match="not an image"):
        load_photo(b"hello")
    with pytest.raises(ImageRejected, match="empty"):
        load_photo(b"")


def test_settings_from_another_template_are_refused():
    saved = settings().to_dict()
    assert saved["template"] == LANDMARK_MODELS["5"].template_name and AlignSettings.from_dict(saved) == settings()
    # Saved before the landmark model could be chosen: the 68-point template says which model it was.
    before = {k: v for k, v in settings(landmarks="68").to_dict().items() if k != "landmarks"}
    assert AlignSettings.from_dict(before) == settings(landmarks="68")
    with pytest.raises(ValueError, match="cannot reproduce that alignment"):
        AlignSettings.from_dict({**saved, "landmarks": "68"})  # the 5-point template with the 68-point model
    with pytest.raises(ValueError, match="cannot reproduce that alignment"):
        AlignSettings.from_dict({**saved, "template": "arcface-112"})
    older = {k: v for k, v in saved.items() if k != "min_score"}  # as saved before that setting existed
    with pytest.raises(ValueError, match=r"\(min_score\).*cannot reproduce"):
        AlignSettings.from_dict(older)
