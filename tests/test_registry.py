"""Tests for gendertune.models.registry: the model names and their specs, building each model and a
forward/backward pass at its smallest input size, and the name and image-size checks. CPU only."""

from __future__ import annotations

import pytest
import torch
from conftest import MEAN, STD
from torch import nn

from gendertune.models import (
    build_model,
    check_image_size,
    classification_loss,
    count_parameters,
    get_spec,
    list_models,
    split_outputs,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_registry_names_and_specs():
    assert set(list_models()) == {
        "resnet50",
        "resnet18",
        "googlenet",
        "vgg19",
        "vgg19_bn",
        "efficientnet_b0",
        "convnext_tiny",
        "vit_b_16",
    }
    for name in list_models():
        spec = get_spec(name)
        assert spec.input_size == 224 and spec.mean == MEAN and spec.std == STD
        assert bool(spec.note) == (name == "vgg19_bn")  # the leaderboard says why VGG19 is its BN variant
        assert spec.aux_loss_weight == (0.3 if name == "googlenet" else 0.0)
        assert spec.fixed_input_size == (name in ("vit_b_16", "vgg19", "vgg19_bn"))


def test_vgg_below_224_px_reads_its_last_map_without_copying_it():
    """At 32 px VGG's last map is 1x1; torchvision's pool would copy it 49x into a 102M-parameter layer."""
    small, full = build_model("vgg19_bn", image_size=32), build_model("vgg19_bn", image_size=224)
    assert small.classifier[0].in_features == 512 and full.classifier[0].in_features == 512 * 7 * 7
    assert count_parameters(full) - count_parameters(small) == 4096 * 512 * 48
    assert float(small.classifier[0].weight.detach().std()) == pytest.approx(0.01, rel=0.05)  # torchvision's VGG init


def test_vgg_classifier_runs_in_fp32_under_autocast_with_torchvisions_parameter_names():
    """Under bf16 autocast vgg19_bn's classifier did not learn (docs/results.md); its three layers run in fp32."""
    import torchvision

    model = build_model("vgg19_bn", image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.features(x)
        logits = model(x)
    assert features.dtype == torch.bfloat16  # the convolutions still run in bf16
    assert logits.dtype == torch.float32
    with torch.no_grad():
        assert model(x).dtype == torch.float32
    reference = torchvision.models.vgg19_bn(num_classes=2).state_dict()
    assert list(model.state_dict()) == list(reference)


@pytest.mark.integration  # trains or runs a real network for seconds
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_at_min_size(name, request):
    spec = get_spec(name)
    torch.manual_seed(0)
    if name == "vit_b_16":
        model = request.getfixturevalue("vit_min_size").train()
    else:
        model = build_model(name, num_classes=2, image_size=spec.min_input_size).train()
    x = torch.randn(2, 3, spec.min_input_size, spec.min_input_size)
    targets = torch.tensor([0, 1])
    output = model(x)
    logits, aux = split_outputs(output)
    assert logits.shape == (2, 2)
    assert all(a.shape == (2, 2) for a in aux)
    assert len(aux) == (2 if name == "googlenet" else 0)

    criterion = nn.CrossEntropyLoss()
    loss = classification_loss(output, targets, criterion, spec.aux_loss_weight)
    if name == "googlenet":
        # The auxiliary heads contribute to the loss (and so get gradients).
        assert not torch.allclose(loss, criterion(logits, targets))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradients: {no_grad[:5]}"

    if name == "googlenet":
        # torchvision drops the auxiliary heads in eval mode.
        with torch.no_grad():
            logits, aux = split_outputs(model.eval()(x))
        assert logits.shape == (2, 2) and aux == []


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet50.*vit_b_16"):
        get_spec("resnet9")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9", image_size=64)


def test_image_size_checks():
    with pytest.raises(ValueError, match=r"^image size 16 is too small for vgg19 \(needs >= 32\)$"):
        check_image_size("vgg19", 16)
    with pytest.raises(ValueError, match="too small for resnet18"):
        build_model("resnet18", image_size=8)
    with pytest.raises(ValueError, match="image size 40 .* multiple of 16"):
        check_image_size("vit_b_16", 40)
    check_image_size("vit_b_16", 48)
    check_image_size("googlenet", 33)


def test_count_parameters():
    model = nn.Linear(3, 2)
    assert count_parameters(model) == 8


def test_resnets_start_with_each_residual_block_as_the_identity():
    """zero_init_residual: every block's last BN scale is 0, so a deep ResNet trains from scratch."""
    for name, last_bn in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = build_model(name, image_size=32)
        blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
        assert all(float(getattr(block, last_bn).weight.detach().abs().sum()) == 0 for block in blocks), name
