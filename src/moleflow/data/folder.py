"""Generic folders: ROOT/CLASS/<train>, ROOT/CLASS/<test_good>, ROOT/CLASS/<test_defect>, optional masks.

The sub-folder names come from the config (data.folder_train, folder_test_good, folder_test_defect,
folder_masks). The defect folder may hold its images directly or in sub-folders, one per defect type
(test/defect/scratch, test/defect/dent, …, at any depth). With data.folder_masks set, the masks lie in a
parallel tree (ground_truth/scratch/…): every defect image needs a mask at the same relative place with
its stem (STEM.EXT or STEM_mask.EXT, any image extension); with it empty the test split has no masks.
"""
from __future__ import annotations

from pathlib import Path

from moleflow.data.images import DatasetError, Sample, defect_samples, list_images


def _sub(class_dir: Path, rel: str, key: str) -> Path:
    if not rel.strip():
        raise DatasetError(f"data.{key} is empty; it must name a folder inside {class_dir}")
    folder = class_dir / rel
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist (data.{key} = {rel!r})")
    return folder


def folder_samples(
    root: Path,
    class_name: str,
    split: str,
    train: str,
    test_good: str,
    test_defect: str,
    masks: str,
    dataset: str = "folder",
) -> list[Sample]:
    """Samples of ROOT/CLASS for `split`, sorted by path."""
    class_dir = root / class_name
    if not class_dir.is_dir():
        raise DatasetError(f"class folder {class_dir} does not exist (dataset '{dataset}', root {root})")
    if split == "train":
        train_dir = _sub(class_dir, train, "folder_train")
        paths = list_images(train_dir)
        if not paths:
            raise DatasetError(f"training folder {train_dir} holds no image files")
        return [Sample(p, 0, None, class_name, dataset) for p in paths]

    good_dir = _sub(class_dir, test_good, "folder_test_good")
    defect_dir = _sub(class_dir, test_defect, "folder_test_defect")
    samples = [Sample(p, 0, None, class_name, dataset) for p in list_images(good_dir)]
    mask_dir = _sub(class_dir, masks, "folder_masks") if masks.strip() else None
    for folder in [defect_dir, *sorted(p for p in defect_dir.rglob("*") if p.is_dir())]:  # one per defect type
        rel = folder.relative_to(defect_dir)
        samples += defect_samples(folder, None if mask_dir is None else mask_dir / rel, class_name, dataset)
    if not samples:
        raise DatasetError(f"no test images in {good_dir} or {defect_dir}")
    return sorted(samples, key=lambda s: s.path)
