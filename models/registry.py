"""The model registry: which torchvision architectures gendertune compares, and how each is built.

This module owns the per-architecture facts (`ModelSpec`), building a model with a fresh
`num_classes` head (optionally starting from ImageNet or project weights, see `gendertune.models.weights`),
image-size validation, and the loss that folds in GoogLeNet's auxiliary heads.

Nothing here downloads: torchvision builders are always called with `weights=None` and weights
are read from local files by `gendertune.models.weights`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from gendertune.base.errors import UserInputError
from gendertune.models import weights as weights_io


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of gendertune needs to know about one architecture."""

    name: str
    # The side its ImageNet weights were trained at.
    input_size: int
    # Smallest image side accepted. Measured on CPU (train-mode forward+backward, batch 2, and
    # eval-mode forward): vgg19 and convnext_tiny fail below 32 (their last downsampling step
    # would produce an empty map), googlenet below 15; resnets and efficientnet_b0 run even at
    # 1 px. Every CNN here has a total stride of 32, so below 32 px the last stage sees a single
    # position built from less than one stride cell: such sizes run but cannot be meaningfully
    # compared, hence a floor of 32 for all CNNs. ViT needs at least one 16 px patch.
    min_input_size: int
    # The module depends on the image size it is built for (ViT's position embeddings; VGG's
    # first classifier layer below 224 px); loaded ImageNet weights are fitted to it
    # (gendertune.models.weights.load_state).
    fixed_input_size: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Weight of the auxiliary heads' losses (GoogLeNet: 0.3 each, as in the paper).
    aux_loss_weight: float
    # The ImageNet weights used for pretrained=True, as "<Enum>.<member>" for
    # torchvision.models.get_weight.
    weights: str
    # Dotted paths of the nn.Linear layers replaced by a fresh num_classes head; the first is the
    # main head (its weight tells ImageNet state dicts from project ones).
    heads: tuple[str, ...]
    # image_size -> the architecture with its 1000-class ImageNet head and no weights.
    builder: Callable[[int], nn.Module] = field(repr=False, compare=False)
    # Image sides must be a multiple of this (ViT's patch size); 1 = any size.
    size_multiple: int = 1
    # State-dict key prefixes that a weights file may lack (GoogLeNet's auxiliary heads, which
    # torchvision drops when built with aux_logits=False); they keep their fresh initialisation.
    optional_prefixes: tuple[str, ...] = ()
    # Why this architecture is here in this form, for the leaderboard (empty: nothing to say).
    note: str = ""

    @property
    def main_head(self) -> str:
        return self.heads[0]


RGB = tuple[float, float, float]


def _preset(weights: str) -> tuple[int, RGB, RGB]:
    """(crop size, mean, std) from the weights' own inference transforms, so they cannot drift
    from torchvision's."""
    preset = tvm.get_weight(weights).transforms()
    (m0, m1, m2), (s0, s1, s2) = preset.mean, preset.std
    return preset.crop_size[0], (m0, m1, m2), (s0, s1, s2)


def _build_cnn(builder: Callable[..., nn.Module], image_size: int, **kwargs: Any) -> nn.Module:
    """A size-agnostic CNN: the image size does not change the module."""
    return builder(weights=None, **kwargs)


def _ignore_size(builder: Callable[..., nn.Module], **kwargs: Any) -> Callable[[int], nn.Module]:
    # A partial of module-level functions, not a closure, so specs stay picklable.
    return partial(_build_cnn, builder, **kwargs)


# VGG's classifier reads a 7x7 map: AdaptiveAvgPool2d(7) after the last of five 2x2 poolings. Below
# 224 px that map is smaller (image_size // 32 per side) and the pool only copies it: at 32 px one
# position is copied 49 times into the 25,088 inputs of a 102M-parameter layer, which then dominates
# the cost of a step. Below 224 px the first classifier layer reads the map at its own size instead.
# Pooling is linear and injective here, so this is exactly the same set of functions (ImageNet
# weights fold into it, see gendertune.models.weights.fold_vgg_classifier) with far fewer parameters.
class Fp32Classifier(nn.Sequential):
    """A classifier computed in fp32 when the rest of the network runs under autocast. VGG's three
    4096-wide layers did not learn under bf16 autocast: on the demo's 32 px faces vgg19_bn stayed at
    chance for 6 epochs, and learned with only its classifier in fp32 (docs/results.md). The layers
    are a small part of a step (VGG19 at 32 px: ~5% of the multiply-adds, under 1% at 224 px). A
    Sequential subclass, so the parameter names (and ImageNet weights) stay torchvision's."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # also keeps autocast out of an exported graph
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _vgg_builder(builder: Callable[..., nn.Module], image_size: int) -> nn.Module:
    model = builder(weights=None)
    model.classifier = Fp32Classifier(*model.classifier)
    side = image_size // 32  # five 2x2 max-poolings, each rounding down
    if side < weights_io.VGG_MAP_SIDE:
        model.avgpool = nn.Identity()
        first = model.classifier[0]
        layer = nn.Linear(first.in_features // weights_io.VGG_MAP_SIDE**2 * side * side, first.out_features)
        nn.init.normal_(layer.weight, 0, 0.01)  # torchvision's initialisation of VGG's linear layers
        nn.init.zeros_(layer.bias)
        model.classifier[0] = layer
    return model


def _sized_vgg(builder: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    return partial(_vgg_builder, builder)


def _vit_builder(image_size: int) -> nn.Module:
    return tvm.vit_b_16(weights=None, image_size=image_size)


def _spec(
    name: str,
    weights: str,
    heads: tuple[str, ...],
    builder: Callable[[int], nn.Module],
    *,
    min_input_size: int = 32,
    fixed_input_size: bool = False,
    aux_loss_weight: float = 0.0,
    size_multiple: int = 1,
    optional_prefixes: tuple[str, ...] = (),
    note: str = "",
) -> ModelSpec:
    input_size, mean, std = _preset(weights)
    return ModelSpec(
        name=name,
        input_size=input_size,
        min_input_size=min_input_size,
        fixed_input_size=fixed_input_size,
        mean=mean,
        std=std,
        aux_loss_weight=aux_loss_weight,
        weights=weights,
        heads=heads,
        builder=builder,
        size_multiple=size_multiple,
        optional_prefixes=optional_prefixes,
        note=note,
    )


_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # IMAGENET1K_V2 (80.9% top-1, torchvision's newer recipe) rather than V1 (76.1%).
        # zero_init_residual: each residual block's last BN starts at zero, so every block starts as
        # the identity and a deep ResNet trains from scratch like a shallow one (Goyal et al. 2017);
        # without it resnet50 stayed at the majority rate in the comparison's budget.
        _spec(
            "resnet50", "ResNet50_Weights.IMAGENET1K_V2", ("fc",), _ignore_size(tvm.resnet50, zero_init_residual=True)
        ),
        _spec(
            "resnet18", "ResNet18_Weights.IMAGENET1K_V1", ("fc",), _ignore_size(tvm.resnet18, zero_init_residual=True)
        ),
        # aux_logits=True so the auxiliary heads train; torchvision drops them in eval mode.
        # transform_input=True always, not only when pretrained as torchvision's builder does:
        # it is a fixed per-channel affine map of the input (ImageNet normalisation -> the
        # [-1, 1] scaling Google's weights expect), which a from-scratch model simply absorbs
        # into its first convolution. Tying it to the weights' origin instead would make a
        # project checkpoint's correct setting depend on how that run started, which the
        # state dict cannot record.
        _spec(
            "googlenet",
            "GoogLeNet_Weights.IMAGENET1K_V1",
            ("fc", "aux1.fc2", "aux2.fc2"),
            _ignore_size(tvm.googlenet, aux_logits=True, transform_input=True, init_weights=True),
            aux_loss_weight=0.3,
            optional_prefixes=("aux1.", "aux2."),
        ),
        _spec("vgg19", "VGG19_Weights.IMAGENET1K_V1", ("classifier.6",), _sized_vgg(tvm.vgg19), fixed_input_size=True),
        # The comparison's VGG19: plain VGG19 (no normalisation, 19 layers) stayed at the majority
        # rate from scratch at every lr tried in a CPU budget; batch norm after each convolution is
        # what makes it train (Ioffe & Szegedy 2015), as the original VGG needed staged training.
        _spec(
            "vgg19_bn",
            "VGG19_BN_Weights.IMAGENET1K_V1",
            ("classifier.6",),
            _sized_vgg(tvm.vgg19_bn),
            fixed_input_size=True,
            note="VGG19 with batch norm: plain vgg19 does not learn from scratch in a CPU budget",
        ),
        _spec(
            "efficientnet_b0",
            "EfficientNet_B0_Weights.IMAGENET1K_V1",
            ("classifier.1",),
            _ignore_size(tvm.efficientnet_b0),
        ),
        _spec(
            "convnext_tiny",
            "ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
            ("classifier.2",),
            _ignore_size(tvm.convnext_tiny),
        ),
        # IMAGENET1K_V1 is trained at 224 px (the SWAG variants are 384 px or linear-probe only).
        _spec(
            "vit_b_16",
            "ViT_B_16_Weights.IMAGENET1K_V1",
            ("heads.head",),
            _vit_builder,
            min_input_size=16,
            fixed_input_size=True,
            size_multiple=16,
        ),
    )
}


def list_models() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UserInputError(f"unknown model {name!r}; known models: {', '.join(_SPECS)}") from None


def check_image_size(name: str, image_size: int) -> None:
    """Raise ValueError when `name` cannot be built for / run on images of side `image_size`."""
    spec = get_spec(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image size must be a whole number of pixels, got {image_size!r}")
    if image_size < spec.min_input_size:
        raise ValueError(f"image size {image_size} is too small for {name} (needs >= {spec.min_input_size})")
    if image_size % spec.size_multiple:
        raise ValueError(
            f"image size {image_size} does not work for {name}: it must be a multiple of "
            f"{spec.size_multiple} (its patch size)"
        )


def _replace_heads(model: nn.Module, spec: ModelSpec, num_classes: int) -> None:
    for path in spec.heads:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, attr)
        # PyTorch's default nn.Linear initialisation for every model (torchvision's own ViT head
        # starts at zero, which would also zero the backbone's gradients on the first step).
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def build_model(
    name: str,
    *,
    num_classes: int = 2,
    image_size: int,
    pretrained: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build `name` with fresh `num_classes` head(s), in train mode, on the CPU.

    Weights, in order of precedence:
    - `weights_path`: a local file holding either ImageNet-shaped weights of this architecture
      (loaded before the head is replaced) or a project state dict / checkpoint with a
      `num_classes` head (loaded after); see `gendertune.models.weights.read_weights_file`.
    - `pretrained=True`: the ImageNet weights in `ModelSpec.weights`, read from the torch hub
      cache, where the stage fetched them (`gendertune.models.weights.fetch_hub_weights`); building never
      downloads, so many workers never fetch at once.
    - otherwise torchvision's random initialisation.

    `image_size` is validated for every model; only ViT's module depends on it.
    """
    spec = get_spec(name)
    check_image_size(name, image_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    # Read weights before building, so a missing or broken file fails fast.
    if weights_path is not None:
        state, source = weights_io.read_weights_file(weights_path), str(weights_path)
    elif pretrained:
        state, source = weights_io.read_hub_weights(spec), str(weights_io.hub_weights_path(spec))
    else:
        state = None
    model = spec.builder(image_size)

    if state is None:
        _replace_heads(model, spec, num_classes)
        return model

    head_classes = weights_io.head_classes(state, spec)
    if head_classes == num_classes:
        _replace_heads(model, spec, num_classes)
        weights_io.load_state(model, state, spec=spec, source=source)
    elif head_classes in (1000, None):
        # ImageNet-shaped. Without this architecture's head at all (None), load_state reports
        # how the file's keys differ from the plain architecture.
        weights_io.load_state(model, state, spec=spec, source=source)
        _replace_heads(model, spec, num_classes)
    else:
        raise weights_io.WeightsError(
            f"{source} has a {head_classes}-class {spec.main_head} head; {name} weights must have "
            f"a 1000-class (ImageNet) or {num_classes}-class (this project) head"
        )
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters of the module as built (GoogLeNet: including its auxiliary heads)."""
    return sum(p.numel() for p in model.parameters())


def split_outputs(output: Tensor | Sequence[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """(main logits, auxiliary logits). GoogLeNet in train mode returns
    GoogLeNetOutputs(logits, aux_logits2, aux_logits1); every other model a plain tensor."""
    if isinstance(output, Tensor):
        return output, []
    main, *aux = output
    assert main is not None
    return main, [a for a in aux if a is not None]


def classification_loss(
    output: Tensor | Sequence[Tensor | None],
    targets: Tensor,
    criterion: Callable[[Tensor, Tensor], Tensor],
    aux_weight: float,
) -> Tensor:
    """criterion(main) + aux_weight * sum(criterion(aux)) over the auxiliary heads, if any."""
    main, aux = split_outputs(output)
    loss = criterion(main, targets)
    if aux_weight and aux:
        loss = loss + aux_weight * torch.stack([criterion(a, targets) for a in aux]).sum()
    return loss
