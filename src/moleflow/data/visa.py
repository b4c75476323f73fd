"""VisA through its official one-class split file ROOT/split_csv/1cls.csv.

Columns: object, split (train|test), label (normal|anomaly), image, mask; paths relative to ROOT, mask
empty for normal images. VisA masks hold 0/k rather than 0/255; `load_mask` binarises with > 0.
"""
from __future__ import annotations

import csv
from pathlib import Path

from moleflow.data.images import DatasetError, Sample

VISA_CLASSES: list[str] = [
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
]

SPLIT_FILE = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def visa_samples(root: Path, class_name: str, split: str, dataset: str = "visa") -> list[Sample]:
    """Samples of one VisA class for `split`, as listed in 1cls.csv, sorted by path."""
    csv_path = root / SPLIT_FILE
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} does not exist (expected ROOT/split_csv/1cls.csv)")
    class_dir = root / class_name
    if not class_dir.is_dir():
        raise DatasetError(f"class folder {class_dir} does not exist (dataset '{dataset}', root {root})")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read VisA split file {csv_path}: {exc}") from None
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"VisA split file {csv_path} lacks column(s) {missing}; expected {list(_COLUMNS)}")

    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if (row["object"] or "").strip() != class_name or (row["split"] or "").strip() != split:
            continue
        where = f"{csv_path} line {line}"
        label_text = (row["label"] or "").strip().lower()
        if label_text not in _LABELS:
            raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}")
        label = _LABELS[label_text]
        image = root / (row["image"] or "").strip()
        if not (row["image"] or "").strip() or not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist")
        mask_text = (row["mask"] or "").strip()
        mask: Path | None = None
        if label == 1:
            if not mask_text:
                raise DatasetError(f"{where}: anomaly image {image} has no mask (empty 'mask' column)")
            mask = root / mask_text
            if not mask.is_file():
                raise DatasetError(f"{where}: mask {mask} of anomaly image {image} does not exist")
        samples.append(Sample(image, label, mask, class_name, dataset))
    if not samples:
        raise DatasetError(f"VisA split file {csv_path} lists no '{split}' images for class '{class_name}'")
    return sorted(samples, key=lambda s: s.path)
