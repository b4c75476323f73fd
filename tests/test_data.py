"""The data layer: loaders of MVTec/MPDD/VisA/ELPV/folders, image decoding, errors, real data."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import write_tiny_mvtec
from moleflow.config import DataConfig
from moleflow.data import (
    DATASET_NAMES,
    ELPV_CLASSES,
    MPDD_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
    DatasetError,
    ImageDataset,
    Sample,
    build_dataset,
    collate,
    known_classes,
    load_image,
    load_mask,
    parse_class_spec,
)
from moleflow.data.elpv import package_data_dir, read_labels


def cfg_for(root: Path | str, **kw) -> DataConfig:
    kw.setdefault("image_size", 32)
    return DataConfig(root=str(root), **kw)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------- names and specs


def test_names_and_class_orders() -> None:
    assert DATASET_NAMES == ("mvtec", "mpdd", "visa", "elpv", "folder")
    assert MVTEC_CLASSES[:3] == ["leather", "grid", "transistor"] and MVTEC_CLASSES[-1] == "bottle"
    assert len(MVTEC_CLASSES) == len(set(MVTEC_CLASSES)) == 15
    assert known_classes("mvtec") == MVTEC_CLASSES
    assert known_classes("mpdd") == MPDD_CLASSES == [
        "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"
    ]
    assert known_classes("visa") == VISA_CLASSES and len(VISA_CLASSES) == 12
    assert known_classes("elpv") == ELPV_CLASSES == ["mono", "poly"]
    assert known_classes("folder") == []
    with pytest.raises(DatasetError, match="known datasets"):
        known_classes("kolektor")


def test_parse_class_spec() -> None:
    assert parse_class_spec("elpv:mono", "mvtec") == ("elpv", "mono")
    assert parse_class_spec("bottle", "mvtec") == ("mvtec", "bottle")
    assert parse_class_spec(" visa:pcb1 ", "mvtec") == ("visa", "pcb1")
    for bad in ("nope:bottle", "mvtec:", ":bottle", "", "a:b:c"):
        with pytest.raises(DatasetError):
            parse_class_spec(bad, "mvtec")
    with pytest.raises(DatasetError, match="data.dataset"):
        parse_class_spec("bottle", "nope")


# --------------------------------------------------------------------------- MVTec layout


def test_mvtec_counts_labels_masks_aligned(tiny_mvtec: Path) -> None:
    cfg = cfg_for(tiny_mvtec)
    train = build_dataset(cfg, "bottle", "train")
    test = build_dataset(cfg, "bottle", "test")
    assert isinstance(train, ImageDataset) and len(train) == 4 and train.labels == [0] * 4
    assert not train.has_masks and test.has_masks and train.image_size == 32
    assert len(test) == 4 and sorted(test.labels) == [0, 0, 1, 1]
    assert [s.path for s in test.samples] == sorted(s.path for s in test.samples)
    assert all(isinstance(s, Sample) and s.dataset == "mvtec" and s.class_name == "bottle" for s in test.samples)

    item = train[0]
    assert item["mask"] is None and item["label"] == 0 and item["class_name"] == "bottle"
    for i, s in enumerate(test.samples):
        item = test[i]
        img, mask = item["image"], item["mask"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert item["path"] == str(s.path) and item["label"] == s.label
        if s.label == 0:
            assert s.mask_path is None and mask.sum() == 0
        else:
            # The fixture paints each defect's square at its own place: the mask must mark exactly the
            # bright pixels of *its* image (noise stays below 100/255).
            assert s.mask_path == tiny_mvtec / "bottle/ground_truth/broken" / f"{s.path.stem}_mask.png"
            bright = img.min(dim=0).values > 0.9  # (S, S)
            assert mask.sum() == 36 and torch.equal(bright, mask[0].bool())


def test_mvtec_resize_and_max_train_images(tiny_mvtec: Path) -> None:
    cfg = cfg_for(tiny_mvtec, image_size=16, max_train_images=3)
    train = build_dataset(cfg, "bottle", "train")
    assert [s.path.name for s in train.samples] == ["000.png", "001.png", "002.png"]
    test = build_dataset(cfg, "bottle", "test")
    item = test[[s.label for s in test.samples].index(1)]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert item["mask"].sum() == 9  # the 6x6 square at half resolution, NEAREST


def test_collate_and_dataloader(tiny_mvtec: Path) -> None:
    cfg = cfg_for(tiny_mvtec)
    test = build_dataset(cfg, "bottle", "test")
    batch = next(iter(DataLoader(test, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == test.labels
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert batch["path"] == [str(s.path) for s in test.samples] and batch["class_name"] == ["bottle"] * 4
    train_batch = collate([build_dataset(cfg, "bottle", "train")[i] for i in range(2)])
    assert train_batch["mask"] is None
    mixed = collate([test[0], {**test[1], "mask": None}])
    assert mixed["mask"] is None and mixed["image"].shape == (2, 3, 32, 32)


def test_mpdd_layout(tiny_mvtec: Path, tmp_path: Path) -> None:
    mpdd = tmp_path / "mpdd"
    mpdd.mkdir()
    shutil.move(str(tiny_mvtec / "bottle"), str(mpdd / "tubes"))
    cfg = cfg_for(mpdd, dataset="mpdd")
    test = build_dataset(cfg, "tubes", "test")
    assert len(test) == 4 and sum(test.labels) == 2 and {s.dataset for s in test.samples} == {"mpdd"}
    assert len(build_dataset(cfg, "mpdd:tubes", "train")) == 4
    with pytest.raises(DatasetError, match="tubes") as err:
        build_dataset(cfg, "bottle", "train")  # an MVTec name is not an MPDD class
    assert "bracket_black" in str(err.value)


# --------------------------------------------------------------------------- image decoding


def test_grayscale_palette_rgba_16bit_to_rgb(tmp_path: Path) -> None:
    grey = save(tmp_path / "grey.png", np.full((8, 8), 128, np.uint8))
    x = load_image(grey, 8)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 128 / 255))

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    x = load_image(tmp_path / "pal.png", 8)
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 200, 30]) / 255)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent: the colour is kept, the alpha dropped
    save(tmp_path / "rgba.png", rgba)
    x = load_image(tmp_path / "rgba.png", 8)
    assert torch.allclose(x[:, 3, 3], torch.tensor([200, 100, 50]) / 255)

    # 16-bit: 1000 and 60000 would both clip to 255 in a plain 8-bit conversion; scaled they differ.
    a16 = np.full((8, 8), 60000, np.uint16)
    a16[:, :4] = 1000
    save(tmp_path / "g16.png", a16)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png", 8)
    assert torch.allclose(x[0, 0, 0], torch.tensor(round(1000 / 257) / 255))
    assert torch.allclose(x[0, 0, 7], torch.tensor(round(60000 / 257) / 255))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    full = save(tmp_path / "full16.png", np.full((8, 8), 65535, np.uint16))
    assert torch.allclose(load_image(full, 8), torch.ones(3, 8, 8))

    i32 = Image.fromarray(np.full((8, 8), 30000, np.int32))
    assert i32.mode == "I"
    i32.save(tmp_path / "i32.tif")
    assert torch.allclose(load_image(tmp_path / "i32.tif", 8), torch.full((3, 8, 8), round(30000 / 257) / 255))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    a = np.zeros((8, 16, 3), np.uint8)  # (H, W, 3): wide, left half red, right half blue
    a[:, :8, 0] = 255
    a[:, 8:, 2] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top
    im.save(tmp_path / "rot.png", exif=exif)
    x = load_image(tmp_path / "rot.png", 16)
    assert x[0, :6].min() > 0.9 and x[2, :6].max() < 0.1  # top rows red
    assert x[2, -6:].min() > 0.9 and x[0, -6:].max() < 0.1  # bottom rows blue


def test_load_image_resizes_with_antialiasing(tmp_path: Path) -> None:
    a = np.zeros((64, 64), np.uint8)
    a[:, ::2] = 255  # 1-pixel stripes: an antialiased 4x downscale averages them to mid-grey
    x = load_image(save(tmp_path / "stripes.png", a), 16)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 0.5), atol=0.05)


def test_load_mask_binarises_nonzero(tmp_path: Path) -> None:
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 1  # VisA style 0/k
    m[6, 6] = 255
    x = load_mask(save(tmp_path / "m.png", m), 8)
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert x.sum() == 5 and set(x.unique().tolist()) == {0.0, 1.0}
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0] = (0, 0, 3)  # faint colour: still defect (luma would round it to 0)
    assert load_mask(save(tmp_path / "rgb_mask.png", rgb), 8).sum() == 1
    m16 = np.zeros((8, 8), np.uint16)
    m16[1, 1], m16[2, 2] = 1, 65535
    assert load_mask(save(tmp_path / "m16.png", m16), 8).sum() == 2


# --------------------------------------------------------------------------- error cases


def test_error_root_class_and_unknown(tiny_mvtec: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_root"
    with pytest.raises(DatasetError, match="does not exist") as err:
        build_dataset(cfg_for(missing), "bottle", "train")
    assert str(missing) in str(err.value)

    with pytest.raises(DatasetError) as err:
        build_dataset(cfg_for(tiny_mvtec), "leather", "train")  # a known class without its folder
    assert str(tiny_mvtec / "leather") in str(err.value)

    with pytest.raises(DatasetError, match="unknown mvtec class 'bottel'") as err:
        build_dataset(cfg_for(tiny_mvtec), "bottel", "train")
    assert all(c in str(err.value) for c in MVTEC_CLASSES)
    assert "['bottle', 'grid']" in str(err.value)  # the class folders that are there

    with pytest.raises(DatasetError, match=r"data\.roots\.visa"):
        build_dataset(cfg_for(tiny_mvtec), "visa:candle", "test")
    with pytest.raises(DatasetError, match="data.root is empty"):
        build_dataset(DataConfig(), "bottle", "train")
    with pytest.raises(DatasetError, match="split"):
        build_dataset(cfg_for(tiny_mvtec), "bottle", "val")  # type: ignore[arg-type]


def test_error_empty_training_folder(tiny_mvtec: Path) -> None:
    train_dir = tiny_mvtec / "bottle/train/good"
    for p in train_dir.iterdir():
        p.unlink()
    (train_dir / "notes.txt").write_text("not an image file, ignored")
    (train_dir / "._000.png").write_bytes(b"macOS resource fork, ignored")
    with pytest.raises(DatasetError, match="no image files") as err:
        build_dataset(cfg_for(tiny_mvtec), "bottle", "train")
    assert str(train_dir) in str(err.value)


@pytest.mark.parametrize("kind", ["zero_byte", "not_an_image"])
def test_error_unreadable_image_at_construction(tiny_mvtec: Path, kind: str) -> None:
    bad = tiny_mvtec / "bottle/train/good/001.png"
    bad.write_bytes(b"" if kind == "zero_byte" else b"this is text, not a PNG")
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg_for(tiny_mvtec), "bottle", "train")
    assert str(bad) in str(err.value)
    with pytest.raises(DatasetError) as err:
        load_image(bad, 32)
    assert str(bad) in str(err.value)
    # skip_bad leaves it out and lists it.
    ds = build_dataset(cfg_for(tiny_mvtec, skip_bad=True), "bottle", "train")
    assert len(ds) == 3 and bad not in [s.path for s in ds.samples]
    assert [p for p, _ in ds.skipped] == [bad] and str(bad) in ds.skipped[0][1]


def test_error_truncated_image(tiny_mvtec: Path) -> None:
    bad = tiny_mvtec / "bottle/train/good/002.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header is intact, the pixel data is not
    ds = build_dataset(cfg_for(tiny_mvtec), "bottle", "train")  # header-only checks pass ...
    i = [s.path for s in ds.samples].index(bad)
    with pytest.raises(DatasetError) as err:  # ... the full decode fails, naming the file
        ds[i]
    assert str(bad) in str(err.value)
    ds = build_dataset(cfg_for(tiny_mvtec, skip_bad=True), "bottle", "train")
    assert bad not in [s.path for s in ds.samples] and [p for p, _ in ds.skipped] == [bad]


def test_error_missing_mask(tiny_mvtec: Path) -> None:
    (tiny_mvtec / "bottle/ground_truth/broken/001_mask.png").unlink()
    with pytest.raises(DatasetError, match="no mask") as err:
        build_dataset(cfg_for(tiny_mvtec), "bottle", "test")
    assert str(tiny_mvtec / "bottle/test/broken/001.png") in str(err.value)
    assert len(build_dataset(cfg_for(tiny_mvtec), "bottle", "train")) == 4  # train needs no masks
    shutil.rmtree(tiny_mvtec / "bottle/ground_truth")
    with pytest.raises(DatasetError, match="no mask"):
        build_dataset(cfg_for(tiny_mvtec), "bottle", "test")


def test_error_mask_size_mismatch(tiny_mvtec: Path) -> None:
    mask = tiny_mvtec / "bottle/ground_truth/broken/000_mask.png"
    save(mask, np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match="16x16") as err:
        build_dataset(cfg_for(tiny_mvtec), "bottle", "test")
    assert str(mask) in str(err.value)
    # The load-time check catches it too (e.g. for a dataset assembled by hand).
    image = tiny_mvtec / "bottle/test/broken/000.png"
    ds = ImageDataset([Sample(image, 1, mask, "bottle", "mvtec")], 32, has_masks=True)
    with pytest.raises(DatasetError, match="must have the size of its image") as err:
        ds[0]
    assert str(mask) in str(err.value)


# --------------------------------------------------------------------------- VisA


def write_tiny_visa(root: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        split = "train" if i < 3 else "test"
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save(root / rel, rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        rows.append(["candle", split, "normal", rel, ""])
    for i in range(2):
        rel, mrel = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        save(root / rel, rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        m = np.zeros((24, 32), np.uint8)
        m[4:12, 8:16] = 1 + i  # 0/k masks, as VisA ships them
        save(root / mrel, m)
        rows.append(["candle", "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv/1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa_loader(tmp_path: Path) -> None:
    root = write_tiny_visa(tmp_path / "visa")
    cfg = DataConfig(dataset="mvtec", roots={"visa": str(root)}, image_size=32)
    train = build_dataset(cfg, "visa:candle", "train")
    assert len(train) == 3 and train.labels == [0, 0, 0] and not train.has_masks
    test = build_dataset(cfg, "visa:candle", "test")
    assert len(test) == 3 and sorted(test.labels) == [0, 1, 1] and test.has_masks
    for i, s in enumerate(test.samples):
        item = test[i]
        assert item["image"].shape == (3, 32, 32)
        # (24x32 -> 32x32): rows 4..11 of 24 map to rows 5.3..16 of 32
        assert item["mask"].sum() == (0 if s.label == 0 else 8 * 11)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DatasetError, match="unknown visa class"):
        build_dataset(cfg, "visa:bottle", "test")


def test_visa_errors(tmp_path: Path) -> None:
    root = write_tiny_visa(tmp_path / "visa")
    cfg = DataConfig(dataset="visa", root=str(root), image_size=32)
    csv_path = root / "split_csv/1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("candle/Data/Masks/Anomaly/001.png", ""))
    with pytest.raises(DatasetError, match="has no mask") as err:
        build_dataset(cfg, "candle", "test")
    assert str(root / "candle/Data/Images/Anomaly/001.JPG") in str(err.value)
    csv_path.write_text(text)
    (root / "candle/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError, match="does not exist") as err:
        build_dataset(cfg, "candle", "test")
    assert str(root / "candle/Data/Masks/Anomaly/000.png") in str(err.value)
    csv_path.unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "candle", "train")
    assert str(csv_path) in str(err.value)


# --------------------------------------------------------------------------- generic folders


def write_tiny_folder(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for i in range(3):
        save(root / "widget/train/good" / f"g{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    save(root / "widget/test/good/ok.jpg", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for name in ("scratch.png", "dent.bmp"):
        save(root / "widget/test/defect" / name, rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    m = np.zeros((16, 16), np.uint8)
    m[:4, :4] = 255
    save(root / "widget/masks/scratch_mask.png", m)  # the `_mask` suffix ...
    m[:, :] = 0
    m[8:, 8:] = 255
    save(root / "widget/masks/dent.png", m)  # ... or the bare stem, with another extension
    return root


def test_folder_loader_with_and_without_masks(tmp_path: Path) -> None:
    root = write_tiny_folder(tmp_path / "parts")
    plain = cfg_for(root, dataset="folder", image_size=16)
    assert len(build_dataset(plain, "widget", "train")) == 3
    test = build_dataset(plain, "widget", "test")
    assert not test.has_masks and len(test) == 3 and sorted(test.labels) == [0, 1, 1]
    assert all(test[i]["mask"] is None for i in range(len(test)))

    masked = cfg_for(root, dataset="folder", image_size=16, folder_masks="masks")
    test = build_dataset(masked, "widget", "test")
    assert test.has_masks
    by_name = {s.path.name: test[i] for i, s in enumerate(test.samples)}
    assert by_name["ok.jpg"]["mask"].sum() == 0
    assert by_name["scratch.png"]["mask"][0, :4, :4].all() and by_name["scratch.png"]["mask"].sum() == 16
    assert by_name["dent.bmp"]["mask"][0, 8:, 8:].all() and by_name["dent.bmp"]["mask"].sum() == 64

    (root / "widget/masks/dent.png").unlink()
    with pytest.raises(DatasetError, match="no mask") as err:
        build_dataset(masked, "widget", "test")
    assert str(root / "widget/test/defect/dent.bmp") in str(err.value)
    with pytest.raises(DatasetError) as err:
        build_dataset(plain, "gadget", "train")
    assert str(root / "gadget") in str(err.value)
    with pytest.raises(DatasetError, match="folder_train") as err:
        build_dataset(cfg_for(root, dataset="folder", folder_train="train/ok"), "widget", "train")
    assert str(root / "widget/train/ok") in str(err.value)


def test_folder_layout_with_several_defect_folders_and_a_parallel_mask_tree(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    save(root / "widget/train/good/a.png", img())
    save(root / "widget/test/good/ok.png", img())
    m = np.zeros((16, 16), np.uint8)
    m[2:6, 2:6] = 255
    for kind, names in {"scratch": ("s1.png", "s2.png"), "dent/deep": ("d1.png",)}.items():
        for n in names:
            save(root / "widget/test/defect" / kind / n, img())
            save(root / "widget/ground_truth" / kind / n.replace(".png", "_mask.png"), m)
    test = build_dataset(cfg_for(root, dataset="folder", image_size=16, folder_masks="ground_truth"), "widget", "test")
    by_name = {s.path.name: (s.label, test[i]["mask"]) for i, s in enumerate(test.samples)}
    assert sorted(by_name) == ["d1.png", "ok.png", "s1.png", "s2.png"]
    assert [by_name[n][0] for n in ("d1.png", "s1.png", "s2.png", "ok.png")] == [1, 1, 1, 0]
    assert all(by_name[n][1].sum() == 16 for n in ("d1.png", "s1.png", "s2.png"))
    (root / "widget/ground_truth/dent/deep/d1_mask.png").unlink()
    with pytest.raises(DatasetError, match="no mask") as err:
        build_dataset(cfg_for(root, dataset="folder", image_size=16, folder_masks="ground_truth"), "widget", "test")
    assert str(root / "widget/ground_truth/dent/deep") in str(err.value)


# --------------------------------------------------------------------------- ELPV


def test_elpv_split_rule_on_a_tiny_label_file(tmp_path: Path) -> None:
    """Every third normal image (label-file order) goes to test, all defectives too, 1/3 and 2/3 left out."""
    rng = np.random.default_rng(3)
    lines = []
    probs = [0.0, 1.0, 0.0, 0.0, 1 / 3, 0.0, 0.0, 2 / 3, 0.0, 1.0, 0.0]  # 7 normal, 2 defective
    for i, p in enumerate(probs):
        save(tmp_path / f"elpv/images/cell{i:04d}.png", rng.integers(0, 255, (12, 12), dtype=np.uint8))
        lines.append(f"images/cell{i:04d}.png  {p}  mono")
    save(tmp_path / "elpv/images/cell0099.png", np.zeros((12, 12), np.uint8))
    lines.append("images/cell0099.png  0.0  poly")
    (tmp_path / "elpv/labels.csv").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(roots={"elpv": str(tmp_path / "elpv")}, image_size=32)
    train = build_dataset(cfg, "elpv:mono", "train")
    test = build_dataset(cfg, "elpv:mono", "test")
    normals = [i for i, p in enumerate(probs) if p == 0.0]  # [0, 2, 3, 5, 6, 8, 10]
    assert [int(s.path.stem[4:]) for s in train.samples] == [0, 2, 5, 6, 10]
    assert sorted(int(s.path.stem[4:]) for s in test.samples if s.label == 0) == [normals[2], normals[5]]
    assert sorted(int(s.path.stem[4:]) for s in test.samples if s.label == 1) == [1, 9]
    assert not test.has_masks and test[0]["mask"] is None and test[0]["image"].shape == (3, 32, 32)
    # 1/3 written as 0.33 counts as good: 4 joins the normals [0, 2, 3, 4, 5, 6, 8, 10], shifting the rule.
    cfg = DataConfig(roots={"elpv": str(tmp_path / "elpv")}, elpv_normal=[0.0, 0.33])
    test = build_dataset(cfg, "elpv:mono", "test")
    assert sorted(int(s.path.stem[4:]) for s in test.samples if s.label == 0) == [3, 6]
    same = build_dataset(DataConfig(dataset="elpv", root=str(tmp_path / "elpv")), "mono", "train")
    assert same.samples == train.samples  # data.root serves ELPV when it is data.dataset
    with pytest.raises(DatasetError, match="overlap"):
        build_dataset(DataConfig(roots={"elpv": str(tmp_path / "elpv")}, elpv_defect=[0.0]), "elpv:mono", "test")
    (tmp_path / "elpv/labels.csv").unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "elpv:poly", "train")
    assert str(tmp_path / "elpv/labels.csv") in str(err.value)


ELPV_EXPECTED = {  # type: (train good, test good, test defective), from the package's labels.csv
    "mono": (392, 196, 313),
    "poly": (614, 306, 402),
}


@pytest.mark.parametrize("cell_type", ["mono", "poly"])
def test_elpv_real_split(cell_type: str) -> None:
    try:
        data_dir = package_data_dir()
    except DatasetError as exc:
        pytest.skip(str(exc))
    records = read_labels(data_dir)
    assert len(records) == 2624
    cfg = DataConfig(dataset="mvtec", root="", image_size=32)  # ELPV needs no root
    train = build_dataset(cfg, f"elpv:{cell_type}", "train")
    test = build_dataset(cfg, f"elpv:{cell_type}", "test")
    test_good = [s for s in test.samples if s.label == 0]
    test_bad = [s for s in test.samples if s.label == 1]
    assert (len(train), len(test_good), len(test_bad)) == ELPV_EXPECTED[cell_type]

    # The rule, recomputed independently from the label file.
    of_type = [r for r in records if r.cell_type == cell_type]
    normal = [r.path for r in of_type if r.probability == 0.0]
    assert {s.path for s in test_good} == {p for i, p in enumerate(normal) if i % 3 == 2}
    assert {s.path for s in train.samples} == {p for i, p in enumerate(normal) if i % 3 != 2}
    assert len(test_bad) == sum(r.probability == 1.0 for r in of_type)
    assert not {s.path for s in train.samples} & {s.path for s in test.samples}
    assert all(s.path.is_file() and s.class_name == cell_type and s.mask_path is None for s in test.samples)
    assert not train.has_masks and not test.has_masks
    again = build_dataset(cfg, f"elpv:{cell_type}", "test")
    assert again.samples == test.samples  # deterministic

    item = test[len(test_good)]  # one defective cell, decoded
    assert item["image"].shape == (3, 32, 32) and item["mask"] is None and item["label"] == 1


# --------------------------------------------------------------------------- real MVTec bottle


def test_real_mvtec_bottle(shared_data_dir: Path) -> None:
    root = shared_data_dir / "mvtec_ad"
    if not (root / "bottle").is_dir():
        pytest.skip(f"{root / 'bottle'} is absent")
    cfg = DataConfig(dataset="mvtec", root=str(root), image_size=64)
    train = build_dataset(cfg, "bottle", "train")
    test = build_dataset(cfg, "bottle", "test")
    assert len(train) == 209 and len(test) == 83
    bad = [s for s in test.samples if s.label == 1]
    assert len(bad) == 63 and {s.path.parent.name for s in bad} == {"broken_large", "broken_small", "contamination"}
    for s in bad:
        assert s.mask_path is not None and s.mask_path.stem == s.path.stem + "_mask"
        assert s.mask_path.parent == root / "bottle/ground_truth" / s.path.parent.name
        assert load_mask(s.mask_path, 64).sum() > 0, f"empty mask {s.mask_path}"
    assert all(s.mask_path is None for s in test.samples if s.label == 0)
    i = test.samples.index(bad[0])
    item = test[i]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64) and item["mask"].sum() > 0
    good = test[[s.label for s in test.samples].index(0)]
    assert good["mask"].sum() == 0 and 0.0 <= good["image"].min() and good["image"].max() <= 1.0
    assert train[0]["mask"] is None


def test_mvtec_layout_accepts_a_custom_class_folder(tmp_path: Path) -> None:
    """A user's own product in MVTec layout, under a name that is not one of MVTec's fifteen."""
    root = write_tiny_mvtec(tmp_path / "mine", ("widget",))
    for dataset in ("mvtec", "mpdd"):
        cfg = DataConfig(dataset=dataset, root=str(root), image_size=32)
        train, test = build_dataset(cfg, "widget", "train"), build_dataset(cfg, "widget", "test")
        assert len(train) == 4 and len(test) == 4
        assert sorted(int(test[i]["label"]) for i in range(len(test))) == [0, 0, 1, 1]
        assert all(test[i]["mask"] is not None for i in range(len(test)) if test[i]["label"] == 1)


def test_real_kolektor_reads_as_mvtec_layout(shared_data_dir: Path) -> None:
    root = shared_data_dir / "kolektorsdd"
    if not (root / "kolektor").is_dir():
        pytest.skip(f"{root / 'kolektor'} is absent")
    cfg = DataConfig(dataset="mvtec", root=str(root), image_size=64)
    train, test = build_dataset(cfg, "kolektor", "train"), build_dataset(cfg, "kolektor", "test")
    assert len(train) == 237 and len(test) == 111 + 52
    defect = next(test[i] for i in range(len(test)) if test[i]["label"] == 1)
    assert tuple(defect["image"].shape) == (3, 64, 64) and tuple(defect["mask"].shape) == (1, 64, 64)
    assert float(defect["mask"].sum()) > 0  # the non-square mask is resized with its image
