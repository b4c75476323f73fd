"""MVTec AD and MPDD: ROOT/CLASS/{train/good, test/<defect|good>, ground_truth/<defect>/NNN_mask.png}."""
from __future__ import annotations

from pathlib import Path

from moleflow.data.images import DatasetError, Sample, defect_samples, list_images

# The "original" order of the research notes (also the default class order of scenarios).
MVTEC_CLASSES: list[str] = [
    "leather", "grid", "transistor", "carpet", "zipper", "hazelnut", "toothbrush", "metal_nut",
    "screw", "wood", "tile", "capsule", "pill", "cable", "bottle",
]
MPDD_CLASSES: list[str] = [
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
]

GOOD = "good"


def mvtec_samples(root: Path, dataset: str, class_name: str, split: str) -> list[Sample]:
    """Samples of one class of an MVTec-layout dataset (MVTec AD, MPDD), sorted by path.

    Test defect images get the mask ground_truth/<defect>/<stem>_mask.<ext> (or <stem>.<ext>); good
    test images get none (an all-zero mask at load time). A defect image without a mask is an error.
    """
    class_dir = root / class_name
    if not class_dir.is_dir():
        raise DatasetError(f"class folder {class_dir} does not exist (dataset '{dataset}', root {root})")
    if split == "train":
        train_dir = class_dir / "train" / GOOD
        if not train_dir.is_dir():
            raise DatasetError(f"training folder {train_dir} does not exist")
        paths = list_images(train_dir)
        if not paths:
            raise DatasetError(f"training folder {train_dir} holds no image files")
        return [Sample(p, 0, None, class_name, dataset) for p in paths]

    test_dir = class_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"test folder {test_dir} does not exist")
    samples: list[Sample] = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        if sub.name == GOOD:
            samples += [Sample(p, 0, None, class_name, dataset) for p in list_images(sub)]
            continue
        samples += defect_samples(sub, class_dir / "ground_truth" / sub.name, class_name, dataset)
    if not samples:
        raise DatasetError(f"test folder {test_dir} holds no image files in its sub-folders")
    return sorted(samples, key=lambda s: s.path)
