"""Class specs ("bottle", "elpv:mono"), root resolution and `build_dataset`."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from moleflow.config import DataConfig
from moleflow.data.elpv import ELPV_CLASSES, elpv_samples
from moleflow.data.folder import folder_samples
from moleflow.data.images import DatasetError, ImageDataset, Sample, check_mask_matches, header_size, verify_file
from moleflow.data.mvtec import MPDD_CLASSES, MVTEC_CLASSES, mvtec_samples
from moleflow.data.visa import VISA_CLASSES, visa_samples

DATASET_NAMES: tuple[str, ...] = ("mvtec", "mpdd", "visa", "elpv", "folder")

_CLASSES: dict[str, list[str]] = {
    "mvtec": MVTEC_CLASSES,
    "mpdd": MPDD_CLASSES,
    "visa": VISA_CLASSES,
    "elpv": ELPV_CLASSES,
    "folder": [],  # any sub-folder of the root
}


def _check_dataset(name: str, where: str) -> None:
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset '{name}' in {where}; known datasets: {list(DATASET_NAMES)}")


def known_classes(dataset: str) -> list[str]:
    """Class names of `dataset` in its canonical order; [] for "folder" (any sub-folder is a class)."""
    _check_dataset(dataset, "known_classes")
    return list(_CLASSES[dataset])


def parse_class_spec(spec: str, default_dataset: str) -> tuple[str, str]:
    """ "elpv:mono" -> ("elpv", "mono"); "bottle" -> (default_dataset, "bottle")."""
    text = str(spec).strip()
    if ":" in text:
        dataset, class_name = (part.strip() for part in text.split(":", 1))
        _check_dataset(dataset, f"class '{spec}'")
    else:
        dataset, class_name = default_dataset, text
        _check_dataset(dataset, f"data.dataset (used for class '{spec}')")
    if not class_name or ":" in class_name:
        raise DatasetError(f"class '{spec}' must look like NAME or DATASET:NAME (e.g. bottle, elpv:mono)")
    return dataset, class_name


def _resolve_root(cfg: DataConfig, dataset: str) -> Path | None:
    """cfg.roots[D], else cfg.root when D is cfg.dataset, else an error naming data.roots.D.

    ELPV needs no root: without one (None) the installed elpv-dataset package's data folder is used;
    a root given for it must hold labels.csv and images/ like that folder.
    """
    if cfg.roots.get(dataset):
        root = Path(cfg.roots[dataset]).expanduser()
        key = f"data.roots.{dataset}"
    elif dataset == cfg.dataset and cfg.root:
        root = Path(cfg.root).expanduser()
        key = "data.root"
    elif dataset == "elpv":
        return None
    elif dataset == cfg.dataset:
        raise DatasetError(f"data.root is empty: set it to the folder holding the {dataset} class folders")
    else:
        raise DatasetError(
            f"no root for dataset '{dataset}': set data.roots.{dataset} to the folder holding its class folders "
            f"(data.root is used for data.dataset = '{cfg.dataset}' only)"
        )
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} ({key}) does not exist or is not a folder")
    return root


def _check_files(samples: list[Sample], skip_bad: bool) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Cheap construction-time checks from file headers.

    Without skip_bad an unreadable image stops here with its path. With skip_bad it is left out and
    listed; Pillow's verify() (chunk CRCs, no pixel decoding) then also catches truncated PNGs.
    A mask problem (missing, unreadable, wrong size) always stops: it is a dataset error, not a bad photo.
    """
    kept: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    for s in samples:
        try:
            if skip_bad:
                verify_file(s.path)
            else:
                header_size(s.path)
        except DatasetError as exc:
            if not skip_bad:
                raise DatasetError(f"{exc}; remove or replace the file, or pass --skip-bad (data.skip_bad=true) to leave "
                                   "unreadable images out") from None
            skipped.append((s.path, str(exc)))
            continue
        if s.mask_path is not None:
            check_mask_matches(s.path, s.mask_path)
        kept.append(s)
    return kept, skipped


def build_dataset(cfg: DataConfig, class_spec: str, split: Literal["train", "test"]) -> ImageDataset:
    """The images of one class for one split, checked and sorted by path."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    dataset, class_name = parse_class_spec(class_spec, cfg.dataset)
    root = _resolve_root(cfg, dataset)
    known = _CLASSES[dataset]
    # MVTec-layout datasets take any class folder that exists (a user's own product, e.g. kolektor);
    # the known names serve named scenarios and the message when a folder is missing.
    open_layout = dataset in ("mvtec", "mpdd") and root is not None and (root / class_name).is_dir()
    if known and class_name not in known and not open_layout:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root is not None else []
        where = f"; class folders in {root}: {present}" if root is not None else ""
        raise DatasetError(
            f"unknown {dataset} class '{class_name}' (from '{class_spec}'): no folder {class_name} in the root"
            f"{where}; known classes: {known}"
        )

    if dataset in ("mvtec", "mpdd"):
        assert root is not None
        samples = mvtec_samples(root, dataset, class_name, split)
        has_masks = split == "test"
    elif dataset == "visa":
        assert root is not None
        samples = visa_samples(root, class_name, split, dataset)
        has_masks = split == "test"
    elif dataset == "elpv":
        samples = elpv_samples(class_name, split, cfg.elpv_normal, cfg.elpv_defect, root, dataset)
        has_masks = False
    else:  # folder
        assert root is not None
        samples = folder_samples(
            root, class_name, split, cfg.folder_train, cfg.folder_test_good, cfg.folder_test_defect,
            cfg.folder_masks, dataset,
        )
        has_masks = split == "test" and bool(cfg.folder_masks.strip())

    samples, skipped = _check_files(samples, cfg.skip_bad)
    if split == "train" and cfg.max_train_images > 0:
        samples = samples[: cfg.max_train_images]
    if not samples:
        raise DatasetError(f"every {split} image of '{class_spec}' is unreadable: " + "; ".join(r for _, r in skipped[:3]))
    return ImageDataset(samples, cfg.image_size, has_masks, skipped)
