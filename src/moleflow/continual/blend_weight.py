"""Each task's memory weight in the blend, chosen from synthetic defects on its own training images.

    32 training images ──CutPaste (data/synthetic.py)──► defective copies + masks
        ──backbone──► patches ──task t: ‖z‖ / m_z, d / m_d──► for each w of scoring.memory_weights:
        maps of (1 − w)·‖z‖ + w·d ──► mean of pixel AUROC and AUPRO ──► the best w, stored with the task

Why per task: how much the flow adds to the nearest-patch distance depends on the product. On the
acceptance run's real defects, bottle maps best with the memory alone (w = 1) and KolektorSDD with a
share of the flow (docs/localization.md). The synthetic defects need only the task's own good images
(no replay). Measured there (benchmarks/blend_weight.py): they rank the weights as the real defects do
on bottle; on KolektorSDD and transistor they favour the flow more than the real defects do, hence the
candidates' floor of 0.8 in the config.
The images are the ones that set the memory's medians (`scale_sample`); they are in sample for both
parts, like those medians.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moleflow.config import ScoringConfig
from moleflow.data.images import load_image
from moleflow.data.synthetic import synthetic_defects
from moleflow.features.backbone import FeatureExtractor
from moleflow.metrics import aupro, pixel_auroc
from moleflow.model.memory import scale_sample
from moleflow.model.mole_flow import MoLEFlow
from moleflow.scoring import anomaly_map, blend_parts


@dataclass(frozen=True)
class BlendChoice:
    weight: float  # the chosen memory weight (the fallback when no defect could be made)
    weights: tuple[float, ...]  # the candidates, as tried
    quality: tuple[float, ...]  # per candidate: mean of pixel AUROC and AUPRO on the synthetic defects
    n_defects: int  # synthetic defective images they were measured on


def choose_memory_weight(model: MoLEFlow, extractor: FeatureExtractor, t: int, paths: list[str], image_size: int,
                         cfg: ScoringConfig, seed: int, batch_size: int = 16) -> BlendChoice:
    """Task t's best memory weight of `cfg.memory_weights` on CutPaste defects of (up to 32 of) its
    training images `paths` (two of each kind per image, seeded) and the clean images themselves."""
    hosts = torch.stack([load_image(paths[i], image_size) for i in scale_sample(len(paths)).tolist()])
    defective, masks = synthetic_defects(hosts, per_image=2, seed=seed)  # (M, 3, S, S), (M, S, S)
    weights = tuple(cfg.memory_weights)
    if len(defective) == 0:  # featureless images: no paste is visible, nothing to judge by
        return BlendChoice(cfg.memory_weight, weights, (), 0)
    images = torch.cat([hosts, defective])
    truth = torch.cat([torch.zeros(len(hosts), *masks.shape[1:], dtype=torch.bool), masks]).numpy()
    device = next(model.parameters()).device
    flow, near = [], []
    model.eval()
    with torch.no_grad(), model.use_task(t):
        for s in range(0, len(images), batch_size):
            x, _ = extractor(images[s:s + batch_size].to(device))  # (b, H, W, C)
            parts = blend_parts(model, x)  # (b, H, W) each
            flow.append(parts[0].cpu())
            near.append(parts[1].cpu())
    quality = blend_quality(torch.cat(flow), torch.cat(near), truth, weights, image_size, cfg.blur_sigma)
    best = max(range(len(weights)), key=lambda i: (quality[i], weights[i]))  # a tie goes to the memory
    return BlendChoice(weights[best], weights, quality, len(defective))


def blend_quality(flow: torch.Tensor, near: torch.Tensor, truth: np.ndarray, weights: tuple[float, ...],
                  image_size: int, sigma: float) -> tuple[float, ...]:
    """Per weight w: the mean of pixel AUROC and AUPRO of the maps of (1 − w)·flow + w·near (each (N, H, W),
    in training medians) against the masks `truth` (N, S, S)."""
    quality = []
    for w in weights:
        maps = anomaly_map((1 - w) * flow + w * near, image_size, sigma).numpy()  # (N, S, S)
        quality.append(float(np.mean([pixel_auroc(truth, maps), aupro(truth, maps)])))
    return tuple(quality)
