"""The Ray-free training step: precision choice and the fp16 + GradScaler path.

fp16 autocast is a GPU feature in this project (select_precision refuses it on CPU), but the step
logic around GradScaler (scale, unscale before clipping, skip on overflow, update) is
device-independent: torch runs the same GradScaler on CPU, so it is checked here on a real model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gendertune.models.transforms import Mixup
from gendertune.tuning.train.engine import (
    NonFiniteLoss,
    Precision,
    bf16_supported,
    cpu_flags,
    select_precision,
    train_one_epoch,
)

FP16 = Precision("fp16", torch.float16)
FP32 = Precision("fp32", None)


def _separable_batches(n_batches: int, *, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images whose label is whether the left half is brighter than the right."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (16,), generator=generator)
        images = torch.randint(0, 120, (16, 32, 32, 3), generator=generator, dtype=torch.uint8)
        bright = images[:, :, :16] + 100
        images[:, :, :16] = torch.where(labels[:, None, None, None].bool(), bright, images[:, :, :16])
        batches.append((images, labels))
    return batches


def _small_cnn() -> nn.Module:
    # Small on purpose: fp16 autocast on a CPU is emulated and slow; the step logic is the same.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)


def _fit(precision, scaler, *, grad_clip=1.0, epochs=3):
    torch.manual_seed(0)
    model = _small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = _separable_batches(6, seed=0)
    losses = []
    for _ in range(epochs):
        stats = train_one_epoch(
            model,
            batches,
            optimizer=optimizer,
            scheduler=scheduler,
            augment=_to_float,
            criterion=nn.CrossEntropyLoss(),
            aux_weight=0.0,
            precision=precision,
            scaler=scaler,
            grad_clip=grad_clip,
            device=torch.device("cpu"),
        )
        losses.append(stats.loss_sum / stats.count)
    return model, losses


@pytest.mark.integration  # trains or runs a real network for seconds
def test_fp16_with_grad_scaler_learns_and_keeps_weights_finite():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    model, losses = _fit(FP16, scaler, epochs=4)
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: master weights stay fp32
    assert scaler.get_scale() > 2.0**10  # no overflow seen: the scale grew every growth_interval steps


# The skipped optimizer step is the point; torch warns that the scheduler stepped without one.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_grad_scaler_skips_the_step_on_overflow():
    """An overflowing fp16 loss scale makes GradScaler skip the update and halve the scale."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # scaled fp16 gradients overflow
    model = _small_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(
        model,
        _separable_batches(1, seed=1),
        optimizer=optimizer,
        scheduler=scheduler,
        augment=_to_float,
        criterion=nn.CrossEntropyLoss(),
        aux_weight=0.0,
        precision=Precision("fp16", torch.float16),
        scaler=scaler,
        grad_clip=0.0,
        device=torch.device("cpu"),
    )
    assert scaler.get_scale() == 2.0**59  # overflow seen: scale halved...
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # ...and the step skipped


def test_precision_selection():
    cpu = torch.device("cpu")
    assert select_precision("fp32", cpu).autocast_dtype is None
    assert select_precision("auto", cpu).name == ("bf16" if bf16_supported(cpu) else "fp32")
    # AVX-512 without its BF16 extension emulates bf16 (slower): auto stays fp32 there and says why.
    emulating = cpu_flags("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq\n")
    chosen = select_precision("auto", cpu, emulating)
    assert chosen.name == "fp32" and "emulated" in chosen.reason
    with pytest.raises(ValueError, match="not supported natively"):
        select_precision("bf16", cpu, emulating)
    for native in ("avx512_bf16", "amx_bf16"):
        chosen = select_precision("auto", cpu, emulating | {native})
        assert chosen.name == "bf16" and "native" in chosen.reason
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        select_precision("fp16", cpu)
    assert FP16.needs_scaler and not select_precision("fp32", cpu).needs_scaler


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights():
    torch.manual_seed(0)
    model = _small_cnn()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))  # as a NaN weight decay or an exploding lr leaves it
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(NonFiniteLoss, match="the training loss became nan at step 1"):
        train_one_epoch(
            model,
            _separable_batches(2, seed=0),
            optimizer=optimizer,
            scheduler=scheduler,
            augment=_to_float,
            criterion=nn.CrossEntropyLoss(),
            aux_weight=0.0,
            precision=Precision("fp32", None),
            scaler=None,
            grad_clip=0.0,
            device=torch.device("cpu"),
        )
    assert all(
        torch.equal(value, before[name]) or name.endswith(("running_mean", "running_var", "num_batches_tracked"))
        for name, value in model.state_dict().items()
        if name != "7.bias"
    )


@pytest.mark.integration  # trains a real network for seconds
def test_mixup_trains_on_blended_probability_targets_and_still_learns():
    seen = []

    def criterion(logits, targets):
        seen.append(targets)
        return nn.functional.cross_entropy(logits, targets)

    torch.manual_seed(0)
    model = _small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    mixup, generator = Mixup(0.4), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        stats = train_one_epoch(
            model,
            _separable_batches(6, seed=0),
            optimizer=optimizer,
            scheduler=scheduler,
            augment=_to_float,
            criterion=criterion,
            aux_weight=0.0,
            precision=FP32,
            scaler=None,
            grad_clip=0.0,
            device=torch.device("cpu"),
            mix=lambda images, labels: mixup(images, labels, generator=generator),
        )
        losses.append(stats.loss)
    assert all(t.shape == (16, 2) and t.is_floating_point() for t in seen)
    assert any(((t > 0) & (t < 1)).any() for t in seen)  # blended, not one-hot
    assert stats.count == 16 * 6 and losses[-1] < losses[0]
