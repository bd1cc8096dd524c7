"""Synthetic CelebA-layout dataset of procedurally drawn faces.

This module owns :func:`make_sample`, which writes a small stand-in for CelebA
(``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``,
``identity_CelebA.txt``) so the pipeline, its tests and the demo can run where
the real dataset cannot be downloaded.  The faces are drawn with PIL; they are
not real people and not CelebA images.

Design points that the rest of the project relies on:

* The files mimic the official CelebA formats byte for byte where it matters
  (the attribute file's count line, 40 names, and space-padded -1/1 columns).
* ``Male`` is a per-identity label signalled only by several weak, overlapping
  cues (hair length, jaw width, brow thickness, beard, lipstick, earrings, ...),
  so a classifier has something real to learn without the task being trivial.
* Data-quality problems are planted on purpose: ``n_duplicates`` byte-identical
  copies and ``n_corrupt`` truncated JPEGs, reported in :class:`SampleSummary`
  so tests can check that data prep finds exactly those.
* Counting convention: ``n`` is the total number of image files.  Of these,
  ``n_duplicates`` are byte copies of earlier, valid files (new ids, same
  labels, identity and partition) and ``n_corrupt`` are truncated JPEGs that
  are still listed in every label file.  So ``n - n_duplicates - n_corrupt``
  files are distinct, readable images.
* Output is a pure function of the arguments: the same seed gives
  byte-identical files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gendertune.base.errors import GendertuneError, UserInputError
from gendertune.data_prep.celeba import ATTR_FILE, IDENTITY_FILE, IMAGE_DIR, PARTITION_FILE

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

README_FILE = "README.txt"

# Faces are always drawn on CelebA's aligned canvas and resized afterwards, so
# the geometry below only has to be right for one size.
_CANVAS_W, _CANVAS_H = 178, 218
_CX, _CY = 89.0, 116.0  # face centre: eyes land near y=110, as in aligned CelebA
# Faces are drawn on a canvas this much larger on every side, so rotating and
# shifting it never exposes an undrawn corner.
_MARGIN = 32
_NOISE_PAD = 40  # the shared noise field is this much larger than a frame, for random windows
_CORRUPT_FRACTION = 0.4  # a corrupt file keeps this share of a valid JPEG's bytes

_HAIR_COLOURS = {  # name -> (base RGB, probability for a young person)
    "black": ((28, 24, 22), 0.33),
    "brown": ((92, 62, 40), 0.34),
    "blond": ((205, 170, 110), 0.18),
    "red": ((140, 62, 34), 0.07),
    "gray": ((160, 158, 155), 0.08),
}
_HAIR_STYLES = ("bald", "buzz", "short", "medium", "long")
# Hair length is one of the weak cues: both classes use every style except
# "bald", but with shifted probabilities.
_STYLE_P = {True: (0.06, 0.20, 0.48, 0.17, 0.09), False: (0.0, 0.03, 0.17, 0.30, 0.50)}
_BEARDS = ("none", "stubble", "moustache", "goatee", "full")
_BEARD_P = {True: (0.42, 0.22, 0.08, 0.10, 0.18), False: (0.97, 0.03, 0.0, 0.0, 0.0)}
_SKIN_DARK = np.array([92.0, 60.0, 42.0])
_SKIN_LIGHT = np.array([242.0, 208.0, 184.0])


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`make_sample` wrote; ids are file names like ``000007.jpg``."""

    path: Path
    n_images: int
    n_male: int
    n_duplicates: int
    n_corrupt: int
    n_people: int
    duplicate_pairs: tuple[tuple[str, str], ...]  # (duplicate, original it copies)
    corrupt_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Person:
    """Identity traits shared by every image of one synthetic person."""

    male: bool
    young: bool
    skin: tuple[float, float, float]
    skin_tone: float  # 0 = darkest, 1 = palest
    half_w: float
    half_h: float
    jaw: float  # 1 = wide, square-ish jaw; lower = tapering chin
    eye_dx: float
    eye_w: float
    eye_h: float
    iris: tuple[int, int, int]
    brow_thick: float
    brow_arch: float
    brow_gap: float
    nose_len: float
    nose_w: float
    mouth_w: float
    lip_thick: float
    hair_name: str
    hair: tuple[int, int, int]
    hair_style: str
    hair_volume: float
    wavy: bool
    hairline: float  # how far hair reaches down the forehead, as share of half_h
    bangs: bool
    beard: str
    lipstick_p: float
    makeup_p: float
    earring_p: float
    glasses: bool
    rosy: bool
    bags: bool
    double_chin: bool
    shoulder_w: float
    neck_w: float
    clothes: tuple[int, int, int]
    attractive: bool


@dataclass(frozen=True)
class _Shot:
    """Per-image variation: pose, lighting, expression, accessories."""

    dx: float
    dy: float
    scale: float
    angle: float
    yaw: float
    bg_a: tuple[int, int, int]
    bg_b: tuple[int, int, int]
    bg_vertical: bool
    brightness: float
    light_dir: float
    light_strength: float
    tint: tuple[float, float, float]
    noise: float
    smile: float
    mouth_open: bool
    lipstick: bool
    lip_colour: tuple[int, int, int]
    makeup: bool
    earrings: bool
    glasses: bool
    hat: bool
    hat_colour: tuple[int, int, int]
    necklace: bool
    necktie: bool
    blurry: bool
    quality: int


class SampleExistsError(GendertuneError, FileExistsError):
    """The sample's folder already holds files."""


def make_sample(
    out_dir: str | Path,
    *,
    n: int,
    seed: int = 0,
    image_size: tuple[int, int] = (178, 218),
    n_duplicates: int = 3,
    n_corrupt: int = 1,
    people: int | None = None,
) -> SampleSummary:
    """Write a synthetic CelebA-layout dataset of ``n`` image files to ``out_dir``.

    ``image_size`` is (width, height).  ``people`` is the number of identities
    (default ``max(2, n // 8)``).  See the module docstring for how duplicates
    and corrupt files count toward ``n``.  Raises ``FileExistsError`` if
    ``out_dir`` exists and is not an empty directory, so user data is never
    overwritten.
    """
    n_people = max(2, n // 8) if people is None else people
    _validate(n, seed, image_size, n_duplicates, n_corrupt, n_people)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SampleExistsError(f"refusing to write into {out}: it is not an empty folder; choose a new --out")

    layout = np.random.default_rng([seed, 0])
    # Slot 0 is never special, so every duplicate has a valid earlier original.
    special = layout.choice(np.arange(1, n), size=n_duplicates + n_corrupt, replace=False)
    dup_slots = sorted(int(s) for s in special[:n_duplicates])
    corrupt_slots = set(int(s) for s in special[n_duplicates:])
    dup_set = set(dup_slots)
    originals = [s for s in range(n) if s not in dup_set]

    # Every identity gets at least one image; the rest are spread unevenly,
    # like CelebA where some celebrities have many more photos than others.
    weights = layout.gamma(2.0, size=n_people)
    counts = 1 + layout.multinomial(len(originals) - n_people, weights / weights.sum())
    owner_of = np.repeat(np.arange(n_people), counts)
    layout.shuffle(owner_of)
    slot_owner = {slot: int(p) for slot, p in zip(originals, owner_of)}

    males = _assign_male(counts, layout)
    partition_of_person = _assign_partitions(n_people, layout)

    source_of: dict[int, int] = {}
    for d in dup_slots:
        candidates = [s for s in originals if s < d and s not in corrupt_slots]
        source_of[d] = int(layout.choice(candidates))
        slot_owner[d] = slot_owner[source_of[d]]

    persons = [_make_person(bool(males[p]), np.random.default_rng([seed, 1, p])) for p in range(n_people)]

    noise = np.random.default_rng([seed, 4]).standard_normal(
        (_CANVAS_H + _NOISE_PAD, _CANVAS_W + _NOISE_PAD, 3), dtype=np.float32
    )
    image_dir = out / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    attr_rows: dict[int, list[int]] = {}
    jpeg_of: dict[int, bytes] = {}
    for slot in range(n):
        if slot in dup_set:
            data = jpeg_of[source_of[slot]]
            attr_rows[slot] = attr_rows[source_of[slot]]
        else:
            person = persons[slot_owner[slot]]
            shot = _make_shot(person, np.random.default_rng([seed, 2, slot]))
            data = _encode(_render(person, shot, noise, np.random.default_rng([seed, 3, slot])), shot, image_size)
            attr_rows[slot] = _attributes(person, shot)
            if slot in corrupt_slots:
                data = data[: int(len(data) * _CORRUPT_FRACTION)]
            else:
                jpeg_of[slot] = data
        (image_dir / _name(slot)).write_bytes(data)

    _write_lines(
        out / ATTR_FILE,
        [str(n), " ".join(ATTRIBUTE_NAMES)]
        + [
            # CelebA right-aligns every value in a 2-wide column: " 1" gets two spaces.
            _name(s) + "".join(f" {v:2d}" for v in attr_rows[s])
            for s in range(n)
        ],
    )
    _write_lines(out / PARTITION_FILE, [f"{_name(s)} {partition_of_person[slot_owner[s]]}" for s in range(n)])
    _write_lines(out / IDENTITY_FILE, [f"{_name(s)} {slot_owner[s] + 1}" for s in range(n)])
    (out / README_FILE).write_text(_readme(n, seed, n_people, n_duplicates, n_corrupt), encoding="utf-8")

    return SampleSummary(
        path=out,
        n_images=n,
        n_male=sum(1 for s in range(n) if males[slot_owner[s]]),
        n_duplicates=n_duplicates,
        n_corrupt=n_corrupt,
        n_people=n_people,
        duplicate_pairs=tuple((_name(d), _name(source_of[d])) for d in dup_slots),
        corrupt_ids=tuple(_name(s) for s in sorted(corrupt_slots)),
    )


def _validate(n: int, seed: int, image_size: tuple[int, int], n_duplicates: int, n_corrupt: int, n_people: int) -> None:
    # UserInputError: these are settings (`make-sample --n 3`), shown as one line, not a bug.
    if seed < 0:
        raise UserInputError(f"seed must be >= 0 (numpy seed sequences reject negatives), got {seed}")
    if n < 1:
        raise UserInputError(f"n must be >= 1, got {n}")
    if n_duplicates < 0 or n_corrupt < 0:
        raise UserInputError("n_duplicates and n_corrupt must be >= 0")
    if n_duplicates + n_corrupt > n - 1:
        raise UserInputError(
            f"n={n} is too small: {n_duplicates} planted duplicate(s) and {n_corrupt} corrupt file(s) "
            f"leave no clean image; use n >= {n_duplicates + n_corrupt + 1}"
        )
    if not 1 <= n_people <= n - n_duplicates:
        raise UserInputError(f"people must be in [1, n - n_duplicates={n - n_duplicates}], got {n_people}")
    if len(image_size) != 2 or min(image_size) < 8:
        raise UserInputError(f"image_size must be (width, height) >= 8 px, got {image_size}")


def _name(slot: int) -> str:
    return f"{slot + 1:06d}.jpg"


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _assign_male(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label identities so that the *image* share of Male lands near a random target.

    Assigning a coin flip per identity would let a few prolific identities push
    the image balance far off; greedily filling toward a target in 42-58% keeps
    it realistic (CelebA is ~42% male) while still varying with the seed.
    """
    target = rng.uniform(0.42, 0.58)
    order = sorted(range(len(counts)), key=lambda p: (-counts[p], rng.random()))
    male = np.zeros(len(counts), dtype=bool)
    male_images = total = 0
    for p in order:
        total += int(counts[p])
        if male_images / total < target:
            male[p] = True
            male_images += int(counts[p])
    return male


def _assign_partitions(n_people: int, rng: np.random.Generator) -> np.ndarray:
    """Split identities ~80/10/10 into train/val/test (0/1/2), as CelebA does.

    Partitions are by identity so no person appears in two of them; with three
    or more people, val and test get at least one identity each.
    """
    n_val = round(0.1 * n_people)
    n_test = round(0.1 * n_people)
    if n_people >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    parts = np.zeros(n_people, dtype=int)
    order = rng.permutation(n_people)
    parts[order[n_people - n_val - n_test : n_people - n_test]] = 1
    parts[order[n_people - n_test :]] = 2
    return parts


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(hi, max(lo, x)))


def _rgb(rgb: np.ndarray | tuple[float, ...]) -> tuple[int, int, int]:
    r, g, b = (int(round(_clip(float(v), 0, 255))) for v in rgb)
    return r, g, b


def _make_person(male: bool, rng: np.random.Generator) -> _Person:
    m = 1.0 if male else 0.0
    young = bool(rng.random() < 0.75)
    tone = float(rng.beta(2.2, 1.6))
    skin = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * tone + rng.normal(0, 6, 3)

    names = list(_HAIR_COLOURS)
    p = np.array([_HAIR_COLOURS[k][1] for k in names])
    if not young:  # older people go gray more often
        p[names.index("gray")] += 0.35
    hair_name = names[rng.choice(len(names), p=p / p.sum())]
    hair = np.array(_HAIR_COLOURS[hair_name][0], dtype=float) * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)

    style = _HAIR_STYLES[rng.choice(len(_HAIR_STYLES), p=_STYLE_P[male])]
    if style == "bald" and young:
        style = "buzz"
    beard = _BEARDS[rng.choice(len(_BEARDS), p=_BEARD_P[male])]

    # Each continuous cue has class means at most about one standard deviation apart,
    # so the distributions overlap heavily and no single cue decides the label.
    return _Person(
        male=male,
        young=young,
        skin=_rgb(skin),
        skin_tone=tone,
        half_w=_clip(rng.normal(37.5 + 2.5 * m, 2.6), 31, 46),
        half_h=_clip(rng.normal(53.0 + 1.0 * m, 2.4), 46, 58),
        jaw=_clip(rng.normal(0.62 + 0.10 * m, 0.09), 0.42, 0.95),
        eye_dx=rng.normal(19.0, 1.3),
        eye_w=rng.normal(7.4, 0.7),
        eye_h=_clip(rng.normal(3.5, 0.5), 2.2, 5.0),
        iris=_rgb(rng.choice([(70, 45, 25), (40, 30, 20), (70, 100, 140), (80, 110, 70)]) + rng.normal(0, 10, 3)),
        brow_thick=_clip(rng.normal(2.7 + 1.0 * m, 0.9), 1.2, 6.0),
        brow_arch=_clip(rng.normal(0.55 - 0.25 * m, 0.28), -0.2, 1.2),
        brow_gap=rng.normal(8.0 - 0.8 * m, 1.1),
        nose_len=_clip(rng.normal(17.0 + 1.5 * m, 2.0), 11, 24),
        nose_w=_clip(rng.normal(5.5 + 0.8 * m, 0.9), 3.5, 8.5),
        mouth_w=_clip(rng.normal(12.5 + 1.0 * m, 1.4), 8, 17),
        lip_thick=_clip(rng.normal(3.2 - 0.5 * m, 0.7), 1.4, 5.5),
        hair_name=hair_name,
        hair=_rgb(hair),
        hair_style=style,
        hair_volume=rng.uniform(3, 11),
        wavy=bool(rng.random() < 0.35),
        hairline=_clip(rng.normal(0.42 - (0.12 if (male and not young) else 0.0), 0.07), 0.15, 0.6),
        bangs=bool(rng.random() < (0.1 if male else 0.3)) and style in ("short", "medium", "long"),
        beard=beard,
        lipstick_p=float(rng.beta(1, 20) if male else rng.beta(2.5, 2)),
        makeup_p=float(rng.beta(1, 25) if male else rng.beta(1.5, 2.5)),
        earring_p=float(rng.beta(1, 18) if male else rng.beta(1.2, 2)),
        glasses=bool(rng.random() < 0.12),
        rosy=bool(rng.random() < (0.05 if male else 0.15)),
        bags=bool(rng.random() < (0.15 if young else 0.45)),
        double_chin=bool(rng.random() < (0.03 if young else 0.2)),
        shoulder_w=rng.normal(68 + 6 * m, 6),
        neck_w=rng.normal(13 + 1.8 * m, 1.8),
        clothes=_rgb(rng.uniform(20, 235, 3)),
        attractive=bool(rng.random() < 0.5),
    )


def _make_shot(person: _Person, rng: np.random.Generator) -> _Shot:
    smile = float(rng.uniform(0.6, 1.0)) if rng.random() < 0.5 else float(rng.uniform(-0.15, 0.2))
    lipstick = bool(rng.random() < person.lipstick_p)
    natural_lip = np.array(person.skin, dtype=float) * np.array([0.92, 0.66, 0.68])
    lip = rng.uniform([150, 10, 30], [225, 70, 110]) if lipstick else natural_lip + rng.normal(0, 6, 3)
    return _Shot(
        dx=_clip(rng.normal(0, 2.0), -5, 5),
        dy=_clip(rng.normal(0, 2.0), -5, 5),
        scale=rng.uniform(0.94, 1.06),
        angle=rng.uniform(-8, 8),
        yaw=_clip(rng.normal(0, 1.8), -4, 4),
        # Muted backgrounds: a random grey level plus a moderate colour cast.
        bg_a=_rgb(rng.uniform(40, 225) + rng.normal(0, 30, 3)),
        bg_b=_rgb(rng.uniform(40, 225) + rng.normal(0, 30, 3)),
        bg_vertical=bool(rng.random() < 0.5),
        brightness=rng.uniform(0.78, 1.18),
        light_dir=rng.uniform(0, 2 * math.pi),
        light_strength=rng.uniform(0.0, 0.35),
        tint=tuple(1 + rng.normal(0, 0.04, 3)),
        noise=rng.uniform(2, 7),
        smile=smile,
        mouth_open=bool(rng.random() < (0.55 if smile > 0.5 else 0.2)),
        lipstick=lipstick,
        lip_colour=_rgb(lip),
        makeup=bool(rng.random() < person.makeup_p),
        earrings=bool(rng.random() < person.earring_p),
        glasses=person.glasses and bool(rng.random() < 0.85),
        hat=bool(rng.random() < 0.04),
        hat_colour=_rgb(rng.uniform(10, 230, 3)),
        necklace=bool(rng.random() < (0.03 if person.male else 0.15)),
        necktie=bool(rng.random() < (0.12 if person.male else 0.01)),
        blurry=bool(rng.random() < 0.05),
        quality=int(rng.integers(84, 96)),
    )


def _shade(rgb: tuple[int, int, int], factor: float, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = _rgb(np.array(rgb, dtype=float) * factor)
    return r, g, b, alpha


def _face_outline(cx: float, cy: float, hw: float, hh: float, jaw: float, steps: int = 48) -> list[tuple[float, float]]:
    """Ellipse whose lower half tapers toward the chin by ``jaw``."""
    pts = []
    for t in np.linspace(0, 2 * math.pi, steps, endpoint=False):
        s, c = math.sin(t), math.cos(t)
        taper = 1 - (1 - jaw) * s**1.5 if s > 0 else 1.0
        pts.append((cx + hw * c * taper, cy + hh * s))
    return pts


def _hair_shape(
    cx: float, top: float, rx: float, bottom: float, bottom_rx: float, wavy: bool, phase: float
) -> list[tuple[float, float]]:
    """Arch over the head: a half-ellipse on top with sides falling to ``bottom``."""
    centre_y = top + rx * 0.95
    pts = [(cx + rx * math.cos(t), centre_y + rx * 0.95 * math.sin(t)) for t in np.linspace(math.pi, 2 * math.pi, 20)]
    side = np.linspace(centre_y, bottom, 8)[1:]
    wave = (lambda y: 2.5 * math.sin(y / 6 + phase)) if wavy else (lambda y: 0.0)
    right = [(cx + rx + (bottom_rx - rx) * (y - centre_y) / max(1.0, bottom - centre_y) + wave(y), y) for y in side]
    # Mirror the right side, but keep the wave's sign so both sides sway the same way.
    left = [(2 * cx - x + 2 * wave(y), y) for x, y in reversed(right)]
    return pts + right + left


def _render(person: _Person, shot: _Shot, noise: np.ndarray, rng: np.random.Generator) -> Image.Image:
    canvas = _background(shot)
    h = canvas.height
    # RGBA drawing mode on an RGB canvas blends the translucent fills.
    d = ImageDraw.Draw(canvas, "RGBA")
    cx, cy, hw, hh = _CX + _MARGIN, _CY + _MARGIN, person.half_w, person.half_h
    fx = cx + shot.yaw  # facial features shift with head yaw; the outline does not
    skin, hair = person.skin, person.hair
    chin = cy + hh

    # Shoulders and neck first: everything else is drawn over them.
    sw = person.shoulder_w
    d.ellipse((cx - sw, chin + 16, cx + sw, chin + 110), fill=person.clothes + (255,))
    if shot.necktie:
        d.polygon(
            [(cx - 4, chin + 18), (cx + 4, chin + 18), (cx + 6, h), (cx - 6, h)], fill=_shade(person.clothes, 0.35)
        )
    long_hair = person.hair_style in ("medium", "long")
    if long_hair and not shot.hat:
        bottom = chin - 0.25 * hh if person.hair_style == "medium" else chin + 42
        spread = hw + person.hair_volume + (2 if person.hair_style == "medium" else 8)
        d.polygon(
            _hair_shape(
                cx,
                cy - hh - person.hair_volume,
                hw + person.hair_volume,
                bottom,
                spread,
                person.wavy,
                float(rng.uniform(0, 6)),
            ),
            fill=hair + (255,),
        )
    nw = person.neck_w
    d.rectangle((cx - nw, cy + 0.4 * hh, cx + nw, chin + 24), fill=_shade(skin, 0.85))
    if shot.necklace:
        d.arc((cx - nw - 4, chin - 6, cx + nw + 4, chin + 26), 20, 160, fill=(225, 205, 120, 255), width=2)

    ear_y = cy + 2
    for side in (-1, 1):
        ex = cx + side * (hw - 1)
        d.ellipse((ex - 6, ear_y - 11, ex + 6, ear_y + 11), fill=_shade(skin, 0.92))
        if shot.earrings:
            d.ellipse((ex - 2.5, ear_y + 11, ex + 2.5, ear_y + 16), fill=(235, 210, 120, 255))

    outline = _face_outline(cx, cy, hw, hh, person.jaw)
    d.polygon(outline, fill=_shade(skin, 0.93))
    # A smaller, lighter copy of the face gives cheap roundness shading.
    d.polygon(_face_outline(cx + shot.yaw * 0.4, cy - 3, hw * 0.84, hh * 0.86, person.jaw), fill=skin + (255,))

    if person.double_chin:
        d.arc((cx - hw * 0.45, chin - 10, cx + hw * 0.45, chin + 4), 20, 160, fill=_shade(skin, 0.78), width=2)
    _draw_beard(d, person, cx, fx, cy, hw, hh, rng)

    if shot.hat:
        d.chord(
            (cx - hw - 8, cy - hh - 22, cx + hw + 8, cy - hh + 2 * person.hairline * hh),
            180,
            360,
            fill=shot.hat_colour + (255,),
        )
        d.rectangle(
            (cx - hw - 14, cy - hh + person.hairline * hh - 3, cx + hw + 14, cy - hh + person.hairline * hh + 3),
            fill=_shade(shot.hat_colour, 0.8),
        )
    else:
        _draw_top_hair(d, person, cx, cy, hw, hh, rng)

    eye_y = cy - 6
    for side in (-1, 1):
        ex = fx + side * person.eye_dx
        ew, eh = person.eye_w, person.eye_h
        if shot.makeup:
            d.ellipse((ex - ew - 1, eye_y - eh - 5, ex + ew + 1, eye_y + 1), fill=(120, 80, 120, 110))
        if person.bags:
            d.arc((ex - ew, eye_y, ex + ew, eye_y + eh + 5), 20, 160, fill=_shade(skin, 0.75), width=1)
        d.ellipse((ex - ew, eye_y - eh, ex + ew, eye_y + eh), fill=(240, 238, 232, 255))
        ir = min(eh, 3.6)
        d.ellipse(
            (ex - ir + shot.yaw * 0.3, eye_y - ir, ex + ir + shot.yaw * 0.3, eye_y + ir), fill=person.iris + (255,)
        )
        d.ellipse(
            (ex - 1.3 + shot.yaw * 0.3, eye_y - 1.3, ex + 1.3 + shot.yaw * 0.3, eye_y + 1.3), fill=(12, 10, 10, 255)
        )
        d.arc(
            (ex - ew, eye_y - eh, ex + ew, eye_y + eh), 180, 360, fill=(30, 22, 20, 255), width=2 if shot.makeup else 1
        )

        inner, outer = ex - side * (ew - 1), ex + side * (ew + 3)
        brow_y = eye_y - person.brow_gap
        brow = [
            (inner + (outer - inner) * u, brow_y - person.brow_arch * 4 * math.sin(math.pi * min(1.0, u * 1.3)))
            for u in np.linspace(0, 1, 6)
        ]
        d.line(brow, fill=_shade(hair, 0.75), width=max(1, int(round(person.brow_thick))), joint="curve")

    if shot.glasses:
        frame = (30, 30, 35, 255)
        for side in (-1, 1):
            ex = fx + side * person.eye_dx
            d.rounded_rectangle((ex - 11, eye_y - 8, ex + 11, eye_y + 8), radius=5, outline=frame, width=2)
        d.line((fx - person.eye_dx + 11, eye_y - 2, fx + person.eye_dx - 11, eye_y - 2), fill=frame, width=2)

    nose_tip = cy + 0.32 * hh
    nose_top = nose_tip - person.nose_len
    d.line((fx + 1, nose_top, fx + 2 + shot.yaw * 0.4, nose_tip - 2), fill=_shade(skin, 0.82), width=2)
    nwid = person.nose_w
    d.arc((fx - nwid, nose_tip - 5, fx + nwid, nose_tip + 3), 20, 160, fill=_shade(skin, 0.7), width=2)
    for side in (-1, 1):
        d.ellipse(
            (fx + side * nwid * 0.55 - 1.6, nose_tip - 1.2, fx + side * nwid * 0.55 + 1.6, nose_tip + 1.2),
            fill=_shade(skin, 0.5),
        )

    if person.rosy:
        for side in (-1, 1):
            x0 = cx + side * hw * 0.55
            d.ellipse((x0 - 8, cy + 6, x0 + 8, cy + 16), fill=(235, 110, 110, 55))
    _draw_mouth(d, person, shot, fx, cy + 0.6 * hh)

    # One affine warp crops the margin and applies the per-image scale, rotation
    # and shift around the face centre; bilinear sampling also softens PIL's
    # aliased shape edges.
    a = math.radians(shot.angle)
    cos_a, sin_a = math.cos(a) / shot.scale, math.sin(a) / shot.scale
    ox, oy = _CX + shot.dx, _CY + shot.dy
    img = canvas.transform(
        (_CANVAS_W, _CANVAS_H),
        Image.Transform.AFFINE,
        (cos_a, sin_a, cx - cos_a * ox - sin_a * oy, -sin_a, cos_a, cy + sin_a * ox - cos_a * oy),
        resample=Image.Resampling.BILINEAR,
    )
    return _finish(img, shot, noise, rng)


def _draw_beard(
    d: ImageDraw.ImageDraw,
    person: _Person,
    cx: float,
    fx: float,
    cy: float,
    hw: float,
    hh: float,
    rng: np.random.Generator,
) -> None:
    if person.beard == "none":
        return
    # Facial hair reads darker than the skin under it even for light hair,
    # as it does in photos (shadowed, denser than scalp hair).
    colour = _rgb(np.minimum(np.array(person.hair) * 0.75, np.array(person.skin) * 0.6)) + (255,)
    mouth_y = cy + 0.6 * hh
    if person.beard in ("stubble", "full"):
        lower = [(x, y) for x, y in _face_outline(cx, cy, hw * 0.98, hh, person.jaw) if y > cy + 0.12 * hh]
        lower.sort(key=lambda p: -p[0])  # right cheek -> chin -> left cheek
        upper = [(fx - hw * 0.45, cy + 0.36 * hh), (fx, cy + 0.42 * hh), (fx + hw * 0.45, cy + 0.36 * hh)]
        alpha = 235 if person.beard == "full" else 90
        d.polygon(lower + upper, fill=colour[:3] + (alpha,))
        if person.beard == "stubble":
            for _ in range(60):
                x = fx + rng.uniform(-hw * 0.75, hw * 0.75)
                y = rng.uniform(cy + 0.35 * hh, cy + 0.95 * hh)
                d.point((x, y), fill=_shade(person.hair, 0.5, 140))
    if person.beard in ("moustache", "goatee", "full"):
        d.polygon(
            [
                (fx - 11, mouth_y - 3),
                (fx - 6, mouth_y - 9),
                (fx + 6, mouth_y - 9),
                (fx + 11, mouth_y - 3),
                (fx, mouth_y - 5),
            ],
            fill=colour,
        )
    if person.beard == "goatee":
        d.ellipse((fx - 8, mouth_y + 2, fx + 8, cy + hh - 1), fill=colour)


def _draw_top_hair(
    d: ImageDraw.ImageDraw, person: _Person, cx: float, cy: float, hw: float, hh: float, rng: np.random.Generator
) -> None:
    style, hair = person.hair_style, person.hair
    if style == "bald":
        # Just a fringe of hair above the ears.
        for side in (-1, 1):
            x = cx + side * (hw - 2)
            d.ellipse((x - 5, cy - 22, x + 5, cy + 2), fill=hair + (200,))
        return
    depth = person.hairline * hh
    vol = {"buzz": 1.0, "short": 3.0 + person.hair_volume * 0.4}.get(style, person.hair_volume)
    alpha = 150 if style == "buzz" else 255
    d.chord(
        (cx - hw - vol * 0.6, cy - hh - vol, cx + hw + vol * 0.6, cy - hh + 2 * depth), 180, 360, fill=hair + (alpha,)
    )
    if style in ("short", "buzz"):
        # Short sides down to the ears (sideburns).
        for side in (-1, 1):
            x = cx + side * (hw - 2.5)
            d.rectangle((x - 3, cy - hh + depth - 4, x + 3, cy - 2), fill=hair + (alpha,))
    else:
        # Locks falling in front of the face edge frame the face down to the jaw.
        bottom = cy + (0.55 if style == "medium" else 0.9) * hh
        for side in (-1, 1):
            x_out, x_in = cx + side * (hw + 3), cx + side * (hw - 7)
            d.polygon(
                [
                    (x_out, cy - hh + depth - 6),
                    (x_in, cy - hh + depth),
                    (x_in + side * 3, bottom),
                    (x_out + side * 2, bottom + 6),
                ],
                fill=hair + (255,),
            )
    if person.bangs:
        fringe_y = cy - hh + depth + rng.uniform(8, 14)
        xs = np.linspace(cx - hw * 0.85, cx + hw * 0.85, 9)
        teeth = [(x, fringe_y + (3 if i % 2 else -1)) for i, x in enumerate(xs)]
        d.polygon(
            [(cx - hw * 0.85, cy - hh + depth - 4)] + teeth + [(cx + hw * 0.85, cy - hh + depth - 4)],
            fill=hair + (255,),
        )


def _draw_mouth(d: ImageDraw.ImageDraw, person: _Person, shot: _Shot, mx: float, my: float) -> None:
    half = person.mouth_w / 2 + 1.5 * max(0.0, shot.smile)
    lift = 4.0 * shot.smile
    gap = 3.0 + 2.0 * max(0.0, shot.smile) if shot.mouth_open else 0.0
    us = np.linspace(-1, 1, 11)
    corner = [-lift * u * u for u in us]
    upper = [(mx + half * u, my + c - person.lip_thick * 0.8 * (1 - u * u)) for u, c in zip(us, corner)]
    mid_top = [(mx + half * u, my + c) for u, c in zip(us, corner)]
    mid_bot = [(mx + half * u, my + c + gap * (1 - u * u)) for u, c in zip(us, corner)]
    lower = [(mx + half * u, my + c + gap * (1 - u * u) + person.lip_thick * (1 - u * u)) for u, c in zip(us, corner)]
    lip = shot.lip_colour + (255,)
    if shot.mouth_open:
        d.polygon(mid_top + mid_bot[::-1], fill=(50, 20, 25, 255))
        if shot.smile > 0.5:
            d.polygon(mid_top + [(x, y + gap * 0.45) for x, y in mid_top[::-1]], fill=(235, 232, 220, 255))
    d.polygon(upper + mid_top[::-1], fill=lip)
    d.polygon(mid_bot + lower[::-1], fill=lip)
    d.line(mid_top, fill=_shade(shot.lip_colour, 0.55), width=1)


def _background(shot: _Shot) -> Image.Image:
    """Two-colour gradient covering the canvas plus a margin for the final warp."""
    h, w = _CANVAS_H + 2 * _MARGIN, _CANVAS_W + 2 * _MARGIN
    ramp = np.linspace(0.0, 1.0, h if shot.bg_vertical else w, dtype=np.float32)
    ramp = ramp[:, None, None] if shot.bg_vertical else ramp[None, :, None]
    a, b = np.array(shot.bg_a, np.float32), np.array(shot.bg_b, np.float32)
    bg = np.broadcast_to(a + (b - a) * ramp, (h, w, 3))
    return Image.fromarray(bg.astype(np.uint8), "RGB")


def _finish(img: Image.Image, shot: _Shot, noise: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Apply lighting, colour cast, sensor noise and optional blur to the whole frame."""
    arr = np.asarray(img, dtype=np.float32)
    xs = np.arange(_CANVAS_W, dtype=np.float32) - _CX
    ys = np.arange(_CANVAS_H, dtype=np.float32) - _CY
    ramp = (xs[None, :] * math.cos(shot.light_dir) + ys[:, None] * math.sin(shot.light_dir)) / 110.0
    gain = shot.brightness * (1.0 + shot.light_strength * ramp)
    arr = arr * gain[:, :, None] * np.array(shot.tint, np.float32)
    # Drawing fresh Gaussian noise per image costs more than the whole face, so
    # each image takes a random window of one shared, seeded noise field.
    oy = int(rng.integers(0, noise.shape[0] - _CANVAS_H + 1))
    ox = int(rng.integers(0, noise.shape[1] - _CANVAS_W + 1))
    arr += noise[oy : oy + _CANVAS_H, ox : ox + _CANVAS_W] * shot.noise
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if shot.blurry:
        out = out.filter(ImageFilter.GaussianBlur(2.2))
    return out


def _encode(img: Image.Image, shot: _Shot, image_size: tuple[int, int]) -> bytes:
    if img.size != tuple(image_size):
        img = img.resize(tuple(image_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=shot.quality)
    return buf.getvalue()


def _attributes(person: _Person, shot: _Shot) -> list[int]:
    """The 40 CelebA attributes as -1/1, derived from what was actually drawn."""
    bearded = person.beard in ("stubble", "goatee", "full")
    on = {
        "5_o_Clock_Shadow": person.beard == "stubble",
        "Arched_Eyebrows": person.brow_arch > 0.6,
        "Attractive": person.attractive,
        "Bags_Under_Eyes": person.bags,
        "Bald": person.hair_style == "bald",
        "Bangs": person.bangs and not shot.hat,
        "Big_Lips": person.lip_thick > 3.6,
        "Big_Nose": person.nose_len > 19.5,
        "Black_Hair": person.hair_name == "black",
        "Blond_Hair": person.hair_name == "blond",
        "Blurry": shot.blurry,
        "Brown_Hair": person.hair_name in ("brown", "red"),
        "Bushy_Eyebrows": person.brow_thick > 4.0,
        "Chubby": person.half_w > 42,
        "Double_Chin": person.double_chin,
        "Eyeglasses": shot.glasses,
        "Goatee": person.beard == "goatee",
        "Gray_Hair": person.hair_name == "gray",
        "Heavy_Makeup": shot.makeup and shot.lipstick,
        "High_Cheekbones": shot.smile > 0.5 and person.jaw < 0.7,
        "Male": person.male,
        "Mouth_Slightly_Open": shot.mouth_open,
        "Mustache": person.beard in ("moustache", "goatee", "full"),
        "Narrow_Eyes": person.eye_h < 2.9,
        "No_Beard": not bearded,
        "Oval_Face": person.jaw < 0.6 and person.half_h / person.half_w > 1.4,
        "Pale_Skin": person.skin_tone > 0.9,
        "Pointy_Nose": person.nose_w < 4.8,
        "Receding_Hairline": person.hairline < 0.3 and person.hair_style != "bald",
        "Rosy_Cheeks": person.rosy,
        "Sideburns": person.beard == "full",
        "Smiling": shot.smile > 0.5,
        "Straight_Hair": not person.wavy and person.hair_style in ("medium", "long"),
        "Wavy_Hair": person.wavy and person.hair_style in ("medium", "long"),
        "Wearing_Earrings": shot.earrings,
        "Wearing_Hat": shot.hat,
        "Wearing_Lipstick": shot.lipstick,
        "Wearing_Necklace": shot.necklace,
        "Wearing_Necktie": shot.necktie,
        "Young": person.young,
    }
    return [1 if on[name] else -1 for name in ATTRIBUTE_NAMES]


def _readme(n: int, seed: int, n_people: int, n_duplicates: int, n_corrupt: int) -> str:
    return (
        "SYNTHETIC DATA - NOT CelebA, NOT REAL PEOPLE\n"
        "============================================\n\n"
        "Every image in this folder was procedurally drawn by gendertune's\n"
        "data_prep/synthetic.py (PIL shapes plus numpy noise). No photograph,\n"
        "no real person and no CelebA image was used. Only the file layout and\n"
        "label-file formats copy CelebA, so the pipeline can be exercised offline.\n\n"
        f"generator seed: {seed}\n"
        f"image files:    {n} (including {n_duplicates} planted byte-identical duplicates\n"
        f"                and {n_corrupt} planted truncated/corrupt JPEGs)\n"
        f"identities:     {n_people}\n\n"
        "The 'Male' label is signalled by several weak, overlapping drawn cues;\n"
        "the other 39 attributes describe what was drawn and exist for format\n"
        "fidelity. Results on this data say nothing about real faces.\n"
    )
