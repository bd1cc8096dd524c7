"""Model-side preprocessing: prepared uint8 face crops -> normalised float batches.

Prepared data arrives as uint8 tensors N x H x W x 3 (RGB, HWC), square, at the prep size. This
module owns what happens between that and the model:

- `EvalPreprocess`: deterministic resize + normalisation (also for single images in `predict`);
- `TrainAugment`: per-sample random augmentation of a whole batch, vectorised (no Python loop
  over samples) because it runs on CPU workers once per training batch;
- `FramingShift`: deterministic zoom in/out, for measuring accuracy under different framings;
- `Mixup`: blends a training batch's images and labels (it changes the targets, so it is not one
  of `TrainAugment`'s strengths).

Framing the face (alignment onto a template, or the centre-square crop) belongs to prep
(`gendertune.data_prep.faces`, `gendertune.data_prep.images`); images given here must already be square.

All outputs are float32 N x 3 x S x S in channels_last memory format (the format convolutions
are fastest in on GPU), normalised with the model's ImageNet mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# torchvision's RandomErasing defaults: erased area as a fraction of the image, and aspect ratio.
_ERASE_SCALE = (0.02, 0.33)
_ERASE_RATIO = (0.3, 3.3)
# torchvision's RandomResizedCrop default aspect ratios.
_CROP_RATIO = (3 / 4, 4 / 3)
# random_border: the widest border, as a fraction of the side. An aligned UTKFace-style tight
# crop covers about the central 60% of a chip framed like CelebA (see gendertune.data_prep.faces).
MAX_BORDER = 0.3
# RGB <-> YIQ: hue is rotated in the IQ (chroma) plane, see _hue_matrices.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

# uniform(low, high, *shape) -> per-sample draws of shape (N, *shape), see TrainAugment.__call__.
Uniform = Callable[..., Tensor]


def _as_nchw(batch: Tensor) -> Tensor:
    """NHWC uint8 batch -> NCHW view (channels_last strides, no copy); square images only."""
    if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[-1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"expected an N x H x W x 3 image batch, got {shape}")
    if batch.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image batch, got {batch.dtype}")
    if batch.shape[1] != batch.shape[2]:
        raise ValueError(
            f"expected square images, got {batch.shape[1]}x{batch.shape[2]}: crop with "
            "gendertune.data_prep.faces.face_chips or gendertune.data_prep.images.center_square_crop first"
        )
    return batch.permute(0, 3, 1, 2)


def _resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of an NCHW batch to size x size (no-op if already there).
    On uint8 channels_last input this hits PyTorch's vectorised uint8 kernel."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[0, 1] float NCHW -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _check_norm(obj: EvalPreprocess | TrainAugment) -> None:
    """Validate mean/std and store them as float tuples (configs may give lists)."""
    mean, std = tuple(map(float, obj.mean)), tuple(map(float, obj.std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean}, std={std}")
    object.__setattr__(obj, "mean", mean)
    object.__setattr__(obj, "std", std)


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive whole number, got {image_size!r}")


@dataclass(frozen=True, kw_only=True)
class EvalPreprocess:
    """uint8 NHWC batch -> float NCHW, resized to `image_size` (antialiased bilinear) and
    normalised, channels_last."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        _check_size(self.image_size)
        _check_norm(self)

    def __call__(self, batch: Tensor) -> Tensor:
        x = _resize(_as_nchw(batch), self.image_size).float().div_(255)
        return _normalise(x, self.mean, self.std).contiguous(memory_format=torch.channels_last)

    def image(self, img: Image.Image | np.ndarray) -> Tensor:
        """One already square-cropped image (PIL, or uint8 H x W x 3 array) -> 1 x 3 x S x S.

        For exact parity with training, give it the face crop at the prep size, i.e. after
        the same crop and resize that data prep applies."""
        # np.array copies: arrays viewing a PIL image are read-only, which torch warns about.
        array = np.array(img.convert("RGB") if isinstance(img, Image.Image) else img)
        return self(torch.from_numpy(array)[None])


@dataclass(frozen=True, kw_only=True)
class TrainAugment:
    """Random augmentation applied per sample to a uint8 NHWC batch -> float NCHW normalised,
    channels_last, image_size x image_size.

    Strengths (0 turns an augmentation off):
    - hflip: probability of a horizontal flip;
    - rotation: maximum rotation in degrees (uniform in [-rotation, rotation]);
    - color_jitter: s -> brightness, contrast and saturation factors uniform in
      [max(0, 1 - s), 1 + s] and a hue shift uniform in [-s/4, s/4] of the hue circle
      (torchvision ColorJitter semantics, applied in that fixed order);
    - random_erasing: probability of erasing one rectangle (torchvision RandomErasing's area and
      aspect ranges, filled with the mean colour);
    - random_resized_crop: s -> crop area uniform in [1 - s, 1] of the image, aspect ratio in
      [3/4, 4/3] (log-uniform);
    - zoom: s -> the face is scaled by a factor log-uniform in [1/(1 + s), 1 + s], zooming in
      *and* out, so the model sees faces framed tighter and looser than the alignment template;
    - translate: t -> the face moves by up to t of the image side on each axis (uniform);
    - random_border: probability of filling everything outside a random box (each border up to
      MAX_BORDER of the side): what a tight crop, such as UTKFace's, looks like once aligned.

    Crop, zoom, translation, rotation and flip are fused into one affine resampling of the
    whole batch (a per-sample matrix each). Areas outside the image, and random borders, are
    filled with the mean colour, the colour face alignment (gendertune.data_prep.faces) fills the parts
    of a chip that lie outside the photo with, so training sees the same fill evaluation does.
    Differences from torchvision's per-image retry loops: crop and erasing rectangles larger
    than the image are clamped to it rather than redrawn, and hue is rotated in YIQ space
    rather than shifted in HSV.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: float = 0.5
    rotation: float = 0.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    random_resized_crop: float = 0.0
    zoom: float = 0.0
    translate: float = 0.0
    random_border: float = 0.0

    def __post_init__(self) -> None:
        _check_size(self.image_size)
        _check_norm(self)
        for name in ("hflip", "random_erasing", "random_border"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.random_resized_crop < 1.0:
            raise ValueError(f"random_resized_crop must be in [0, 1), got {self.random_resized_crop}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        if not 0.0 <= self.zoom <= 1.0:
            raise ValueError(f"zoom must be in [0, 1] (scale factors 1/2 to 2 at most), got {self.zoom}")
        if not 0.0 <= self.translate <= 0.5:
            raise ValueError(f"translate must be in [0, 0.5] of the image side, got {self.translate}")
        if not 0.0 <= self.color_jitter <= 2.0:
            # s/4 is the hue range, which cannot exceed half the hue circle.
            raise ValueError(f"color_jitter must be in [0, 2], got {self.color_jitter}")

    def __call__(self, batch: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Augment `batch`; random parameters come from `generator` (a CPU generator; None =
        torch's global RNG), so a seeded generator makes the result reproducible."""
        x = _as_nchw(batch)
        n, size = x.shape[0], self.image_size

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return (torch.rand(n, *shape, generator=generator) * (high - low) + low).to(x.device)

        if self.random_resized_crop or self.rotation or self.zoom or self.translate:
            if x.shape[-1] > size:
                x = _resize(x, size)  # antialias first; the resampling below only zooms in
            # grid_sample is several times faster on contiguous NCHW than on channels_last;
            # reordering is cheapest while still uint8.
            x = self._resample(x.contiguous().float().div_(255), uniform)
        else:
            x = _resize(x, size)
            if self.hflip:
                flip = (uniform(0, 1) < self.hflip).view(n, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
            x = x.float().div_(255)
        if self.color_jitter:
            x = self._jitter(x, uniform)
        x = _normalise(x, self.mean, self.std)
        if self.random_erasing:
            x = self._erase(x, uniform)
        if self.random_border:
            x = self._border(x, uniform)
        return x.contiguous(memory_format=torch.channels_last)

    def _resample(self, x: Tensor, uniform: Uniform) -> Tensor:
        """Random resized crop, zoom, translation, rotation and flip as one affine map per sample.
        `theta` maps output coordinates in [-1, 1] to input coordinates: flip, then rotate, then
        scale to the crop's half-size (over the zoom) and move to its centre."""
        n, size = x.shape[0], self.image_size
        s = self.random_resized_crop
        area = uniform(1.0 - s, 1.0)
        # Without cropping (rotation only) the aspect ratio must stay 1.
        log_ratio = uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])) * (s > 0)
        width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        # Output coordinates span 2, hence the factor 2 on the translation.
        centre_x = uniform(-1.0, 1.0) * (1.0 - width) + uniform(-2 * self.translate, 2 * self.translate)
        centre_y = uniform(-1.0, 1.0) * (1.0 - height) + uniform(-2 * self.translate, 2 * self.translate)
        magnification = uniform(-math.log1p(self.zoom), math.log1p(self.zoom)).exp()
        width, height = width / magnification, height / magnification
        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180.0)
        flip = torch.where(uniform(0, 1) < self.hflip, -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack(
            [
                torch.stack([width * cos * flip, -width * sin, centre_x], dim=-1),
                torch.stack([height * sin * flip, height * cos, centre_y], dim=-1),
            ],
            dim=1,
        )
        grid = nnf.affine_grid(theta, [n, 3, size, size], align_corners=False)
        # Zero padding around (x - fill) is padding with the fill colour around x.
        fill = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return nnf.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    def _jitter(self, x: Tensor, uniform: Uniform) -> Tensor:
        """Brightness, contrast, saturation, hue with per-sample factors (x in [0, 1])."""
        s = self.color_jitter

        def factor() -> Tensor:
            return uniform(max(0.0, 1.0 - s), 1.0 + s, 1, 1, 1)

        x = (x * factor()).clamp_(0.0, 1.0)
        gray_mean = F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
        x = torch.lerp(gray_mean, x, factor()).clamp_(0.0, 1.0)
        x = torch.lerp(F.rgb_to_grayscale(x), x, factor()).clamp_(0.0, 1.0)
        hue = _hue_matrices(uniform(-s / 4, s / 4)).to(x.dtype)
        n, c, h, w = x.shape
        return torch.bmm(hue, x.reshape(n, c, h * w)).view(n, c, h, w).clamp_(0.0, 1.0)

    def _erase(self, x: Tensor, uniform: Uniform) -> Tensor:
        """Zero (the mean colour, after normalisation) one random rectangle in a random subset."""
        n, _, h, w = x.shape
        area = uniform(*_ERASE_SCALE) * (h * w)
        ratio = uniform(math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])).exp()
        eh = (area * ratio).sqrt().round().clamp(1, h)
        ew = (area / ratio).sqrt().round().clamp(1, w)
        top = (uniform(0, 1) * (h - eh + 1)).floor()
        left = (uniform(0, 1) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device).view(1, h)
        cols = torch.arange(w, device=x.device).view(1, w)
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
        chosen = uniform(0, 1) < self.random_erasing
        mask = (in_rows[:, :, None] & in_cols[:, None, :]) & chosen.view(n, 1, 1)
        return x.masked_fill(mask[:, None], 0.0)

    def _border(self, x: Tensor, uniform: Uniform) -> Tensor:
        """Fill (the mean colour, after normalisation) outside a random box in a random subset:
        each border's width uniform in [0, MAX_BORDER] of the side."""
        n, _, h, w = x.shape
        top, bottom = uniform(0, MAX_BORDER) * h, (1 - uniform(0, MAX_BORDER)) * h
        left, right = uniform(0, MAX_BORDER) * w, (1 - uniform(0, MAX_BORDER)) * w
        rows = torch.arange(h, device=x.device).view(1, h) + 0.5
        cols = torch.arange(w, device=x.device).view(1, w) + 0.5
        inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
        inside_cols = (cols >= left[:, None]) & (cols < right[:, None])
        chosen = uniform(0, 1) < self.random_border
        outside = ~(inside_rows[:, :, None] & inside_cols[:, None, :]) & chosen.view(n, 1, 1)
        return x.masked_fill(outside[:, None], 0.0)


@dataclass(frozen=True)
class Mixup:
    """mixup (Zhang et al. 2018): every image of a batch blended with another image of the same
    batch (a random permutation), by one weight lambda ~ Beta(alpha, alpha) per batch, and the
    one-hot targets blended by the same lambda. The loss then takes probability targets (what
    nn.CrossEntropyLoss accepts as float class probabilities, label smoothing included)."""

    alpha: float
    num_classes: int = 2

    def __call__(
        self, images: Tensor, labels: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        # Beta from numpy: torch's Beta cannot take a generator, and a seeded run must repeat.
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        targets = nnf.one_hot(labels.long(), self.num_classes).to(images.dtype)
        mixed = torch.lerp(images[order], images, lam)  # lam * images + (1 - lam) * images[order]
        return mixed.contiguous(memory_format=torch.channels_last), torch.lerp(targets[order], targets, lam)


# The augmentations' names, each a strength field of TrainAugment: the training config's settings, the
# command line's --augment and the search's space all take them from here.
AUGMENTATIONS = tuple(field.name for field in fields(TrainAugment) if field.name not in ("image_size", "mean", "std"))


def _hue_matrices(shift: Tensor) -> Tensor:
    """Per-sample 3x3 RGB matrices rotating hue by `shift` turns: a rotation of the chroma (I, Q)
    plane in YIQ space, which keeps luma and is linear, hence one batched matmul."""
    angle = shift * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(shift.shape[0], 3, 3, device=shift.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    yiq_to_rgb = _YIQ_TO_RGB.to(shift.device)
    rgb_to_yiq = _RGB_TO_YIQ.to(shift.device)
    return yiq_to_rgb @ rot @ rgb_to_yiq


@dataclass(frozen=True, kw_only=True)
class FramingShift:
    """Deterministic reframing of a uint8 NHWC batch, same shape out as in.

    zoom > 1 crops the centre 1/zoom of the image and scales it back up (a tighter face crop);
    zoom < 1 shrinks the image and pads it back to size by `padding_mode` ("reflect" or "edge"),
    approximating a looser crop without inventing black borders. zoom = 1 returns the input.
    Apply it before `EvalPreprocess` to measure accuracy under different framings.
    """

    zoom: float
    padding_mode: str = "reflect"

    def __post_init__(self) -> None:
        if self.padding_mode not in ("reflect", "edge"):
            raise ValueError(f"padding_mode must be 'reflect' or 'edge', got {self.padding_mode!r}")
        # Reflection can mirror at most the whole shrunken image into each side.
        lowest = 1 / 3 if self.padding_mode == "reflect" else 0.0
        if not self.zoom > lowest:
            raise ValueError(f"zoom must be > {lowest:.3g} with {self.padding_mode} padding, got {self.zoom}")

    def __call__(self, batch: Tensor) -> Tensor:
        if self.zoom == 1.0:
            return batch
        x = _as_nchw(batch)
        size = x.shape[-1]
        if self.zoom > 1.0:
            side = max(1, round(size / self.zoom))
            x = _resize(F.center_crop(x, [side, side]), size)
        else:
            side = max(1, round(size * self.zoom))
            before = (size - side) // 2
            after = size - side - before
            padding = [before, before, after, after]  # left, top, right, bottom
            x = F.pad(_resize(x, side), padding, padding_mode=self.padding_mode)
        return x.permute(0, 2, 3, 1).contiguous()
