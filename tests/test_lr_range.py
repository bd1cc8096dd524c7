"""gendertune.tuning.search.lr_range: the lr range test on a real (tiny) network, and its suggestion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gendertune.tuning.search.lr_range import DIVERGED, lr_range_test, suggest_lr


def test_the_suggestion_is_a_tenth_of_the_lr_at_the_lowest_loss():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert suggest_lr(lrs, [0.7, 0.6, 0.3, 0.5, 2.0]) == pytest.approx(1e-4)
    assert suggest_lr(lrs, [0.90, 0.69, 0.67, 0.9, 2.0]) is None  # never clearly below guessing's ln 2
    assert suggest_lr([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], [0.3, 0.7, 0.7, 0.7, 0.7, 0.7, 0.9, 2.0]) is None
    with pytest.raises(ValueError):
        suggest_lr([], [])


def _separable_batches(n_batches: int = 8, size: int = 32, noise: float = 0.15):
    """uint8 images whose label is which half of the image is bright, with `noise` of the labels
    flipped: learnable in a few steps, and never to zero loss, so too large an lr diverges."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (size,), generator=generator)
        images = torch.randint(0, 60, (size, 8, 8, 3), dtype=torch.uint8, generator=generator)
        for i, label in enumerate(labels.tolist()):
            images[i, :, 4 * label : 4 * label + 4] += 150
        flipped = torch.rand(size, generator=generator) < noise
        batches.append((images, torch.where(flipped, 1 - labels, labels)))
    return batches


def test_a_range_test_on_a_learnable_problem_stops_at_divergence_and_suggests_a_workable_lr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 16), nn.ReLU(), nn.Linear(16, 2))
    curve = lr_range_test(
        model,
        _separable_batches(),
        optimizer=torch.optim.SGD(model.parameters(), momentum=0.9),
        augment=lambda x: x.permute(0, 3, 1, 2).float() / 255,
        criterion=nn.CrossEntropyLoss(),
        aux_weight=0.0,
        device=torch.device("cpu"),
        steps=120,
        lr_max=100.0,
    )
    assert len(curve.lrs) == len(curve.losses) < 120  # SGD with momentum diverges long before lr 100
    assert curve.losses[-1] > DIVERGED * min(curve.losses) or not math.isfinite(curve.losses[-1])
    assert all(b > a for a, b in zip(curve.lrs, curve.lrs[1:]))
    assert 1e-3 <= curve.suggestion <= 1.0

    # And that lr trains the model: a fresh one reaches clearly better than chance in one pass.
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(fresh.parameters(), lr=curve.suggestion, momentum=0.9)
    batches = _separable_batches(40)
    for images, labels in batches:
        loss = nn.functional.cross_entropy(fresh(images.permute(0, 3, 1, 2).float() / 255), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = _separable_batches(1, 256, noise=0.0)[0]
    accuracy = (fresh(images.permute(0, 3, 1, 2).float() / 255).argmax(1) == labels).float().mean()
    assert accuracy > 0.8
