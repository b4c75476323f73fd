"""The feature cache: one backbone pass per image, disk cache keyed by content, FeatureSet plumbing."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.features.backbone import FeatureExtractor
from moleflow.config import BackboneConfig, DataConfig
from moleflow.features.cache import FeatureError, FeatureSet, cache_key, extract_features

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from two threads; with other jobs on the cores they slow down badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountingExtractor:
    """Wraps a real extractor and counts the images that go through the backbone."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.images = 0
        self.calls = 0
        self.grid, self.out_channels, self.desc_dim = inner.grid, inner.out_channels, inner.desc_dim

    def identity(self) -> dict:
        return self.inner.identity()

    def __call__(self, images: torch.Tensor):
        self.calls += 1
        self.images += images.shape[0]
        return self.inner(images)


class ConstantExtractor:
    """A stand-in backbone whose features are a fixed value (for overflow / NaN checks)."""

    grid, out_channels, desc_dim = (2, 2), 3, 3

    def __init__(self, value: float) -> None:
        self.value = value

    def identity(self) -> dict:
        return {"name": "constant", "value": repr(self.value)}

    def __call__(self, images: torch.Tensor):
        b = images.shape[0]
        return torch.full((b, 2, 2, 3), self.value), torch.full((b, 3), self.value)


class FileDataset:
    """Items like moleflow.data.ImageDataset's, read from PNG files (optionally with masks)."""

    def __init__(self, paths: list[Path], with_masks: bool = False) -> None:
        self.paths = paths
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        array = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE)), dtype=np.float32) / 255.0
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, S, S)
        mask = None
        if self.with_masks:
            mask = torch.zeros(1, SIZE, SIZE)
            mask[0, : i + 1, : i + 1] = 1.0
        return {"image": image, "label": i % 2, "mask": mask, "path": str(path), "class_name": f"c{i % 3}"}


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    # A small random-weights backbone: layers at stride 4 and 8 -> an 8x8 grid of 24+40 channels at 32 px.
    return FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", layers=[1, 2], weights="none"), SIZE)


# --------------------------------------------------------------------------- one pass per image


def test_backbone_runs_once_per_image_across_epochs(tmp_path: Path, extractor: FeatureExtractor) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 5))
    counter = CountingExtractor(extractor)
    features = extract_features(counter, dataset, batch_size=2, progress=False)
    assert counter.images == 5 and counter.calls == 3  # batches of 2, 2, 1
    # Several "epochs" of training and an evaluation reuse the set; the backbone is never called again.
    for epoch in range(3):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(features), 2):
            batch = features.subset(order[start : start + 2])
            assert batch.patches.shape[1:] == (*extractor.grid, extractor.out_channels)
    assert counter.images == 5

    # The cached features are exactly what the backbone gives for those images, in dataset order.
    direct_p, direct_d = extractor(torch.stack([dataset[i]["image"] for i in range(5)]))
    torch.testing.assert_close(features.patches, direct_p)
    torch.testing.assert_close(features.descriptors, direct_d)
    assert features.patches.dtype == torch.float32 and features.descriptors.shape == (5, extractor.desc_dim)
    assert features.labels.tolist() == [0, 1, 0, 1, 0] and features.labels.dtype == torch.long
    assert features.paths == [str(p) for p in dataset.paths]
    assert features.class_names == ["c0", "c1", "c2", "c0", "c1"]
    assert features.masks is None


def test_disk_cache_is_hit_on_a_second_extraction(tmp_path: Path, extractor: FeatureExtractor) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 4))
    cache = tmp_path / "cache"
    first = CountingExtractor(extractor)
    a = extract_features(first, dataset, batch_size=3, cache_dir=cache, progress=False)
    assert first.images == 4
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 4
    ident = extractor.identity()
    for p in dataset.paths:
        key = cache_key(ident, p)
        assert (cache / key[:2] / f"{key}.safetensors").is_file()

    second = CountingExtractor(extractor)
    b = extract_features(second, dataset, batch_size=3, cache_dir=str(cache), progress=False)
    assert second.images == 0 and second.calls == 0
    # A first run and a cached rerun see identical (float16-rounded) features ...
    assert torch.equal(a.patches, b.patches) and torch.equal(a.descriptors, b.descriptors)
    assert a.paths == b.paths and torch.equal(a.labels, b.labels)
    # ... within float16 precision of the backbone's float32 output.
    plain = extract_features(extractor, dataset, batch_size=3, progress=False)
    torch.testing.assert_close(b.patches, plain.patches, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.descriptors, plain.descriptors, rtol=1e-3, atol=1e-3)


def test_an_edited_image_is_recomputed_alone(tmp_path: Path, extractor: FeatureExtractor) -> None:
    paths = write_images(tmp_path / "img", 3)
    dataset = FileDataset(paths)
    cache = tmp_path / "cache"
    a = extract_features(extractor, dataset, cache_dir=cache, progress=False)
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(paths[1])  # same name, new content
    counter = CountingExtractor(extractor)
    b = extract_features(counter, dataset, cache_dir=cache, progress=False)
    assert counter.images == 1
    assert torch.equal(a.patches[0], b.patches[0]) and torch.equal(a.patches[2], b.patches[2])
    assert not torch.allclose(a.patches[1], b.patches[1])


def test_cache_key_follows_content_and_identity(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"image one")
    b.write_bytes(b"image one")
    ident = {"name": "net", "layers": [2, 3], "image_size": 256}
    key = cache_key(ident, a)
    assert len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)
    assert cache_key(ident, b) == key  # the name does not matter, the content does
    assert cache_key(dict(reversed(ident.items())), a) == key  # nor the order of identity keys
    b.write_bytes(b"image two")
    assert cache_key(ident, b) != key
    assert cache_key({**ident, "image_size": 128}, a) != key
    assert cache_key({**ident, "weights_sha256": "00"}, a) != key


def test_corrupt_cache_file_is_recomputed(tmp_path: Path, extractor: FeatureExtractor) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 2))
    cache = tmp_path / "cache"
    a = extract_features(extractor, dataset, cache_dir=cache, progress=False)
    key = cache_key(extractor.identity(), dataset.paths[0])
    (cache / key[:2] / f"{key}.safetensors").write_bytes(b"broken")
    counter = CountingExtractor(extractor)
    with pytest.warns(UserWarning, match="unreadable"):
        b = extract_features(counter, dataset, cache_dir=cache, progress=False)
    assert counter.images == 1 and torch.equal(a.patches, b.patches)


def test_items_without_a_file_are_kept_in_memory_only(tmp_path: Path, extractor: FeatureExtractor) -> None:
    class NoFile(FileDataset):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), "path": f"memory://{i}"}

    dataset = NoFile(write_images(tmp_path / "img", 2))
    with pytest.warns(UserWarning, match="not cached on disk"):
        fs = extract_features(extractor, dataset, cache_dir=tmp_path / "cache", progress=False)
    assert len(fs) == 2 and not list((tmp_path / "cache").rglob("*.safetensors"))


# --------------------------------------------------------------------------- errors


def test_float16_overflow_names_the_file(tmp_path: Path) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 2))
    fs = extract_features(ConstantExtractor(1e5), dataset, progress=False)  # fine in memory (float32)
    assert float(fs.patches.max()) == 1e5
    with pytest.raises(FeatureError, match=r"000\.png.*float16"):
        extract_features(ConstantExtractor(1e5), dataset, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_name_the_file(tmp_path: Path, value: float) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 1))
    with pytest.raises(FeatureError, match=r"non-finite.*000\.png"):
        extract_features(ConstantExtractor(value), dataset, progress=False)


def test_image_size_mismatch_is_a_clear_error(tmp_path: Path, extractor: FeatureExtractor) -> None:
    class Bigger(FileDataset):
        def __getitem__(self, i: int) -> dict:
            item = super().__getitem__(i)
            return {**item, "image": torch.nn.functional.interpolate(item["image"][None], size=64)[0]}

    with pytest.raises(FeatureError, match="image size"):
        extract_features(extractor, Bigger(write_images(tmp_path / "img", 1)), progress=False)


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        extract_features(ConstantExtractor(1.0), FileDataset([]), progress=False)


# --------------------------------------------------------------------------- masks, subset, concat


def test_masks_are_kept_as_bool(tmp_path: Path) -> None:
    dataset = FileDataset(write_images(tmp_path / "img", 3), with_masks=True)
    fs = extract_features(ConstantExtractor(1.0), dataset, progress=False)
    assert fs.masks is not None and fs.masks.shape == (3, 1, SIZE, SIZE) and fs.masks.dtype == torch.bool
    assert [int(m.sum()) for m in fs.masks] == [1, 4, 9]


def test_some_masks_missing_is_an_error(tmp_path: Path) -> None:
    class Mixed(FileDataset):
        def __getitem__(self, i: int) -> dict:
            item = super().__getitem__(i)
            return {**item, "mask": None} if i == 1 else item

    dataset = Mixed(write_images(tmp_path / "img", 2), with_masks=True)
    with pytest.raises(ValueError, match=r"masks for some images but not for .*001\.png"):
        extract_features(ConstantExtractor(1.0), dataset, progress=False)


def make_set(n: int, offset: int = 0, masks: bool = True) -> FeatureSet:
    idx = torch.arange(offset, offset + n, dtype=torch.float32)
    return FeatureSet(
        patches=idx.view(n, 1, 1, 1).expand(n, 2, 2, 3).clone(),
        descriptors=idx.view(n, 1).expand(n, 3).clone(),
        labels=torch.arange(offset, offset + n) % 2,
        masks=(idx.view(n, 1, 1, 1).expand(n, 1, 4, 4) % 2 == 1) if masks else None,
        paths=[f"p{offset + i}" for i in range(n)],
        class_names=[f"c{offset + i}" for i in range(n)],
    )


def test_subset_picks_rows_in_the_given_order() -> None:
    fs = make_set(5)
    sub = fs.subset([3, 0, 3])
    assert len(sub) == 3
    assert sub.patches[:, 0, 0, 0].tolist() == [3.0, 0.0, 3.0]
    assert sub.descriptors[:, 0].tolist() == [3.0, 0.0, 3.0]
    assert sub.labels.tolist() == [1, 0, 1]
    assert sub.masks is not None and sub.masks[:, 0, 0, 0].tolist() == [True, False, True]
    assert sub.paths == ["p3", "p0", "p3"] and sub.class_names == ["c3", "c0", "c3"]
    by_mask = fs.subset(torch.tensor([True, False, True, False, False]))
    assert by_mask.paths == ["p0", "p2"]
    assert fs.subset(torch.tensor([4])).paths == ["p4"]
    assert fs.subset(np.array([1, 2])).paths == ["p1", "p2"]
    assert len(fs.subset([])) == 0
    with pytest.raises(IndexError):
        fs.subset(torch.tensor([True, False]))


def test_concat_keeps_order_and_drops_masks_if_any_is_missing() -> None:
    a, b = make_set(2), make_set(3, offset=2)
    both = FeatureSet.concat([a, b])
    assert len(both) == 5 and both.paths == [f"p{i}" for i in range(5)]
    assert both.patches[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert both.labels.tolist() == [0, 1, 0, 1, 0]
    assert both.masks is not None and both.masks.shape == (5, 1, 4, 4)
    assert FeatureSet.concat([a, make_set(1, masks=False)]).masks is None
    assert FeatureSet.concat([a]).paths == a.paths
    with pytest.raises(ValueError, match="at least one"):
        FeatureSet.concat([])
    odd = make_set(1)
    odd.patches = torch.zeros(1, 3, 3, 3)
    with pytest.raises(ValueError, match="different patch shapes"):
        FeatureSet.concat([a, odd])


# --------------------------------------------------------------------------- with the real data layer


def test_with_the_data_layer(tiny_mvtec: Path, tmp_path: Path, extractor: FeatureExtractor) -> None:
    data = pytest.importorskip("moleflow.data")
    dataset = data.build_dataset(DataConfig(dataset="mvtec", root=str(tiny_mvtec), image_size=SIZE), "bottle", "test")
    counter = CountingExtractor(extractor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every item comes from a real file: nothing to warn about
        fs = extract_features(counter, dataset, batch_size=3, cache_dir=tmp_path / "cache", progress=False)
    assert len(fs) == len(dataset) == 4 and counter.images == 4
    assert fs.masks is not None and fs.masks.dtype == torch.bool and fs.masks.shape == (4, 1, SIZE, SIZE)
    assert sorted(fs.labels.tolist()) == [0, 0, 1, 1]
    assert all(bool(m.any()) == bool(lbl) for m, lbl in zip(fs.masks, fs.labels))
    assert set(fs.class_names) == {"bottle"}
