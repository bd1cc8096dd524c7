"""Model weights: the ImageNet weights in the torch hub cache, fetched there when missing, and
weights files read safely.

This module owns where ImageNet weights are expected (the torch hub cache, under the file name
torchvision would download them to), fetching them into it the way torchvision does (torch.hub's
download, from torchvision's URL or a mirror of it, the hash in the file name checked), reading
weights files and training checkpoints safely (`weights_only=True`), and loading a state dict
into a model with errors that say what is wrong. Building a model never downloads: the stages
fetch before any worker starts (`fetch_hub_weights`), so a cluster fetches once per node.
Deciding *when* to load (before or after the head is replaced) is `gendertune.models.registry.build_model`'s.
"""

from __future__ import annotations

import math
import os
import socket
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.models import get_weight
from torchvision.models.vision_transformer import interpolate_embeddings

from gendertune.base.errors import MissingInputError, UserInputError

if TYPE_CHECKING:
    from gendertune.models.registry import ModelSpec

# Prefixes wrappers add to every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_VIT_POS_EMBEDDING = "encoder.pos_embedding"
# VGG's first classifier layer reads a VGG_MAP_SIDE x VGG_MAP_SIDE map of 512 channels (ImageNet's);
# gendertune's reads the last map at its own size below 224 px (gendertune.models.registry).
_VGG_FIRST_LAYER = "classifier.0.weight"
VGG_MAP_SIDE, _VGG_CHANNELS = 7, 512
# A base URL serving torchvision's weights files under their own names (an artifact store on a
# cluster without internet, or a test's local server); unset, torchvision's own URLs are used.
WEIGHTS_MIRROR_ENV = "GENDERTUNE_WEIGHTS_MIRROR"
# Without a timeout a silently dropped connection would hang the command before it starts.
DOWNLOAD_TIMEOUT_S = 60


class WeightsNotFoundError(MissingInputError):
    """A weights file is not where it was expected; the message says what to put where."""


class WeightsError(UserInputError):
    """A weights file exists but is unreadable or does not fit the model."""


def hub_weights_url(spec: ModelSpec) -> str:
    """Where `spec`'s ImageNet weights are fetched from: torchvision's URL, or the same file name
    under $GENDERTUNE_WEIGHTS_MIRROR."""
    url = get_weight(spec.weights).url
    mirror = os.environ.get(WEIGHTS_MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{os.path.basename(url)}" if mirror else url


def hub_weights_path(spec: ModelSpec) -> Path:
    """Where torchvision would have cached `spec`'s ImageNet weights: honours TORCH_HOME and
    torch.hub.set_dir, read at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(get_weight(spec.weights).url)


def fetch_hub_weights(spec: ModelSpec, *, progress: bool = True) -> Path:
    """The cached ImageNet weights file of `spec`, downloaded into the cache first if it is not
    there; offline, WeightsNotFoundError saying where to put it. Stages call this on the driver
    before any Ray work (and once per other node), so a missing file fails in seconds."""
    path = hub_weights_path(spec)
    if path.is_file():
        return path
    url = hub_weights_url(spec)
    try:
        download_weights(url, path, progress=progress)
    except OSError as err:  # URLError, refused connections, timeouts, a full disk
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise WeightsNotFoundError(
            f"ImageNet weights for {spec.name} ({spec.weights}) are not in the torch hub cache and "
            f"could not be downloaded from {url} ({reason}). Put the file at {path} (fetch it on a "
            f"machine with internet access; TORCH_HOME moves the cache, {WEIGHTS_MIRROR_ENV} names a "
            f"mirror), or pass --weights FILE with a state dict instead."
        ) from err
    return path


def download_weights(url: str, path: Path, *, progress: bool = True) -> None:
    """torch.hub's download of `url` to `path` (a temporary file beside it, moved into place only
    when complete, so an interrupted download never looks cached), with the SHA-256 prefix that
    torchvision's file names carry (name-<hash>.pth) checked. torchvision itself skips that check
    by default; here it costs nothing while streaming and catches a truncated or foreign file."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub opens the URL without a timeout
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=progress)
    except RuntimeError as err:  # torch.hub's hash mismatch
        raise WeightsError(f"the weights downloaded from {url} are not the published file: {err}") from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


def read_hub_weights(spec: ModelSpec) -> dict[str, Tensor]:
    """`spec`'s ImageNet state dict from the hub cache, where `fetch_hub_weights` put it. The
    file's hash is checked when it is downloaded, not per build (seconds for the large models)."""
    path = hub_weights_path(spec)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {spec.name} are not at {path} on this node: the stage fetches "
            f"them before starting workers (fetch_hub_weights); put the file there by hand if this "
            f"node cannot download"
        )
    return _read_state_dict(path)


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from `path`: a bare state dict, or a checkpoint dict holding one under
    "model". DDP/torch.compile key prefixes are stripped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    return _read_state_dict(path)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for corrupt or foreign files
        raise WeightsError(
            f"{path} is not a readable PyTorch weights file (a state dict or a checkpoint of "
            f"plain tensors/numbers/strings, saved with torch.save): {type(err).__name__}: {err}"
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError(
            f"{path} holds a {type(loaded).__name__}, not a state dict "
            "(expected {name: tensor} or a checkpoint with the state dict under 'model')"
        )
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} is not a state dict: {_some(not_tensors)} are not tensors")
    return _strip_wrapper_prefixes(dict(loaded))


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def head_classes(state: Mapping[str, Tensor], spec: ModelSpec) -> int | None:
    """Number of outputs of the state dict's main head, or None if it has no such head."""
    weight = state.get(f"{spec.main_head}.weight")
    return weight.shape[0] if weight is not None and weight.ndim == 2 else None


def load_state(model: nn.Module, state: Mapping[str, Tensor], *, spec: ModelSpec, source: str) -> None:
    """Load `state` into `model` strictly, except for `spec.optional_prefixes` keys the file may
    lack. ViT position embeddings of another grid size are interpolated to the model's; VGG's first
    classifier layer is folded to the model's map size."""
    expected = model.state_dict()
    state = _fit_vit_pos_embedding(dict(state), expected, model)
    state = _fit_vgg_classifier(state, expected)
    missing = [k for k in expected if k not in state and not k.startswith(spec.optional_prefixes)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {_some(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise WeightsError(f"{source} does not look like {spec.name} weights: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def _fit_vit_pos_embedding(
    state: dict[str, Tensor], expected: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Interpolate ViT position embeddings trained at another image size (e.g. ImageNet's 224)
    to the model's grid, as torchvision's fine-tuning recipe does."""
    have, want = state.get(_VIT_POS_EMBEDDING), expected.get(_VIT_POS_EMBEDDING)
    if have is None or want is None or have.shape == want.shape or have.shape[-1] != want.shape[-1]:
        return state
    grid = have.shape[1] - 1
    if math.isqrt(grid) ** 2 != grid:
        return state  # not a square patch grid: left to be reported as a shape mismatch
    return dict(interpolate_embeddings(model.image_size, model.patch_size, state))


def fold_vgg_classifier(weight: Tensor, side: int) -> Tensor:
    """VGG's first classifier weight, which reads AdaptiveAvgPool2d(7) of the last map, as the weight
    that reads a `side` x `side` map directly: W' = W P for the pool's linear map P, so the layer's
    outputs are exactly the same. The pool is separable: P is one 1-D pool per axis."""
    out_features = weight.shape[0]
    # pool[a, i]: the share of input position a in output position i.
    pool = torch.nn.functional.adaptive_avg_pool1d(torch.eye(side, dtype=weight.dtype)[None], VGG_MAP_SIDE)[0]
    grid = weight.reshape(out_features, -1, VGG_MAP_SIDE, VGG_MAP_SIDE)
    return torch.einsum("ocij,ai,bj->ocab", grid, pool, pool).reshape(out_features, -1)


def _fit_vgg_classifier(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold ImageNet VGG weights (a 7x7 map) into a model built for a smaller map."""
    have, want = state.get(_VGG_FIRST_LAYER), expected.get(_VGG_FIRST_LAYER)
    if have is None or want is None or have.ndim != 2 or want.ndim != 2 or have.shape == want.shape:
        return state
    side = math.isqrt(want.shape[1] // _VGG_CHANNELS)
    if have.shape[1] != _VGG_CHANNELS * VGG_MAP_SIDE**2 or want.shape[1] != _VGG_CHANNELS * side * side:
        return state  # not VGG's layout: left to be reported as a shape mismatch
    return {**state, _VGG_FIRST_LAYER: fold_vgg_classifier(have, side)}


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown
