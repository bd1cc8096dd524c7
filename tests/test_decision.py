"""Flip test-time augmentation and the validation-chosen threshold (gendertune.tuning.evaluate.decision),
on a real (untrained) network and through predict's RunModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gendertune.models.registry import build_model, get_spec
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.decision import FIXED_THRESHOLD, FlipAveraged, fit_threshold
from gendertune.tuning.evaluate.predict import RunModel

SIZE = 32


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", image_size=SIZE).eval()


def test_flip_averaging_gives_a_mirrored_image_the_same_logits(network):
    images = torch.rand(4, 3, SIZE, SIZE)
    mirrored = torch.flip(images, dims=[3])
    with torch.no_grad():
        assert not torch.allclose(network(images), network(mirrored), atol=1e-4)  # the network alone is not symmetric
        averaged = FlipAveraged(network)
        assert torch.allclose(averaged(images), averaged(mirrored), atol=1e-5)
        assert torch.allclose(averaged(images), (network(images) + network(mirrored)) / 2, atol=1e-5)


def _run_folder(folder, network, **decision) -> str:
    """A run folder predict accepts: the network, trained on centre squares (no face alignment)."""
    spec = get_spec("resnet18")
    torch.save({"format_version": run_layout.MODEL_FORMAT_VERSION, "model": network.state_dict(), "model_name": "resnet18",
                "image_size": SIZE, "prep_image_size": SIZE, "mean": list(spec.mean), "std": list(spec.std),
                "class_names": ["Female", "Male"], "alignment": None, "temperature": 1.0, **decision},
               folder / run_layout.MODEL)
    return str(folder)


def test_predict_with_flip_tta_gives_a_photo_and_its_mirror_image_the_same_probability(network, tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    ImageOps.mirror(photo).save(tmp_path / "mirror.png")
    paths = [str(tmp_path / "photo.png"), str(tmp_path / "mirror.png")]
    (tmp_path / "plain").mkdir()
    (tmp_path / "flip").mkdir()
    plain = RunModel(_run_folder(tmp_path / "plain", network)).predict_paths(paths)["prob_male"].to_numpy()
    flipped = RunModel(_run_folder(tmp_path / "flip", network, tta="flip")).predict_paths(paths)["prob_male"].to_numpy()
    assert abs(plain[0] - plain[1]) > 1e-4 and abs(flipped[0] - flipped[1]) < 1e-6
    assert min(plain) - 1e-6 <= flipped[0] <= max(plain) + 1e-6  # the mean of the two margins lies between them


def test_predict_decides_at_the_stored_threshold(network, tmp_path):
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    prob = RunModel(_run_folder(tmp_path, network)).predict_paths([str(tmp_path / "photo.png")])["prob_male"].iloc[0]
    for threshold, label in [(float(prob) - 1e-3, "Male"), (float(prob) + 1e-3, "Female")]:
        row = RunModel(_run_folder(tmp_path, network, threshold=threshold)).predict_paths([str(tmp_path / "photo.png")]).iloc[0]
        assert row["label"] == label and row["confidence"] == pytest.approx(prob if label == "Male" else 1 - prob)


def test_fixed_threshold_is_one_half():
    assert fit_threshold([0, 1, 1], [0.9, 0.1, 0.2], "fixed") == FIXED_THRESHOLD == 0.5


def test_balanced_threshold_maximises_the_mean_recall_on_validation():
    # Class 1 is rare and scored low: at 0.5 its recall is 0; between 0.3 and 0.35 both classes are all right.
    labels = np.array([0] * 8 + [1] * 2)
    probs = np.array([0.05, 0.1, 0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35, 0.45])
    threshold = fit_threshold(labels, probs, "balanced")
    assert threshold == pytest.approx(0.325)
    predicted = probs >= threshold
    assert (predicted == labels.astype(bool)).all()
    # Equally good thresholds: the one nearest 0.5. Here any cut between 0.3 and 0.9 separates the classes.
    assert fit_threshold([0, 0, 1, 1], [0.1, 0.3, 0.9, 0.95], "balanced") == pytest.approx(0.6)
    assert fit_threshold([1, 1], [0.2, 0.3], "balanced") == FIXED_THRESHOLD  # one class: nothing to balance


def test_balanced_threshold_agrees_with_a_brute_force_search():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.round(np.clip(0.25 * labels + rng.uniform(0, 0.75, 400), 0, 1), 2)  # ties, as real scores have

    def balanced(t):
        predicted = probs >= t
        return ((predicted & (labels == 1)).sum() / (labels == 1).sum()
                + (~predicted & (labels == 0)).sum() / (labels == 0).sum()) / 2

    grid = np.linspace(0, 1.01, 10_101)
    assert balanced(fit_threshold(labels, probs, "balanced")) == pytest.approx(max(balanced(t) for t in grid))
