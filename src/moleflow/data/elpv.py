"""ELPV solar cells from the installed `elpv-dataset` package (module `elpv_dataset`).

The package ships data/labels.csv (whitespace separated: `images/cellNNNN.png  probability  type`)
and data/images/*.png (300x300 greyscale). We read its files by path; nothing is downloaded. A root
set for ELPV (data.roots.elpv, or data.root with data.dataset = elpv) replaces that data folder.
Classes are the cell types `mono` and `poly`. There is no official split and no masks, so:
  normal    = defect probability in cfg.elpv_normal (default [0.0]),
  defective = defect probability in cfg.elpv_defect (default [1.0]), the other images are left out;
  the normal images of a type, in label-file order, go to test when their position i % 3 == 2
  (every third one), to train otherwise; every defective image of the type goes to test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moleflow.data.images import DatasetError, Sample

ELPV_CLASSES: list[str] = ["mono", "poly"]
LABEL_FILE = "labels.csv"
# Probabilities in the label file are 0, 1/3, 2/3 and 1: a config may say 0.33 for 1/3.
PROB_TOLERANCE = 0.01


@dataclass(frozen=True)
class ElpvRecord:
    index: int  # position in the label file
    path: Path
    probability: float
    cell_type: str


def package_data_dir() -> Path:
    """The data/ folder of the installed elpv-dataset package."""
    try:
        import elpv_dataset
    except ImportError:
        raise DatasetError(
            "ELPV needs the package 'elpv-dataset' (pip install elpv-dataset), or data.roots.elpv set to "
            "a folder holding labels.csv and images/"
        ) from None
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def read_labels(data_dir: Path) -> list[ElpvRecord]:
    label_file = data_dir / LABEL_FILE
    if not label_file.is_file():
        raise DatasetError(f"ELPV label file {label_file} does not exist")
    records: list[ElpvRecord] = []
    for line_no, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rel, prob, cell_type = parts
            probability = float(prob)
        except ValueError:
            raise DatasetError(
                f"{label_file} line {line_no}: expected 'path probability type', got {line.strip()!r}"
            ) from None
        records.append(ElpvRecord(len(records), data_dir / rel, probability, cell_type))
    return records


def _matches(p: float, wanted: list[float]) -> bool:
    return any(math.isclose(p, w, rel_tol=0.0, abs_tol=PROB_TOLERANCE) for w in wanted)


def elpv_split(
    records: list[ElpvRecord], cell_type: str, normal: list[float], defect: list[float]
) -> tuple[list[ElpvRecord], list[ElpvRecord], list[ElpvRecord]]:
    """-> (train good, test good, test defective) records of one cell type, each in label-file order."""
    both = [w for w in normal if _matches(w, defect)]
    if both:
        raise DatasetError(
            f"data.elpv_normal {normal} and data.elpv_defect {defect} overlap at {both}: "
            "an image cannot be both good and defective"
        )
    of_type = [r for r in records if r.cell_type == cell_type]
    goods = sorted((r for r in of_type if _matches(r.probability, normal)), key=lambda r: r.index)
    defects = [r for r in of_type if _matches(r.probability, defect)]
    train = [r for i, r in enumerate(goods) if i % 3 != 2]
    test_good = [r for i, r in enumerate(goods) if i % 3 == 2]
    return train, test_good, defects


def elpv_samples(
    class_name: str,
    split: str,
    normal: list[float],
    defect: list[float],
    data_dir: Path | None = None,
    dataset: str = "elpv",
) -> list[Sample]:
    """Samples of one cell type (`mono` / `poly`) for `split`, sorted by path."""
    data_dir = package_data_dir() if data_dir is None else data_dir
    records = read_labels(data_dir)
    train, test_good, defects = elpv_split(records, class_name, normal, defect)
    if split == "train":
        if not train:
            raise DatasetError(
                f"ELPV ({data_dir / LABEL_FILE}) has no training images of type '{class_name}' "
                f"with a defect probability in data.elpv_normal {normal}"
            )
        samples = [Sample(r.path, 0, None, class_name, dataset) for r in train]
    else:
        samples = [Sample(r.path, 0, None, class_name, dataset) for r in test_good]
        samples += [Sample(r.path, 1, None, class_name, dataset) for r in defects]
        if not samples:
            raise DatasetError(f"ELPV ({data_dir / LABEL_FILE}) has no test images of type '{class_name}'")
    return sorted(samples, key=lambda s: s.path)
