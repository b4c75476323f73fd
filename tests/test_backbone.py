"""The frozen backbone: offline ImageNet weights, multi-scale merge, weights files, errors."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from moleflow.features.backbone import FeatureExtractor, resolve_device
from moleflow.features.weights import BackboneError, create_classifier, offline_weights_path, sha256_file
from moleflow.config import BackboneConfig

LITE0 = "tf_efficientnet_lite0"


def lite0(layers: list[int] = [2, 3], weights: str = "auto", **kw) -> BackboneConfig:  # noqa: B006 - read only
    return BackboneConfig(name=LITE0, layers=list(layers), weights=weights, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from two threads, and with other jobs on the cores OpenMP's waiting
    threads slow every convolution down by orders of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0_auto() -> FeatureExtractor:
    return FeatureExtractor(lite0([1, 2, 3], local_avg=1), image_size=64)


@pytest.fixture(scope="module")
def wrn_random() -> FeatureExtractor:
    # merged-grid average: its patches are what the descriptor summarises (the layer mode is tested below)
    return FeatureExtractor(BackboneConfig(name="wide_resnet50_2", layers=[2, 3], weights="none", local_avg_at="merged"), image_size=64)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline for real: HF hub offline mode, and any socket connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


# --------------------------------------------------------------------------- offline ImageNet weights


def test_offline_weights_classify_chelsea_as_a_cat(no_network: None) -> None:
    """The full classifier with the package's weights mapped onto timm names recognises a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model, source, path = create_classifier(LITE0, "auto")
    assert source == "offline-package" and path == offline_weights_path()
    data_cfg = timm.data.resolve_data_config({}, model=model)  # 224 px, crop 0.875, mean/std 0.5
    transform = timm.data.create_transform(**data_cfg)  # timm's eval transform: resize, centre crop, normalise
    x = transform(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top class {top} is not an ImageNet cat"
    assert float(probs[281:286].sum()) > 0.5


def test_offline_weights_are_loaded_into_the_trunk(lite0_auto: FeatureExtractor) -> None:
    full, _, _ = create_classifier(LITE0, "auto")
    full_state = full.state_dict()
    trunk_state = lite0_auto.trunk.state_dict()
    assert trunk_state, "empty trunk"
    for k, v in trunk_state.items():
        assert torch.equal(v, full_state[k]), k
    ident = lite0_auto.identity()
    assert ident["weights"] == "offline-package"
    assert ident["weights_sha256"] == sha256_file(offline_weights_path())


# --------------------------------------------------------------------------- shapes and merge


@pytest.mark.parametrize("which", ["lite0_auto", "wrn_random"])
def test_shapes_come_from_feature_info(which: str, request: pytest.FixtureRequest) -> None:
    fe: FeatureExtractor = request.getfixturevalue(which)
    reference = timm.create_model(fe.cfg.name, features_only=True, out_indices=fe.cfg.layers, pretrained=False)
    channels, strides = reference.feature_info.channels(), reference.feature_info.reduction()
    assert fe.out_channels == sum(channels) and fe.desc_dim == 2 * fe.out_channels  # [mean, log RMS] per channel
    assert fe.grid == (64 // strides[0], 64 // strides[0])
    patches, desc = fe(images(2))
    assert patches.shape == (2, *fe.grid, fe.out_channels) and patches.dtype == torch.float32
    assert desc.shape == (2, fe.desc_dim) and desc.dtype == torch.float32
    assert torch.isfinite(patches).all() and torch.isfinite(desc).all()
    flat = patches.flatten(1, 2)  # (B, H·W, C): the descriptor summarises exactly these patches
    torch.testing.assert_close(desc[:, : fe.out_channels], flat.mean(1))
    torch.testing.assert_close(desc[:, fe.out_channels :], 0.5 * flat.pow(2).mean(1).add(1e-8).log(), rtol=1e-4, atol=1e-5)
    ident = fe.identity()
    assert ident["grid"] == list(fe.grid) and ident["out_channels"] == fe.out_channels and ident["layers"] == fe.cfg.layers


def test_wide_resnet_layers_are_layer2_and_layer3(wrn_random: FeatureExtractor) -> None:
    assert wrn_random.trunk.feature_info.module_name() == ["layer2", "layer3"]
    assert wrn_random.layer_channels == [512, 1024] and wrn_random.layer_strides == [8, 16]
    assert wrn_random.identity()["weights"] == "random"


def test_merge_upsamples_deeper_maps_to_the_first_grid(lite0_auto: FeatureExtractor) -> None:
    x = images(2, seed=1)
    patches, desc = lite0_auto(x)  # local_avg=1: the raw merge
    with torch.no_grad():
        maps = lite0_auto.trunk((x - lite0_auto.mean) / lite0_auto.std)
    h, w = maps[0].shape[-2:]
    expected = torch.cat([maps[0]] + [F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps[1:]], 1)
    torch.testing.assert_close(patches, expected.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(desc[:, : patches.shape[-1]], patches.mean(dim=(1, 2)))


def test_local_average_and_projection() -> None:
    x = images(2, seed=2)
    raw_fe = FeatureExtractor(lite0([2, 3], local_avg=1), 64)
    raw, _ = raw_fe(x)  # (B, H, W, 152)
    # "merged" (the seeds'): the 3 x 3 mean over the merged grid, borders unpadded
    merged, merged_desc = FeatureExtractor(lite0([2, 3], local_avg=3, local_avg_at="merged"), 64)(x)
    ref = F.avg_pool2d(raw.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)
    # "layer" (the default, PatchCore's order): each layer's 3 x 3 mean on its own grid with zero padding,
    # then the upsampling; here by hand from the trunk's maps, the corner patch in plain sums
    smooth_fe = FeatureExtractor(lite0([2, 3], local_avg=3), 64)
    smooth, smooth_desc = smooth_fe(x)
    with torch.no_grad():
        maps = raw_fe.trunk((x - raw_fe.mean) / raw_fe.std)
    first = maps[0]  # (B, 40, 8, 8)
    corner = first[:, :, :2, :2].sum(dim=(2, 3)) / 9  # 4 real neighbours, 5 zeros of the padding
    torch.testing.assert_close(smooth[:, 0, 0, : first.shape[1]], corner, rtol=1e-4, atol=1e-4)
    deep = F.avg_pool2d(maps[1], 3, stride=1, padding=1, count_include_pad=True)
    up = F.interpolate(deep, size=first.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(smooth[..., first.shape[1] :], up.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    assert smooth_fe.identity()["local_avg_at"] == "layer" and not torch.allclose(smooth, merged)
    # the router's descriptor is that of the merged-grid average in both modes
    torch.testing.assert_close(smooth_desc, merged_desc)
    torch.testing.assert_close(merged_desc[:, : merged.shape[-1]], merged.mean(dim=(1, 2)))

    proj_fe = FeatureExtractor(lite0([2, 3], local_avg=3, embed_dim=64), 64)
    assert proj_fe.out_channels == 64 and proj_fe.desc_dim == 128
    assert not list(proj_fe.parameters()) or all(not p.requires_grad for p in proj_fe.parameters())
    proj, desc = proj_fe(x)
    assert proj.shape == (2, *smooth_fe.grid, 64) and desc.shape == (2, 128)
    pooled = F.adaptive_avg_pool1d(smooth.reshape(-1, 1, smooth.shape[-1]), 64).reshape(proj.shape)
    torch.testing.assert_close(proj, pooled, rtol=1e-4, atol=1e-4)
    proj_merged, _ = FeatureExtractor(lite0([2, 3], local_avg=3, local_avg_at="merged", embed_dim=64), 64)(x)
    torch.testing.assert_close(desc[:, :64], proj_merged.mean(dim=(1, 2)))
    # deterministic: the same images give the same features
    assert torch.equal(proj_fe(x)[0], proj)


def test_embed_dim_larger_than_the_channels_is_an_error() -> None:
    with pytest.raises(BackboneError, match="embed_dim 999"):
        FeatureExtractor(lite0([2, 3], weights="none", embed_dim=999), 64)


def test_channels_last_does_not_change_the_features() -> None:
    x = images(2, seed=3)
    a, _ = FeatureExtractor(lite0([2, 3], channels_last=True), 64)(x)
    b, _ = FeatureExtractor(lite0([2, 3], channels_last=False), 64)(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_random_weights_are_reproducible() -> None:
    x = images(1, seed=4)
    a, _ = FeatureExtractor(lite0([1], weights="none"), 64)(x)
    b, _ = FeatureExtractor(lite0([1], weights="none"), 64)(x)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- frozen


def test_backbone_is_frozen(lite0_auto: FeatureExtractor) -> None:
    params = list(lite0_auto.parameters())
    assert params and all(not p.requires_grad for p in params)
    before = {k: v.clone() for k, v in lite0_auto.trunk.state_dict().items()}
    lite0_auto.train()
    try:
        assert all(not m.training for m in lite0_auto.trunk.modules())
        x = images(2, seed=5).requires_grad_(True)
        patches, desc = lite0_auto(x)
        assert not patches.requires_grad and not desc.requires_grad
        after = lite0_auto.trunk.state_dict()
        for k, v in before.items():  # BatchNorm running statistics did not move
            assert torch.equal(v, after[k]), k
    finally:
        lite0_auto.eval()


# --------------------------------------------------------------------------- weights files


def test_weights_file_round_trip(tmp_path) -> None:
    torch.manual_seed(123)
    model = timm.create_model(LITE0, pretrained=False)
    with torch.no_grad():  # make it distinguishable from the seeded "none" init and the offline weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save(state, pth)
    save_file(state, str(st))
    x = images(1, seed=6)
    outputs = []
    for path in (pth, st):
        fe = FeatureExtractor(lite0([2, 3], weights=str(path)), 64)
        for k, v in fe.trunk.state_dict().items():
            assert torch.equal(v, state[k]), k
        ident = fe.identity()
        assert ident["weights"] == "file" and ident["weights_sha256"] == sha256_file(path)
        outputs.append(fe(x)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    # the classifier loads the same file strictly
    clf, source, _ = create_classifier(LITE0, str(pth))
    assert source == "file" and torch.equal(clf.classifier.weight, state["classifier.weight"])


def test_torchvision_wide_resnet_naming_is_timms() -> None:
    """torchvision's wide_resnet50_2 state dict has exactly timm's names and shapes, so a torchvision
    weights file loads strictly with no renaming (checked on the meta device: no memory, no time)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        tv = torchvision.models.wide_resnet50_2(weights=None).state_dict()
        tm = timm.create_model("wide_resnet50_2", pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in tv.items()} == {k: tuple(v.shape) for k, v in tm.items()}


def test_torchvision_resnet_file_loads_strictly(tmp_path) -> None:
    """The same naming rule end to end through a file, on the small sibling resnet18."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    fe = FeatureExtractor(BackboneConfig(name="resnet18", layers=[2, 3], weights=str(path)), 32)
    tv_state = tv.state_dict()
    for k, v in fe.trunk.state_dict().items():
        assert torch.equal(v, tv_state[k]), k
    assert fe.grid == (4, 4) and fe.out_channels == 128 + 256


def test_weights_file_that_does_not_fit_names_the_keys(tmp_path) -> None:
    path = tmp_path / "partial.pth"
    state = timm.create_model(LITE0, pretrained=False).state_dict()
    state.pop("classifier.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"missing keys: classifier.weight.*unexpected keys: extra.weight"):
        FeatureExtractor(lite0([2, 3], weights=str(path)), 64)


def test_missing_weights_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match=r"backbone.weights: file .*nope.pth does not exist"):
        FeatureExtractor(lite0([2, 3], weights=str(missing)), 64)


def test_unreadable_weights_file_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(BackboneError, match="cannot read .*garbage.safetensors"):
        FeatureExtractor(lite0([2, 3], weights=str(bad)), 64)


def test_auto_weights_offline_names_both_ways_out(no_network: None) -> None:
    with pytest.raises(BackboneError) as info:
        FeatureExtractor(BackboneConfig(name="wide_resnet50_2", layers=[2, 3], weights="auto"), 64)
    message = str(info.value)
    assert "backbone.weights: /path/to/file" in message and "online" in message


# --------------------------------------------------------------------------- other errors, devices


def test_bad_name_and_layers_are_clear_errors() -> None:
    with pytest.raises(BackboneError, match="not a timm model"):
        FeatureExtractor(BackboneConfig(name="no_such_net", weights="none"), 64)
    with pytest.raises(BackboneError, match="increasing"):
        FeatureExtractor(lite0([3, 2], weights="none"), 64)
    with pytest.raises(BackboneError, match=r"layers \[2, 9\]"):
        FeatureExtractor(lite0([2, 9], weights="none"), 64)


def test_forward_rejects_wrong_image_shapes(lite0_auto: FeatureExtractor) -> None:
    with pytest.raises(BackboneError, match=r"\(B,3,S,S\)"):
        lite0_auto(torch.rand(1, 1, 64, 64))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BackboneError, match="not understood"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(BackboneError, match="no CUDA device"):
                resolve_device(name)
    else:
        with pytest.raises(BackboneError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_image_statistics_come_from_pretrained_cfg(lite0_auto: FeatureExtractor, wrn_random: FeatureExtractor) -> None:
    np.testing.assert_allclose(lite0_auto.mean.flatten().numpy(), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(lite0_auto.std.flatten().numpy(), [0.5, 0.5, 0.5])
    cfg = timm.models.get_pretrained_cfg("wide_resnet50_2")
    np.testing.assert_allclose(wrn_random.mean.flatten().numpy(), cfg.mean, rtol=1e-6)
    np.testing.assert_allclose(wrn_random.std.flatten().numpy(), cfg.std, rtol=1e-6)
