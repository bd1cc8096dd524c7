"""Tests for the models package: registry, offline weights loading, preprocessing/augmentation.

CPU only, no network beyond 127.0.0.1: ImageNet-shaped weights are randomly initialised state
dicts written to tmp paths (including a fake torch hub cache via TORCH_HOME) or served by a local
HTTP server for the download path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from models import (
    EvalPreprocess,
    FramingShift,
    TrainAugment,
    WeightsError,
    WeightsNotFoundError,
    build_model,
    check_image_size,
    classification_loss,
    count_parameters,
    get_spec,
    hub_weights_path,
    list_models,
    split_outputs,
)
from conftest import free_port
from models.transforms import MAX_BORDER
from models.weights import WEIGHTS_MIRROR_ENV, download_weights, fetch_hub_weights, hub_weights_url

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here are tiny, so extra intra-op threads only add OpenMP synchronisation,
    which on CPUs shared with other jobs made this file several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- registry --------------------------------------------------------------------------------


def test_registry_names_and_specs():
    assert set(list_models()) == {
        "resnet50",
        "resnet18",
        "googlenet",
        "vgg19",
        "efficientnet_b0",
        "convnext_tiny",
        "vit_b_16",
    }
    for name in list_models():
        spec = get_spec(name)
        assert spec.input_size == 224 and spec.mean == MEAN and spec.std == STD
        assert spec.aux_loss_weight == (0.3 if name == "googlenet" else 0.0)
        assert spec.fixed_input_size == (name == "vit_b_16")


@pytest.fixture(scope="module")
def vit_min_size() -> nn.Module:
    """ViT-B/16 (86M parameters) at its smallest size, built once for the module."""
    torch.manual_seed(0)
    return build_model("vit_b_16", num_classes=2, image_size=get_spec("vit_b_16").min_input_size)


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


# --- weights ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


def test_weights_imagenet_state_dict(tmp_path, imagenet_resnet18):
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(imagenet_resnet18, path)
    model = build_model("resnet18", image_size=64, weights_path=str(path))
    assert torch.equal(model.conv1.weight, imagenet_resnet18["conv1.weight"])
    running_var = imagenet_resnet18["layer4.1.bn2.running_var"]
    assert torch.equal(model.layer4[1].bn2.running_var, running_var)
    assert model.fc.out_features == 2


def test_weights_project_state_dict_and_ddp_checkpoint(tmp_path):
    torch.manual_seed(2)
    trained = build_model("resnet18", image_size=64)
    state = trained.state_dict()

    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, checkpoint)

    for path in (plain, checkpoint):
        model = build_model("resnet18", image_size=64, weights_path=str(path))
        assert torch.equal(model.conv1.weight, state["conv1.weight"])
        assert torch.equal(model.fc.weight, state["fc.weight"])
        assert model.fc.out_features == 2


def test_pretrained_reads_only_the_hub_cache(tmp_path, monkeypatch, imagenet_resnet18):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert hub_weights_path(get_spec("resnet18")) == expected

    with pytest.raises(WeightsNotFoundError) as info:  # building a model never downloads
        build_model("resnet18", image_size=64, pretrained=True)
    assert isinstance(info.value, FileNotFoundError) and str(expected) in str(info.value)

    expected.parent.mkdir(parents=True)
    torch.save(imagenet_resnet18, expected)
    model = build_model("resnet18", image_size=64, pretrained=True)
    assert torch.equal(model.conv1.weight, imagenet_resnet18["conv1.weight"])
    assert model.fc.out_features == 2


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving the files put in the folder it yields with its URL."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *_: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


def test_weights_are_downloaded_into_the_cache_with_their_hash_checked(tmp_path, weights_server, imagenet_resnet18):
    folder, url = weights_server
    made = folder / "made.pth"
    torch.save(imagenet_resnet18, made)
    digest = hashlib.sha256(made.read_bytes()).hexdigest()
    named = made.rename(folder / f"resnet18-{digest[:8]}.pth")  # torchvision's name-<hash>.pth
    cache = tmp_path / "cache" / "checkpoints"
    download_weights(f"{url}/{named.name}", cache / named.name, progress=False)
    fetched = torch.load(cache / named.name, weights_only=True)
    assert torch.equal(fetched["conv1.weight"], imagenet_resnet18["conv1.weight"])

    (folder / "resnet18-00000000.pth").write_bytes(named.read_bytes())  # served under another hash
    with pytest.raises(WeightsError, match="not the published file"):
        download_weights(f"{url}/resnet18-00000000.pth", cache / "resnet18-00000000.pth", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [named.name]  # no partial file left behind


def test_pretrained_fetches_from_a_mirror_and_offline_says_what_to_do(tmp_path, monkeypatch, weights_server,
                                                                     imagenet_resnet18, capsys):
    folder, url = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, url)
    spec = get_spec("resnet18")
    assert hub_weights_url(spec) == f"{url}/resnet18-f37072fd.pth"
    # The test cannot make torchvision's file, so the mirror serves one whose hash is not in its
    # name: fetched from the mirror, checked, refused, and the cache left empty.
    torch.save(imagenet_resnet18, folder / "resnet18-f37072fd.pth")
    with pytest.raises(WeightsError, match='expected "f37072fd"'):
        fetch_hub_weights(spec, progress=True)
    assert "100%" in capsys.readouterr().err  # the download's progress bar, on stderr
    assert not hub_weights_path(spec).exists() and not list(hub_weights_path(spec).parent.iterdir())

    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, unreachable)
    with pytest.raises(WeightsNotFoundError) as info:
        fetch_hub_weights(spec)
    message = str(info.value)
    assert f"could not be downloaded from {unreachable}/resnet18-f37072fd.pth" in message
    assert str(hub_weights_path(spec)) in message and "--weights FILE" in message

    cached = hub_weights_path(spec)  # already cached: no request at all (the mirror is unreachable)
    torch.save(imagenet_resnet18, cached)
    assert fetch_hub_weights(spec) == cached


def test_weights_file_errors(tmp_path, imagenet_resnet18):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        build_model("resnet18", image_size=64, weights_path=str(missing))

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsError, match=r"corrupt\.pth is not a readable PyTorch weights file"):
        build_model("resnet18", image_size=64, weights_path=str(corrupt))

    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        build_model("resnet18", image_size=64, weights_path=str(not_state))

    resnet18_file = tmp_path / "resnet18.pth"
    torch.save(imagenet_resnet18, resnet18_file)
    mismatch = (
        r"resnet18\.pth does not look like resnet50 weights: "
        r"missing keys .*layer1\.0\.conv3\.weight.*shape mismatches"
    )
    with pytest.raises(WeightsError, match=mismatch):
        build_model("resnet50", image_size=64, weights_path=str(resnet18_file))

    seven = dict(imagenet_resnet18, **{"fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)})
    seven_file = tmp_path / "seven.pth"
    torch.save(seven, seven_file)
    with pytest.raises(WeightsError, match=r"7-class fc head.*1000-class \(ImageNet\) or 2-class"):
        build_model("resnet18", image_size=64, weights_path=str(seven_file))


def test_googlenet_weights_without_aux_heads(tmp_path):
    # torchvision drops GoogLeNet's auxiliary heads unless asked for them, so state dicts saved
    # from its models often lack them: they load, and the aux heads keep their fresh init.
    torch.manual_seed(4)
    state = torchvision.models.googlenet(aux_logits=False, init_weights=False).state_dict()
    path = tmp_path / "googlenet_no_aux.pth"
    torch.save(state, path)
    model = build_model("googlenet", image_size=32, weights_path=path)
    assert torch.equal(model.conv1.conv.weight, state["conv1.conv.weight"])
    assert model.fc.out_features == model.aux1.fc2.out_features == 2
    assert model.transform_input


@pytest.mark.integration  # trains or runs a real network for seconds
def test_vit_position_embeddings_interpolated_from_224(tmp_path, vit_min_size):
    # The shared ViT's state dict, given a 224 px position grid (14 x 14 patches + class token)
    # and a 1000-class head, stands in for ImageNet weights.
    torch.manual_seed(3)
    state = dict(vit_min_size.state_dict())
    state["encoder.pos_embedding"] = torch.randn(1, 14 * 14 + 1, 768)
    state["heads.head.weight"] = torch.randn(1000, 768)
    state["heads.head.bias"] = torch.randn(1000)
    path = tmp_path / "vit_224.pth"
    torch.save(state, path)
    expected = interpolate_embeddings(
        32, 16, {"encoder.pos_embedding": state["encoder.pos_embedding"]}
    )

    loaded = build_model("vit_b_16", image_size=32, weights_path=str(path)).eval()
    assert loaded.encoder.pos_embedding.shape == (1, 2 * 2 + 1, 768)
    assert torch.equal(loaded.encoder.pos_embedding, expected["encoder.pos_embedding"])
    assert torch.equal(loaded.conv_proj.weight, state["conv_proj.weight"])
    assert loaded.heads.head.out_features == 2
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 2)


# --- transforms ------------------------------------------------------------------------------


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
    out = TrainAugment(image_size=32, mean=MEAN, std=STD, hflip=0.5)(
        faces, generator=torch.Generator().manual_seed(0)
    )
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
        faces, generator=torch.Generator().manual_seed(0))
    bright = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    corner_is_fill = (out[:, :, 0, 0].abs() < 1e-5).all(1)
    corner_is_bright = torch.isclose(out[:, :, 0, 0], bright.view(1, 3), atol=1e-4).all(1)
    assert 10 < int(corner_is_fill.sum()) < 54 and (corner_is_fill | corner_is_bright).all()
    assert torch.isclose(out[:, :, 16, 16], bright.view(1, 3), atol=1e-4).all()  # the centre stays the face


def test_translate_moves_the_image_within_its_bound():
    faces = torch.zeros((32, 40, 40, 3), dtype=torch.uint8)
    faces[:, 18:22, 18:22] = 255  # a dot in the middle
    out = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, translate=0.25)(
        faces, generator=torch.Generator().manual_seed(0))
    brightest = out[:, 0].flatten(1).argmax(1)
    rows, cols = brightest // 40, brightest % 40
    offsets = torch.stack([rows - 19.5, cols - 19.5]).abs()
    assert offsets.max() <= 0.25 * 40 + 1.5 and (offsets > 2).any(0).float().mean() > 0.5


def test_random_border_fills_outside_a_box_that_keeps_the_centre():
    faces = _faces(64, 40)
    out = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, random_border=1.0)(
        faces, generator=torch.Generator().manual_seed(0))
    plain = EvalPreprocess(image_size=40, mean=MEAN, std=STD)(faces)
    changed = (out != plain).any(1)  # N x H x W
    assert (out.masked_select(changed[:, None].expand_as(out)) == 0).all()  # changed pixels are the fill
    keep = slice(round(40 * MAX_BORDER), round(40 * (1 - MAX_BORDER)))
    assert not changed[:, keep, keep].any()  # never inside the central box
    assert changed.flatten(1).any(1).float().mean() > 0.9
    half = TrainAugment(image_size=40, mean=MEAN, std=STD, hflip=0.0, random_border=0.5)(
        faces, generator=torch.Generator().manual_seed(0))
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
