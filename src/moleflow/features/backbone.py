"""The frozen feature extractor: a timm backbone, multi-scale merged patch features, image descriptors.

Any timm model that supports ``features_only=True`` can be used; ``cfg.layers`` are timm ``out_indices``
(for ResNets index 0 is the stem, so ``[2, 3]`` is layer2 + layer3; for EfficientNets index ``i`` is the
end of the stage with reduction ``2**(i+1)``). Channel counts and strides come from timm's
``feature_info``, never from a table here.

Weights (``cfg.weights``: auto, a file, or none) are loaded by ``features/weights.py``.
"""
from __future__ import annotations

import json
import re

import timm
import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import BackboneConfig
from moleflow.features.weights import BackboneError, create_classifier, create_loaded, sha256_file

# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``; ``cuda``; ``cuda:N``."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise BackboneError(f"device '{name}' is not understood; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BackboneError(
            f"device '{name}' asks for CUDA, but torch sees no CUDA device here; use device 'cpu' or 'auto'"
        )
    index = int(match.group(1)) if match.group(1) is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise BackboneError(f"device '{name}' does not exist: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


# What `image_descriptors` computes; part of the extractor identity (feature cache keys, saved models).
DESCRIPTOR = "mean+log_rms of the merged-grid average"


def image_descriptors(patches: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, 2C): per channel, the mean over the patches and the log of their root mean square.

    The mean is the notes' descriptor. The log RMS, ½·log(mean² + variance), adds how much each channel
    varies over the image (texture) to its level (colour, brightness). A defect covers a minority of the
    patches and moves the mean along directions in which the product's good images hardly vary; it
    changes the RMS far less (docs/localization.md, routing).
    """
    flat = patches.flatten(1, 2)  # (B, H·W, C)
    return torch.cat([flat.mean(dim=1), 0.5 * torch.log(flat.pow(2).mean(dim=1) + 1e-8)], dim=1)


class FeatureExtractor(nn.Module):
    """Frozen timm backbone -> merged multi-scale patch features (B,H,W,C) and descriptors (B,D).

    Images come in as RGB floats in [0, 1]; the extractor normalises them with the backbone's own
    ImageNet mean/std. Deeper maps are upsampled (bilinear) to the grid of the first chosen layer,
    concatenated, averaged over a local k x k neighbourhood (``cfg.local_avg_at``: each layer on its own grid
    before the upsampling, or the merged grid after it) and optionally pooled over channels to
    ``cfg.embed_dim`` (parameter free). The descriptor holds the mean and log RMS of the merged-grid average
    (the patches themselves with ``local_avg_at: merged``).
    """

    def __init__(self, cfg: BackboneConfig, image_size: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = int(image_size)
        self.layers = [int(i) for i in cfg.layers]
        if not self.layers or any(a >= b for a, b in zip(self.layers, self.layers[1:])):
            # timm returns the maps in index order; the first (shallowest) one sets the patch grid.
            raise BackboneError(f"backbone.layers must be a non-empty increasing list of timm out_indices, got {self.layers}")
        device = resolve_device(device) if isinstance(device, str) else device

        trunk = self._load_trunk(cfg)
        # The digest, not the path, identifies the weights: a moved file keeps its feature cache.
        self.weights_sha256 = sha256_file(self.weights_path) if self.weights_path is not None else None

        # The image statistics the weights were trained with (ImageNet's, or 0.5/0.5 for the TF ports).
        pretrained_cfg = dict(getattr(trunk, "pretrained_cfg", None) or timm.models.get_pretrained_cfg(cfg.name).to_dict())
        mean, std = pretrained_cfg["mean"], pretrained_cfg["std"]
        # Hub weights have no file digest here; their tag (e.g. "racm_in1k") at least names the set.
        self.weights_tag: str | None = pretrained_cfg.get("tag") if self.weights_source == "timm-hub" else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        trunk.eval()
        for p in trunk.parameters():
            p.requires_grad_(False)
        self.trunk = trunk
        self.layer_channels: list[int] = list(trunk.feature_info.channels())
        self.layer_strides: list[int] = list(trunk.feature_info.reduction())
        merged = sum(self.layer_channels)
        if cfg.embed_dim > merged:
            raise BackboneError(
                f"backbone.embed_dim {cfg.embed_dim} exceeds the {merged} channels of {cfg.name} layers {self.layers}; "
                f"use 0 (keep all) or a value <= {merged}"
            )
        self.merged_channels = merged
        self.out_channels: int = cfg.embed_dim if cfg.embed_dim > 0 else merged
        # Descriptor = [mean over patches (C), log RMS over patches (C)]; the router picks its part.
        self.desc_dim: int = 2 * self.out_channels
        self.channels_last = bool(cfg.channels_last)
        self.to(device)
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)

        self.grid: tuple[int, int] = self._probe_grid(cfg, device)
        self._identity_cache: dict | None = None

    def _load_trunk(self, cfg: BackboneConfig) -> nn.Module:
        """The features-only trunk with its weights; sets weights_source and weights_path."""
        if cfg.weights == "none":
            if not timm.is_model(cfg.name):
                raise BackboneError(f"backbone.name '{cfg.name}' is not a timm model (see timm.list_models())")
            # Seeded, so that "random" names one fixed set of weights (the feature cache relies on it).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                trunk = self._create_trunk(cfg)
            self.weights_source, self.weights_path = "random", None
            return trunk
        full, self.weights_source, self.weights_path = create_classifier(cfg.name, cfg.weights)
        # The features-only trunk is a subset of the classifier's modules under the same names: it
        # takes its tensors from the strictly loaded classifier, and must find every one of them.
        return self._create_trunk(cfg, full.state_dict())

    def _probe_grid(self, cfg: BackboneConfig, device: torch.device) -> tuple[int, int]:
        """The exact grid of the first layer at this image size (padding rules differ between models, so
        run one image rather than guessing from the stride); checks feature_info's channel counts."""
        try:
            with torch.no_grad():
                maps = self.trunk(self._prepare(torch.zeros(1, 3, self.image_size, self.image_size, device=device)))
        except RuntimeError as exc:
            raise BackboneError(
                f"backbone {cfg.name} layers {self.layers} cannot run on {self.image_size} px images: {exc}"
            ) from exc
        for m, c in zip(maps, self.layer_channels):
            if m.shape[1] != c:
                raise BackboneError(f"backbone {cfg.name}: feature_info says {c} channels, the trunk gives {m.shape[1]}")
        grid = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
        if min(grid) < 1:
            raise BackboneError(f"image size {self.image_size} is too small for backbone {cfg.name} layers {self.layers}")
        return grid

    def _create_trunk(self, cfg: BackboneConfig, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        kwargs = {"features_only": True, "out_indices": self.layers}
        try:
            if state is None:
                return timm.create_model(cfg.name, pretrained=False, **kwargs)
            return create_loaded(cfg.name, state, f"backbone {cfg.name} trunk", subset=True, **kwargs)
        except BackboneError:
            raise
        except Exception as exc:  # noqa: BLE001 - timm raises assorted types for bad out_indices
            raise BackboneError(f"backbone {cfg.name} cannot give features for backbone.layers {self.layers}: {exc}") from exc

    # The trunk stays in eval mode whatever the caller does: BatchNorm statistics must never move.
    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.trunk.eval()
        return self

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.device, torch.float32) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,S,S) RGB in [0,1] -> patches (B,H,W,C) float32, descriptors (B,D) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"FeatureExtractor expects images of shape (B,3,S,S), got {tuple(images.shape)}")
        maps = [m.float() for m in self.trunk(self._prepare(images))]  # list of (B, C_l, H_l, W_l)
        k = self.cfg.local_avg
        # The merged-grid average: the seeds' patch features, and the descriptor's source in both modes.
        # count_include_pad=False keeps borders unbiased.
        merged = self._merge(maps)  # (B, C_merged, H, W)
        if k > 1:
            merged = F.avg_pool2d(merged, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        descriptors = image_descriptors(self._project(merged))  # (B, 2C)
        if k > 1 and self.cfg.local_avg_at == "layer":
            # PatchCore's neighbourhood aggregation: each layer on its own grid, zero padding (a border
            # patch is averaged with zeros). On a deeper, coarser layer the window spans a wider context
            # than the same window after upsampling; docs/localization.md measures +0.014 pixel AUROC
            # (transistor) and +0.10 (kolektor) for a nearest neighbour over these features. The
            # descriptor stays that of the merged-grid average: computed from these patches, ELPV mono
            # cells were routed right 0.972 instead of 0.992 (the zero-padded borders enter every
            # channel's RMS).
            patches = self._project(self._merge([F.avg_pool2d(m, kernel_size=k, stride=1, padding=k // 2) for m in maps]))
        else:
            patches = self._project(merged)
        return patches, descriptors

    def _merge(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer maps -> (B, C_merged, H, W): deeper maps upsampled (bilinear) to the first one's grid."""
        h, w = maps[0].shape[-2:]
        return torch.cat([maps[0]] + [F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps[1:]], dim=1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_merged, H, W) -> patches (B, H, W, C), channel-pooled to embed_dim when asked."""
        b, _, h, w = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C_merged)
        if self.cfg.embed_dim > 0 and self.cfg.embed_dim != self.merged_channels:
            # Fixed projection: average neighbouring channels down to embed_dim (no parameters to learn).
            x = F.adaptive_avg_pool1d(x.reshape(-1, 1, self.merged_channels), self.cfg.embed_dim)
            x = x.reshape(b, h, w, self.cfg.embed_dim)  # (B, H, W, C)
        return x.contiguous().float()

    def identity(self) -> dict:
        """What determines the features: used as the feature-cache key and recorded with results."""
        if self._identity_cache is None:
            self._identity_cache = {
                "name": self.cfg.name,
                "layers": list(self.layers),
                "image_size": self.image_size,
                "embed_dim": int(self.cfg.embed_dim),
                "local_avg": int(self.cfg.local_avg),
                "local_avg_at": self.cfg.local_avg_at,
                "descriptor": DESCRIPTOR,
                "out_channels": int(self.out_channels),
                "grid": list(self.grid),
                "weights": self.weights_source,
                "weights_sha256": self.weights_sha256,
            }
            if self.weights_tag is not None:
                self._identity_cache["weights_tag"] = self.weights_tag
            json.dumps(self._identity_cache)  # must stay JSON-able
        return dict(self._identity_cache)
