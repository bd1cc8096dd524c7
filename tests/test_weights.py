"""Tests for gendertune.models.weights: offline weights loading (ImageNet, project and DDP state dicts, the
torch hub cache), downloads with their hash checked, and the errors for bad weights files.

CPU only, no network beyond 127.0.0.1: ImageNet-shaped weights are randomly initialised state
dicts written to tmp paths (including a fake torch hub cache via TORCH_HOME) or served by a local
HTTP server for the download path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
import torch
import torchvision
from conftest import free_port
from torchvision.models.vision_transformer import interpolate_embeddings

from gendertune.models import WeightsError, WeightsNotFoundError, build_model, get_spec, hub_weights_path
from gendertune.models.weights import WEIGHTS_MIRROR_ENV, download_weights, fetch_hub_weights, hub_weights_url

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


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


def test_pretrained_fetches_from_a_mirror_and_offline_says_what_to_do(
    tmp_path, monkeypatch, weights_server, imagenet_resnet18, capsys
):
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
    expected = interpolate_embeddings(32, 16, {"encoder.pos_embedding": state["encoder.pos_embedding"]})

    loaded = build_model("vit_b_16", image_size=32, weights_path=str(path)).eval()
    assert loaded.encoder.pos_embedding.shape == (1, 2 * 2 + 1, 768)
    assert torch.equal(loaded.encoder.pos_embedding, expected["encoder.pos_embedding"])
    assert torch.equal(loaded.conv_proj.weight, state["conv_proj.weight"])
    assert loaded.heads.head.out_features == 2
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 2)


@pytest.mark.integration  # builds a real 143M-parameter VGG
def test_imagenet_vgg_weights_fold_into_the_small_input_classifier(tmp_path):
    """Below 224 px gendertune's VGG reads its last map directly; ImageNet weights, which read that
    map pooled to 7x7, fold into it exactly: the same features before the head."""
    torch.manual_seed(4)
    reference = torchvision.models.vgg19(num_classes=1000).eval()
    path = tmp_path / "vgg19_imagenet.pth"
    torch.save(reference.state_dict(), path)
    for size in (32, 96):  # last maps of 1x1 (copied 49x by the pool) and 3x3 (overlapping pool bins)
        side = size // 32
        loaded = build_model("vgg19", image_size=size, weights_path=str(path)).eval()
        assert loaded.classifier[0].in_features == 512 * side * side
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = reference.classifier[:-1](torch.flatten(reference.avgpool(reference.features(x)), 1))
            got = loaded.classifier[:-1](torch.flatten(loaded.avgpool(loaded.features(x)), 1))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # At ImageNet's size the map is 7x7 and the model is torchvision's, weights loaded as they are.
    full = build_model("vgg19", image_size=224, weights_path=str(path))
    assert torch.equal(full.classifier[0].weight, reference.classifier[0].weight)
