"""Tests for gendertune.models.transforms: evaluation preprocessing (shape, normalisation, determinism), the
seeded per-sample training augmentations and their argument checks, and the framing shift. CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MEAN, STD
from PIL import Image
from torch import nn

from gendertune.models import EvalPreprocess, FramingShift, TrainAugment
from gendertune.models.transforms import MAX_BORDER, Mixup

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)


def test_eval_preprocess_shape_normalisation_and_determinism():
    batch = torch.full((4, 64, 64, 3), 128, dtype=torch.uint8)
    out = EvalPreprocess(image_size=32, mean=MEAN, std=STD)(batch)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor((128 / 255 - MEAN[c]) / STD[c]), atol=1e-5)

    preprocess = EvalPreprocess(image_size=48, mean=MEAN, std=STD)
    faces = _faces(8, 64)
    assert torch.equal(preprocess(faces), preprocess(faces))

    # One PIL image (predict's path) gives the same as the batch path.
    one = faces[3].numpy()
    assert torch.equal(preprocess.image(Image.fromarray(one)), preprocess(faces[3:4]))
    assert torch.equal(preprocess.image(one), preprocess(faces[3:4]))
    with pytest.raises(ValueError, match="square"):
        preprocess.image(np.zeros((40, 30, 3), dtype=np.uint8))


def test_train_augment_output_matches_eval_when_off():
    faces = _faces(8, 64)
    off = TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=0.0)
    out = off(faces)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, EvalPreprocess(image_size=32, mean=MEAN, std=STD)(faces))


def test_train_augment_is_per_sample_and_seeded():
    one = _faces(1, 64)
    batch = one.expand(16, -1, -1, -1).contiguous()
    augment = TrainAugment(
        image_size=48,
        mean=MEAN,
        std=STD,
        hflip=0.5,
        rotation=10.0,
        color_jitter=0.4,
        random_erasing=0.5,
        random_resized_crop=0.4,
    )
    out = augment(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 48, 48) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Identical inputs, different random parameters per sample: all outputs differ pairwise.
    flat = out.flatten(1)
    distinct = {tuple(row[:64].tolist()) for row in flat}
    assert len(distinct) == 16
    # Inputs in [0, 255] stay within the normalised range of [0, 1].
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (out >= low.view(1, 3, 1, 1) - 1e-5).all()
    assert (out <= high.view(1, 3, 1, 1) + 1e-5).all()

    again = augment(batch, generator=torch.Generator().manual_seed(0))
    other = augment(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_train_augment_flips_some_samples_only():
    faces = _faces(64, 32)
    out = TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=0.5)(faces, generator=torch.Generator().manual_seed(0))
    plain = EvalPreprocess(image_size=32, mean=MEAN, std=STD)(faces)
    same = (out == plain).flatten(1).all(1)
    flipped = (out == plain.flip(-1)).flatten(1).all(1)
    assert (same ^ flipped).all()
    assert 10 < int(flipped.sum()) < 54


def test_random_erasing_erases_one_rectangle_per_chosen_sample():
    faces = _faces(32, 32)
    out = TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=0.0, random_erasing=1.0)(faces)
    plain = EvalPreprocess(image_size=32, mean=MEAN, std=STD)(faces)
    erased = (out != plain).any(1)  # N x H x W
    assert erased.flatten(1).any(1).all()
    assert (out.masked_select(erased[:, None].expand_as(out)) == 0).all()


def test_zoom_goes_both_ways_and_pads_with_the_mean_colour():
    """A bright square filling the image: zooming out shows the fill (normalised 0) around it,
    zooming in keeps it filling the frame; both happen within one batch."""
    faces = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)
    out = TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=0.0, zoom=1.0)(
        faces, generator=torch.Generator().manual_seed(0)
    )
    bright = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    corner_is_fill = (out[:, :, 0, 0].abs() < 1e-5).all(1)
    corner_is_bright = torch.isclose(out[:, :, 0, 0], bright.view(1, 3), atol=1e-4).all(1)
    assert 10 < int(corner_is_fill.sum()) < 54 and (corner_is_fill | corner_is_bright).all()
    assert torch.isclose(out[:, :, 16, 16], bright.view(1, 3), atol=1e-4).all()  # the centre stays the face


def test_translate_moves_the_image_within_its_bound():
    faces = torch.zeros((32, 40, 40, 3), dtype=torch.uint8)
    faces[:, 18:22, 18:22] = 255  # a dot in the middle
    out = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, translate=0.25)(
        faces, generator=torch.Generator().manual_seed(0)
    )
    brightest = out[:, 0].flatten(1).argmax(1)
    rows, cols = brightest // 40, brightest % 40
    offsets = torch.stack([rows - 19.5, cols - 19.5]).abs()
    assert offsets.max() <= 0.25 * 40 + 1.5 and (offsets > 2).any(0).float().mean() > 0.5


def test_random_border_fills_outside_a_box_that_keeps_the_centre():
    faces = _faces(64, 40)
    out = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, random_border=1.0)(
        faces, generator=torch.Generator().manual_seed(0)
    )
    plain = EvalPreprocess(image_size=40, mean=MEAN, std=STD)(faces)
    changed = (out != plain).any(1)  # N x H x W
    assert (out.masked_select(changed[:, None].expand_as(out)) == 0).all()  # changed pixels are the fill
    keep = slice(round(40 * MAX_BORDER), round(40 * (1 - MAX_BORDER)))
    assert not changed[:, keep, keep].any()  # never inside the central box
    assert changed.flatten(1).any(1).float().mean() > 0.9
    half = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, random_border=0.5)(
        faces, generator=torch.Generator().manual_seed(0)
    )
    assert 16 < int((half != plain).flatten(1).any(1).sum()) < 48


def test_augment_arguments_are_validated():
    for name, value in (("zoom", 1.5), ("translate", 0.6), ("random_border", 2.0)):
        with pytest.raises(ValueError, match=name):
            TrainAugment(image_size=32, mean=MEAN, std=STD, **{name: value})
    with pytest.raises(ValueError, match="hflip"):
        TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=1.5)
    with pytest.raises(ValueError, match="random_resized_crop"):
        TrainAugment(image_size=32, mean=MEAN, std=STD, random_resized_crop=1.0)
    with pytest.raises(ValueError, match="uint8"):
        EvalPreprocess(image_size=32, mean=MEAN, std=STD)(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match="zoom"):
        FramingShift(zoom=0.3)


def test_framing_shift():
    faces = _faces(4, 64)
    assert torch.equal(FramingShift(zoom=1.0)(faces), faces)
    for zoom in (0.5, 0.8, 1.25, 2.0):
        for mode in ("reflect", "edge"):
            out = FramingShift(zoom=zoom, padding_mode=mode)(faces)
            assert out.shape == faces.shape and out.dtype == torch.uint8
            assert torch.equal(out, FramingShift(zoom=zoom, padding_mode=mode)(faces))
    # Zooming in by 2 shows the centre half of the image scaled up.
    zoomed = FramingShift(zoom=2.0)(faces).permute(0, 3, 1, 2).float()
    centre = torch.nn.functional.interpolate(
        faces[:, 16:48, 16:48].permute(0, 3, 1, 2).float(), size=64, mode="bilinear"
    )
    assert (zoomed - centre).abs().max() <= 1.0


def test_mixup_blends_images_and_one_hot_labels_by_one_seeded_weight():
    images = torch.rand(8, 3, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    mixed, targets = Mixup(0.4)(images, labels, generator=torch.Generator().manual_seed(3))
    again, same = Mixup(0.4)(images, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again) and torch.equal(targets, same)  # a seeded run repeats
    assert targets.shape == (8, 2) and torch.allclose(targets.sum(1), torch.ones(8, dtype=torch.float64))
    weights = set()
    for i in range(8):
        if torch.allclose(mixed[i], images[i]):  # blended with itself
            assert torch.equal(targets[i], nn.functional.one_hot(labels[i], 2).double())
            continue
        # Its partner k: mixed = lam * image_i + (1 - lam) * image_k for one lam, exactly.
        fits = []
        for k in range(8):
            if k != i:
                d = (images[i] - images[k]).flatten()
                lam = float(((mixed[i] - images[k]).flatten() @ d) / (d @ d))
                residual = float((mixed[i] - lam * images[i] - (1 - lam) * images[k]).abs().max())
                fits.append((residual, k, lam))
        residual, k, lam = min(fits)
        assert residual < 1e-9
        weights.add(round(lam, 9))
        expected = lam * nn.functional.one_hot(labels[i], 2) + (1 - lam) * nn.functional.one_hot(labels[k], 2)
        assert torch.allclose(targets[i], expected.double())
    assert len(weights) == 1 and 0 < weights.pop() < 1  # one weight for the whole batch
