"""The data layer: image datasets of MVTec AD, MPDD, VisA, ELPV and generic folders.

`build_dataset(cfg.data, "bottle" | "visa:candle" | "elpv:mono", "train" | "test")` gives an
`ImageDataset` whose items are dicts: image (3,S,S) float RGB in [0,1] (not normalised), label 0/1,
mask (1,S,S) in {0,1} or None, path, class_name. `collate` batches them for a DataLoader.
"""
from moleflow.data.build import DATASET_NAMES, build_dataset, known_classes, parse_class_spec
from moleflow.data.elpv import ELPV_CLASSES
from moleflow.data.images import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageDataset,
    Sample,
    collate,
    image_from_bytes,
    image_from_pil,
    is_image_file,
    load_image,
    load_mask,
)
from moleflow.data.mvtec import MPDD_CLASSES, MVTEC_CLASSES
from moleflow.data.visa import VISA_CLASSES

__all__ = [
    "DATASET_NAMES",
    "ELPV_CLASSES",
    "IMAGE_EXTENSIONS",
    "MPDD_CLASSES",
    "MVTEC_CLASSES",
    "VISA_CLASSES",
    "DatasetError",
    "ImageDataset",
    "Sample",
    "build_dataset",
    "collate",
    "image_from_bytes",
    "image_from_pil",
    "is_image_file",
    "known_classes",
    "load_image",
    "load_mask",
    "parse_class_spec",
]
