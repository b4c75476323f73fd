"""The feature cache: the backbone is frozen, so each image's features are computed once per run.

`extract_features` runs the `FeatureExtractor` over a dataset and keeps the result in memory as a
`FeatureSet` that every epoch and the evaluation reuse. With a cache folder, each image's patches and
descriptor are also stored as float16 safetensors under ``cache_dir/<key[:2]>/<key>.safetensors``, where
the key hashes the backbone identity together with the image file's bytes: a later run (or a later task
that sees the same image) loads them without running the backbone, and an edited image or a different
backbone setting can never hit a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from moleflow.features.backbone import FeatureExtractor
from moleflow.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from moleflow.data import ImageDataset

FLOAT16_MAX = 65504.0


class FeatureError(RuntimeError):
    """Features that cannot be used or stored (non-finite values, float16 overflow); names the image."""


@dataclass
class FeatureSet:
    patches: torch.Tensor  # (N, H, W, C) float32 (float16 storage allowed: call .float() on use)
    descriptors: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) long
    masks: torch.Tensor | None  # (N, 1, S, S) bool at image size; None when the dataset has no masks
    paths: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> FeatureSet:
        """The items at `idx` (integer indices in any order, or a boolean mask of length N)."""
        index = torch.as_tensor(idx)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean subset mask has shape {tuple(index.shape)}, expected ({len(self)},)")
            index = index.nonzero().flatten()
        index = index.long().flatten()
        rows = index.tolist()
        return FeatureSet(
            patches=self.patches[index],
            descriptors=self.descriptors[index],
            labels=self.labels[index],
            masks=None if self.masks is None else self.masks[index],
            paths=[self.paths[i] for i in rows],
            class_names=[self.class_names[i] for i in rows],
        )

    @staticmethod
    def concat(sets: list[FeatureSet]) -> FeatureSet:
        """One set holding `sets` in order; masks are None if any part has none."""
        if not sets:
            raise ValueError("FeatureSet.concat needs at least one FeatureSet")
        shapes = {tuple(s.patches.shape[1:]) for s in sets}
        if len(shapes) > 1:
            raise ValueError(f"cannot concatenate FeatureSets with different patch shapes (H, W, C): {sorted(shapes)}")
        no_masks = any(s.masks is None for s in sets)
        return FeatureSet(
            patches=torch.cat([s.patches for s in sets]),
            descriptors=torch.cat([s.descriptors for s in sets]),
            labels=torch.cat([s.labels for s in sets]),
            masks=None if no_masks else torch.cat([s.masks for s in sets]),
            paths=[p for s in sets for p in s.paths],
            class_names=[c for s in sets for c in s.class_names],
        )


def cache_key(extractor_identity: dict, image_path: str | Path) -> str:
    """sha256 over the backbone identity (canonical JSON) and the image file's content (not its name)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(extractor_identity, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    digest.update(b"\0")
    with open(image_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.safetensors"


def _check_finite(patches: torch.Tensor, descriptor: torch.Tensor, path: str) -> None:
    if not (torch.isfinite(patches).all() and torch.isfinite(descriptor).all()):
        raise FeatureError(
            f"the backbone gave non-finite features (NaN or inf) for image {path}; check the image file and the "
            "backbone weights"
        )


def _to_float16(patches: torch.Tensor, descriptor: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 copies for the disk cache; values beyond float16's range are an error, never a silent inf."""
    peak = max(float(patches.abs().max()), float(descriptor.abs().max()))
    if peak > FLOAT16_MAX:
        raise FeatureError(
            f"features of image {path} reach |{peak:.4g}| > {FLOAT16_MAX:g}, beyond float16: they cannot be cached on "
            "disk; set backbone.cache_dir to '' (in-memory float32 only)"
        )
    return patches.half(), descriptor.half()


def _load_cached(file: Path, grid: tuple[int, int], channels: int, desc_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(patches (H,W,C), descriptor (D,)) float16 from a cache file, or None if absent or unusable."""
    if not file.is_file():
        return None
    try:
        tensors = load_file(str(file))
        patches, descriptor = tensors["patches"], tensors["descriptor"]
    except (SafetensorError, KeyError, OSError) as exc:
        warnings.warn(f"feature cache file {file} is unreadable ({exc}); recomputing it", stacklevel=3)
        return None
    if tuple(patches.shape) != (*grid, channels) or tuple(descriptor.shape) != (desc_dim,):
        warnings.warn(f"feature cache file {file} has unexpected shapes; recomputing it", stacklevel=3)
        return None
    return patches, descriptor


@dataclass
class _Out:
    """The tensors `extract_features` fills, image by image."""

    patches: torch.Tensor  # (N, H, W, C)
    descriptors: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


def _cached_or_todo(out: _Out, items: list[dict], start: int, cache: Path | None, identity: dict | None,
                    shape: tuple[int, int, int, int]) -> tuple[list[int], list[str | None]]:
    """Record each item's label, mask, path and class; fill cached features. Returns the positions in
    `items` that need the backbone and each item's cache key (None: not cached on disk)."""
    h, w, c, d = shape
    todo: list[int] = []
    keys: list[str | None] = []
    for j, item in enumerate(items):
        i = start + j
        path = str(item["path"])
        out.labels[i] = int(item["label"])
        mask = item["mask"]
        # Masks arrive as {0,1} floats (or 0/255 integers): anything above one half is a defect pixel.
        out.masks.append(mask if mask is None or mask.dtype == torch.bool else mask > 0.5)
        out.paths.append(path)
        out.class_names.append(str(item["class_name"]))
        key = None
        if cache is not None:
            try:
                key = cache_key(identity, path)
            except OSError as exc:  # the image did not come from a readable file: keep it in memory only
                warnings.warn(f"cannot hash image file {path} ({exc}); its features are not cached on disk", stacklevel=3)
        keys.append(key)
        hit = _load_cached(_cache_file(cache, key), (h, w), c, d) if key is not None else None
        if hit is None:
            todo.append(j)
        else:
            out.patches[i], out.descriptors[i] = hit[0].float(), hit[1].float()
    return todo, keys


def _compute(out: _Out, extractor: FeatureExtractor, items: list[dict], start: int, todo: list[int],
             keys: list[str | None], cache: Path | None, shape: tuple[int, int, int, int]) -> None:
    """Run the backbone on items `todo`, check the features, store them (float16-rounded when cached)."""
    h, w, c, d = shape
    images = torch.stack([items[j]["image"] for j in todo])  # (b, 3, S, S)
    p, g = extractor(images)  # (b, H, W, C), (b, D)
    p, g = p.detach().float().cpu(), g.detach().float().cpu()
    if tuple(p.shape[1:]) != (h, w, c) or tuple(g.shape[1:]) != (d,):
        raise FeatureError(
            f"the backbone gave features {tuple(p.shape[1:])} for images {tuple(images.shape[1:])} "
            f"(first: {out.paths[start + todo[0]]}), expected {(h, w, c)}: the dataset's image size must be "
            "the one the extractor was built for"
        )
    for k, j in enumerate(todo):
        i, path = start + j, out.paths[start + j]
        _check_finite(p[k], g[k], path)
        if cache is not None:
            ph, gh = _to_float16(p[k], g[k], path)
            if keys[j] is not None:
                data = save({"patches": ph.contiguous(), "descriptor": gh.contiguous()})
                atomic_write_bytes(_cache_file(cache, keys[j]), data)
            out.patches[i], out.descriptors[i] = ph.float(), gh.float()
        else:
            out.patches[i], out.descriptors[i] = p[k], g[k]


def _stack_masks(masks: list[torch.Tensor | None], paths: list[str], desc: str) -> torch.Tensor | None:
    """(N, 1, S, S) bool when every image has a mask, None when none has; a mix is an error."""
    present = [m is not None for m in masks]
    if all(present):
        return torch.stack(masks)
    if any(present):
        missing = paths[present.index(False)]
        raise ValueError(f"extract_features ({desc}): the dataset gives masks for some images but not for {missing}")
    return None


def extract_features(
    extractor: FeatureExtractor,
    dataset: ImageDataset,
    *,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Features of every item of `dataset` (an `ImageDataset`: items are dicts with image (3,S,S) in
    [0,1], label, mask (1,S,S) or None, path, class_name), in dataset order.

    With `cache_dir`, cached images skip the backbone, new ones are written there; the returned values
    are then the float16-rounded ones in both cases, so a first run and a cached rerun see identical
    features.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"extract_features ({desc}): the dataset is empty")
    cache = Path(cache_dir) if cache_dir else None
    identity = extractor.identity() if cache is not None else None
    h, w = extractor.grid
    shape = (h, w, extractor.out_channels, extractor.desc_dim)
    out = _Out(torch.empty(n, h, w, shape[2], dtype=torch.float32), torch.empty(n, shape[3], dtype=torch.float32),
               torch.empty(n, dtype=torch.long))
    with tqdm(total=n, desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            todo, keys = _cached_or_todo(out, items, start, cache, identity, shape)
            if todo:
                _compute(out, extractor, items, start, todo, keys, cache, shape)
            bar.update(len(items))
    return FeatureSet(out.patches, out.descriptors, out.labels, _stack_masks(out.masks, out.paths, desc), out.paths, out.class_names)
