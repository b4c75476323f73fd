"""Synthetic defects on good images: CutPaste (Li et al., CVPR 2021), a piece of the image itself.

    good image (3, S, S) ──cut a patch or a thin scar, jitter its brightness, maybe mirror it,
                           paste it elsewhere──► defective image (3, S, S), mask (S, S)

Nothing but the task's own good images is needed (no texture library, no earlier task's images), so a
task can judge its own scoring on defects it made itself (continual/blend_weight.py). The mask keeps only
the pixels the paste visibly changed: a piece of black background pasted on black background is no
defect.
"""
from __future__ import annotations

import math

import torch

KINDS = ("patch", "scar")
_VISIBLE = 0.1  # a pixel counts as defective when a channel moved by more than this (images in [0, 1])


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def cutpaste(image: torch.Tensor, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One defect on image (3, S, S) in [0, 1] -> (defective image (3, S, S), mask (S, S) bool).

    "patch": a rectangle of 0.5–3 % of the image, aspect 0.3–3.3 (a broken part, a contamination);
    "scar": a thin 2–6 × 16–48 px strip at 256 px, scaled with S (a scratch, a crack).
    """
    if kind not in KINDS:
        raise ValueError(f"cutpaste: kind must be one of {KINDS}, got {kind!r}")
    size = image.shape[-1]
    if kind == "patch":
        area = _uniform(g, 0.005, 0.03) * size * size
        aspect = math.exp(_uniform(g, math.log(0.3), math.log(3.3)))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
    else:
        h, w = _uniform(g, 2, 6) * size / 256, _uniform(g, 16, 48) * size / 256
        if _uniform(g, 0, 1) < 0.5:
            h, w = w, h
    h, w = (min(size - 1, max(1, round(v))) for v in (h, w))
    y0, x0, y1, x1 = (int(_uniform(g, 0, size - e)) for e in (h, w, h, w))
    piece = image[:, y0:y0 + h, x0:x0 + w] * _uniform(g, 0.6, 1.4) + _uniform(g, -0.15, 0.15)
    if _uniform(g, 0, 1) < 0.5:
        piece = piece.flip(-1)
    out = image.clone()
    out[:, y1:y1 + h, x1:x1 + w] = piece.clamp(0, 1)
    return out, (out - image).abs().amax(dim=0) > _VISIBLE


def synthetic_defects(images: torch.Tensor, per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) -> (defective images (M, 3, S, S), masks (M, S, S) bool): `per_image` defects of
    each kind per image, seeded, keeping those that changed at least 1/4096 of the image (M ≤ 2·N·per_image)."""
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    out, masks = [], []
    for image in images:
        for kind in KINDS:
            for _ in range(per_image):
                defective, mask = cutpaste(image, kind, g)
                if int(mask.sum()) * 4096 >= size * size:
                    out.append(defective)
                    masks.append(mask)
    if not out:
        return images.new_zeros(0, *images.shape[1:]), torch.zeros(0, size, size, dtype=torch.bool)
    return torch.stack(out), torch.stack(masks)
