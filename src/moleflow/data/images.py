"""Image and mask decoding, the `Sample` record, `ImageDataset` and `collate`.

Every dataset family (MVTec/MPDD, VisA, ELPV, generic folders) only lists `Sample`s; decoding is the
same for all of them and lives here. Images leave as float RGB in [0, 1] of shape (3, S, S), not
normalised: the backbone normalises with its own statistics, and plots show the image as it is.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

# Suffixes (lower case) that count as image files; anything else in a folder (readme, .DS_Store) is ignored.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# What Pillow raises on broken files varies by format and by how the file is broken (truncated data
# surfaces as OSError, corrupt headers as SyntaxError/struct.error/ValueError, ...). All of them mean
# "this file cannot be read as an image" to the user.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)


class DatasetError(ValueError):
    """A data problem the user can fix; the message names the file or folder and the problem."""


class ImageTooLargeError(DatasetError):
    """An image whose header declares more pixels than the caller accepts (the service answers 413)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 = good, 1 = defective
    mask_path: Path | None  # None: no mask file (good images, or a dataset without masks)
    class_name: str
    dataset: str


def is_image_file(path: Path) -> bool:
    # Dot files are skipped: copies made on macOS carry "._000.png" resource forks that are no images.
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not in sub-folders), sorted by path (deterministic order)."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def index_masks(mask_dir: Path) -> dict[str, Path]:
    """Stem -> mask file for the image files in `mask_dir` ({} if the folder does not exist)."""
    index: dict[str, Path] = {}
    if mask_dir.is_dir():
        for p in list_images(mask_dir):  # sorted, so the choice among extensions is deterministic
            index.setdefault(p.stem, p)
    return index


def find_mask(index: dict[str, Path], image_stem: str) -> Path | None:
    """The mask of an image: STEM_mask.EXT preferred (MVTec naming), else STEM.EXT."""
    return index.get(f"{image_stem}_mask") or index.get(image_stem)


def defect_samples(folder: Path, mask_dir: Path | None, class_name: str, dataset: str) -> list[Sample]:
    """The defective images directly in `folder`, each with its mask from `mask_dir` (None: the layout
    has no masks); a defect image without a mask is a DatasetError naming the image and the folder."""
    index = index_masks(mask_dir) if mask_dir is not None else {}
    samples = []
    for p in list_images(folder):
        mask = find_mask(index, p.stem) if mask_dir is not None else None
        if mask_dir is not None and mask is None:
            raise DatasetError(f"defect image {p} has no mask in {mask_dir}: expected {p.stem}_mask.png or "
                               f"{p.stem}.png (any image extension)")
        samples.append(Sample(p, 1, mask, class_name, dataset))
    return samples


# --------------------------------------------------------------------------- decoding


def _existing_file(path: str | Path, what: str) -> Path:
    """The path, if it is a non-empty file; else a DatasetError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{what} {path} is a folder, not an image file (give its image files; "
                           "`moleflow predict` also takes folders)")
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(f"{what} {path} is empty (0 bytes)")
    return path


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open, fully decode and orient one file; any failure is a DatasetError naming the file."""
    path = _existing_file(path, what)
    try:
        with Image.open(path) as im:
            # load() inside the try: a truncated file only fails when its pixel data is decoded.
            im.load()
            oriented = ImageOps.exif_transpose(im)
            oriented.load()
            return oriented
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None


def _to_rgb8(im: Image.Image, path: Path) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit grey is rescaled to 0..255, never clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0  # 65535 -> 255 exactly
        elif mode == "I" and a.min() >= 0 and a.max() <= 65535:
            a = a / 257.0  # 16-bit PNGs may open as "I" holding 0..65535
        elif mode == "F" and a.min() >= 0 and a.max() <= 1.0:
            a = a * 255.0
        else:  # other ranges: stretch min..max, the only mapping that neither clips nor wraps
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # uint8 (H, W) -> mode L
        return grey.convert("RGB")
    try:
        # L, LA, P (palette), PA, RGBA (alpha dropped), CMYK, YCbCr, 1 (bilevel), ...
        return im.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot convert image {path} (mode {mode}) to RGB: {exc}") from None


def _to_tensor(im: Image.Image, image_size: int, name: str | Path) -> torch.Tensor:
    """A decoded Pillow image -> float RGB (3, S, S) in [0, 1]."""
    rgb = _to_rgb8(im, Path(name))
    # Pillow's BILINEAR widens its filter when shrinking, so downscaling is antialiased.
    rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(rgb, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def _decode_image(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """-> (image (3, S, S) float in [0, 1], original (width, height) after EXIF orientation)."""
    im = _open_decoded(path, "image")
    return _to_tensor(im, image_size, path), im.size


def image_from_pil(im: Image.Image, image_size: int, name: str = "image") -> torch.Tensor:
    """A Pillow image (any mode) as the model's input (3, S, S) in [0, 1], decoded like an image file."""
    if im.width == 0 or im.height == 0:
        raise DatasetError(f"{name} is empty ({im.width} x {im.height} pixels)")
    try:
        im.load()
        oriented = ImageOps.exif_transpose(im)
        oriented.load()
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {name}: {exc.__class__.__name__}: {exc}") from None
    return _to_tensor(oriented, image_size, name)


def image_from_bytes(data: bytes, image_size: int, name: str = "upload", max_pixels: int | None = None) -> torch.Tensor:
    """An encoded image file's bytes (PNG, JPEG, …) as the model's input; DatasetError naming `name`
    when the bytes are empty, not an image, or truncated, and ImageTooLargeError when the header
    declares more than `max_pixels` pixels (None: only Pillow's own decompression-bomb check)."""
    if not data:
        raise DatasetError(f"{name} is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{name} is not an image file ({exc.__class__.__name__}: {exc})") from None
    # Image.open has read the header only: refuse here, before a pixel is decoded. A small file may
    # declare a huge image (12000 x 12000 of one colour is a 440 KB PNG that decodes to 430 MB).
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); "
                                 f"the limit is {max_pixels / 1e6:.1f} megapixels")
    return image_from_pil(im, image_size, name)


def _decode_mask(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """-> (mask (1, S, S) float in {0, 1}, original (width, height) after EXIF orientation)."""
    im = _open_decoded(path, "mask")
    size = im.size
    try:
        if im.mode in ("L", "1") or im.mode.startswith("I") or im.mode == "F":
            defect = np.asarray(im) > 0  # (H, W); for 16/32-bit this avoids the clipping of convert("L")
        else:
            # Colour/palette masks: a pixel is defect when any channel is non-zero (a luma conversion
            # would round faint colours such as (0, 0, 3) down to 0).
            defect = np.asarray(im.convert("RGB")).max(axis=-1) > 0  # (H, W)
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot convert mask {path} (mode {im.mode}) to a binary mask: {exc}") from None
    grey = Image.fromarray(defect.astype(np.uint8) * 255)  # uint8 (H, W) -> mode L
    # NEAREST keeps labels crisp; VisA masks hold 0/k rather than 0/255, hence "> 0" above.
    grey = grey.resize((image_size, image_size), Image.Resampling.NEAREST)
    a = np.asarray(grey) > 0  # (S, S)
    return torch.from_numpy(a.astype(np.float32))[None], size


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Read any image file as float RGB (3, S, S) in [0, 1]; DatasetError naming the file on failure."""
    return _decode_image(Path(path), image_size)[0]


def load_mask(path: str | Path, image_size: int) -> torch.Tensor:
    """Read a mask file as float (1, S, S) in {0, 1} (non-zero -> 1); DatasetError on failure."""
    return _decode_mask(Path(path), image_size)[0]


def header_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file header only (cheap: no pixel decoding). DatasetError if unreadable."""
    path = _existing_file(path, what)
    try:
        with Image.open(path) as im:
            return im.size
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None


def verify_file(path: Path, what: str = "image") -> None:
    """Header plus Pillow's integrity check (chunk CRCs, truncation for PNG) without decoding pixels."""
    header_size(path, what)
    try:
        with Image.open(path) as im:
            im.verify()
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None


def check_mask_matches(image_path: Path, mask_path: Path) -> None:
    """Construction-time check that a mask has its image's size, from headers only.

    A 90-degree EXIF rotation swaps width and height and reading the orientation of a PNG can need a
    full decode, so here a swapped size is tolerated; the exact (oriented) check happens at load time.
    """
    (iw, ih), (mw, mh) = header_size(image_path, "image"), header_size(mask_path, "mask")
    if (iw, ih) != (mw, mh) and (iw, ih) != (mh, mw):
        raise DatasetError(
            f"mask {mask_path} is {mw}x{mh} but its image {image_path} is {iw}x{ih}; "
            "a mask must have the size of its image"
        )


# --------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """A list of samples decoded on access.

    `has_masks` says whether this split has pixel ground truth: then every item carries a mask (all
    zeros for good images); otherwise every item's mask is None (ELPV, training splits, folders
    without masks). `skipped` lists (path, reason) of unreadable files left out with data.skip_bad.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        has_masks: bool,
        skipped: list[tuple[Path, str]] | None = None,
    ) -> None:
        if image_size < 1:
            raise DatasetError(f"image_size must be positive, got {image_size}")
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.has_masks = bool(has_masks)
        self.skipped: list[tuple[Path, str]] = list(skipped or [])

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image, size = _decode_image(s.path, self.image_size)
        mask: torch.Tensor | None = None
        if self.has_masks:
            if s.mask_path is None:
                mask = torch.zeros(1, self.image_size, self.image_size)
            else:
                mask, mask_size = _decode_mask(s.mask_path, self.image_size)
                if mask_size != size:
                    raise DatasetError(
                        f"mask {s.mask_path} is {mask_size[0]}x{mask_size[1]} but its image {s.path} is "
                        f"{size[0]}x{size[1]} (after EXIF orientation); a mask must have the size of its image"
                    )
        return {"image": image, "label": s.label, "mask": mask, "path": str(s.path), "class_name": s.class_name}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of ImageDataset: images (B,3,S,S), labels (B,) long, masks (B,1,S,S) or None."""
    if not batch:
        raise ValueError("collate got an empty batch")
    masks = [b["mask"] for b in batch]
    return {
        "image": torch.stack([b["image"] for b in batch]),  # (B, 3, S, S)
        "label": torch.tensor([int(b["label"]) for b in batch], dtype=torch.long),  # (B,)
        # One missing mask makes the batch mask-less: a partial stack would misalign with the images.
        "mask": None if any(m is None for m in masks) else torch.stack(masks),  # (B, 1, S, S)
        "path": [b["path"] for b in batch],
        "class_name": [b["class_name"] for b in batch],
    }
