"""One experiment = one YAML file = one `Config`.

Nested dataclasses, loaded strictly: an unknown key or a value of the wrong type is a `ConfigError`
that names the dotted key. Command-line overrides use dotted keys (`train.lr=1e-4`); their values
are parsed as YAML scalars/lists, so `scenario.tasks=[[bottle],[elpv:mono]]` works too.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key and says how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mvtec"  # mvtec | mpdd | visa | elpv | folder: the dataset of plain class names
    root: str = ""  # folder holding the class folders (not needed for elpv)
    # Per-dataset roots for class names written "dataset:class" (e.g. {visa: /data/VisA}).
    roots: dict[str, str] = field(default_factory=dict)
    image_size: int = 256
    # ELPV: defect probabilities counted as good / defective; the others are left out.
    elpv_normal: list[float] = field(default_factory=lambda: [0.0])
    elpv_defect: list[float] = field(default_factory=lambda: [1.0])
    # Generic folder layout, relative to root/<class>: training goods, test goods, test defects, masks.
    folder_train: str = "train/good"
    folder_test_good: str = "test/good"
    folder_test_defect: str = "test/defect"
    folder_masks: str = ""  # "" = no masks; else masks named like the defect images
    skip_bad: bool = False  # skip unreadable images (listed in the results) instead of stopping
    max_train_images: int = 0  # 0 = all; >0 keeps the first N (sorted) for quick runs


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"  # any timm model with features_only
    layers: list[int] = field(default_factory=lambda: [2, 3])  # timm out_indices; first sets the grid
    weights: str = "auto"  # auto (offline package / timm hub) | none (random) | path to a weights file
    embed_dim: int = 0  # 0 = keep all concatenated channels; >0 = fixed channel pooling to this size
    local_avg: int = 3  # k x k neighbourhood averaging of patch features (PatchCore-style); 1 = off
    # Where the averaging acts. "layer": on each layer's own grid, zero-padded, before the deeper maps are
    # upsampled (PatchCore's order: a deep layer's 3 x 3 spans 3 of its own cells); "merged": on the
    # merged first-layer grid, borders unpadded (the seeds' runs). docs/localization.md measures both.
    local_avg_at: Literal["layer", "merged"] = "layer"
    batch_size: int = 16
    cache_dir: str = ""  # "" = in memory only; else float16 features on disk, keyed by content
    channels_last: bool = True


@dataclass(frozen=True)
class ModelConfig:
    coupling_blocks: int = 8
    clamp: float = 1.9  # soft clamp of the log-scale: clamp * tanh(s / clamp)
    subnet_hidden_ratio: float = 2.0  # hidden width of the coupling subnet = ratio * its input width
    lora: bool = True  # wo_LoRA ablation: False
    lora_rank: int = 64
    lora_alpha: float = 2.0  # scaling = alpha / rank (v2 of the notes)
    task_bias: bool = True
    scale_context: bool = True
    context_kernel: int = 5
    context_init: float = 0.1  # alpha = context_max * sigmoid(theta), starting at context_init
    context_max: float = 0.2
    context_gate: bool = False  # Baseline 2.0: patch-wise gate instead of the global alpha
    context_gate_hidden: int = 64
    whitening: bool = True
    # "layernorm": the notes' adapter, γ ⊙ LayerNorm(x) + β per patch (learned, not part of the density);
    # "channel" / "full": a fixed affine from the task's own training statistics (per-channel σ, or full
    # ZCA), whose log-det counts (adapters.StatsWhitening). eps: shrinkage, relative to the mean variance.
    whitening_mode: Literal["layernorm", "channel", "full"] = "full"
    whitening_eps: float = 1e-3
    whitening_gamma_min: float = 0.5
    whitening_gamma_max: float = 2.0
    whitening_beta_max: float = 2.0
    spatial_mixer: bool = True
    dia_blocks: int = 4  # 0 = no DIA
    dia_hidden_ratio: float = 0.5
    # "concat": transistor pixel AUROC 0.954 → 0.964, AUPRO 0.840 → 0.879 over "none" for +25 % per-task
    # parameters; "add" (the notes') mixes the encoding into the features (docs/localization.md).
    pos_encoding: Literal["add", "concat", "none"] = "concat"
    pos_encoding_dim: int = 32  # channels appended in "concat" mode
    # Per-task patch memory: a greedy coreset of this share of the task's training patches (2 %: at 1 % AUPRO
    # moved ±0.01 with the seed), read by scoring "blend" and router "memory". 0: none (the notes').
    memory_share: float = 0.02


@dataclass(frozen=True)
class LossConfig:
    tail_weight: float = 0.7  # w; 0 gives the plain mean NLL
    tail_ratio: float = 0.02  # rho: fraction of patches in the tail term
    tail_scope: Literal["batch", "image"] = "batch"  # top rho over the whole batch or per image
    lambda_logdet: float = 1e-4
    whitening_reg: float = 0.1  # identity regulariser of task 0's whitening adapter
    focal_gamma: float = 0.0  # v7 focal NLL; 0 = off
    center_weight: float = 0.0  # v5 centre loss on z; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    # The notes' MAIN setting trains 60 epochs per task on a GPU (configs/*_main.yaml); the default is
    # sized for a 2-core CPU: a 200-image task in under 3 minutes, features included.
    epochs: int = 10
    # 1e-3, not the notes' 3e-4: at 10 epochs (≈ 270 steps for 200 images) the flow is far from converged
    # at 3e-4 (transistor pixel AUROC 0.92 → 0.97; docs/localization.md). The MAIN configs keep 3e-4.
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ogp: bool = False  # V3-4 orthogonal gradient projection (method: finetune only; see ogp.py)
    ogp_threshold: float = 0.99  # share of a task's gradient energy its stored subspace must span
    ogp_max_rank: int = 50  # at most this many new directions per parameter tensor and task
    ogp_batches: int = 32  # gradient rows per task: its first ogp_batches training batches
    record_grad_norms: bool = False  # per-block gradient norms, for `moleflow analyze tail`


@dataclass(frozen=True)
class ScoringConfig:
    # "nll": ½‖z‖² − log|det J| (the notes); "latent": ½‖z‖² (FastFlow's); "blend": (1 − w)·‖z‖ + w·(distance to
    # the nearest memory patch), each over its training median (needs model.memory_share; task_patch_scores).
    patch_score: Literal["nll", "latent", "blend"] = "blend"
    # w per task: "synthetic": the one of `memory_weights` whose maps best find CutPaste defects pasted on the
    # task's own training images, stored with the task (continual/blend_weight.py); "fixed": `memory_weight`
    # (also for tasks saved without a choice). Candidates from 0.8: below it the synthetic defects would pick
    # 0.5 for transistor, whose real defects lose 0.01 AUPRO there (docs/localization.md).
    memory_weight_from: Literal["synthetic", "fixed"] = "synthetic"
    memory_weight: float = 0.8
    memory_weights: list[float] = field(default_factory=lambda: [0.8, 0.9, 1.0])
    aggregation: Literal["topk", "max", "mean"] = "topk"
    # Image score = mean of the top_k patch scores. 50 of the 32×32 patches at 256 px (≈ 5 %): image AUROC
    # +0.04 on transistor and kolektor, +0.016 on ELPV poly, same on mono and bottle (docs/localization.md).
    top_k: int = 50
    blur_sigma: float = 4.0
    # Threshold: this quantile of the image scores of `calibration_folds` disjoint seeded shares of
    # `calibration_holdout` of the training images, each scored by a throwaway copy of the task trained
    # without it (the shipped task trains on all). Holdout 0: the training images in sample (the notes').
    threshold_quantile: float = 0.99
    calibration_holdout: float = 0.3
    calibration_folds: int = 2


@dataclass(frozen=True)
class RouterConfig:
    mode: Literal["mahalanobis", "oracle", "hybrid"] = "mahalanobis"
    hybrid_top_k: int = 2
    # What "hybrid" compares among the top-k tasks: the flow's mean patch NLL (the notes'), or "memory": the
    # mean distance of the image's patches to each task's patch memory, over that task's training median.
    hybrid_score: Literal["nll", "memory"] = "nll"
    unknown: bool = False  # answer "unknown" beyond the per-task distance threshold
    unknown_quantile: float = 0.99
    # Unknown beyond this times the calibration quantile: defects of a learned product lie up to ~6× beyond
    # it (bottle, transistor, ELPV), an unlearned product (KolektorSDD) ≥ 7.6× (docs/localization.md).
    unknown_margin: float = 10.0
    calibrated: bool = False  # compare tasks in units of each task's own distance threshold
    # The descriptor's statistic over the patches: "log_rms" (texture; robust to defects) or "mean" (the notes').
    descriptor: Literal["mean", "log_rms"] = "log_rms"
    # Covariance shrinkage: -1 = Ledoit-Wolf (the notes'); λ in [0, 1]: (1 − λ)·S + λ·mean variance·I.
    shrinkage: float = 0.7
    likelihood: bool = True  # compare tasks by distance + log|Σ_t| (Gaussian likelihood); false: distance alone
    # Per principal axis of a task's covariance, the distance as a Student-t's of this many degrees of freedom
    # (0: Gaussian, the notes'): a defect far along a few axes no longer outweighs another product's moderate
    # distance along many (bottle, transistor, KolektorSDD routed 100 %; docs/localization.md, routing).
    robust_dof: float = 3.0


@dataclass(frozen=True)
class ScenarioConfig:
    # Either explicit tasks (lists of classes, "dataset:class" allowed) ...
    tasks: list[list[str]] = field(default_factory=list)
    # ... or a named scenario over a class order: 1x1, 3x3, 5x5, 14x1, or N-M (e.g. 10-5).
    name: str = ""
    order: list[str] = field(default_factory=list)  # class order; empty = the dataset's default order


@dataclass(frozen=True)
class OutputConfig:
    plots: bool = True
    panels_per_task: int = 3  # anomaly-map panels for the most and least anomalous images
    save_model: bool = True


@dataclass(frozen=True)
class Config:
    method: Literal["moleflow", "finetune", "joint"] = "moleflow"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # a bug in this file, not the user's


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; known keys{' of ' + prefix if prefix else ''}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def config_from_dict(values: dict | None) -> Config:
    cfg = _build(Config, values or {})
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse the value ({exc.__class__.__name__})") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key, value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in ".e") and not s.lower().startswith(("inf", "nan", "-inf", "+inf"))


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply dotted overrides, check everything."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; give the path of a YAML config (examples in configs/)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(exc, "problem", None) or exc.__class__.__name__
            raise ConfigError(f"config file {p} is not valid YAML{where}: {what}; fix the syntax there") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = _fix_floats(loaded or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) atomically."""
    from moleflow.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.data.image_size >= 32, "data.image_size must be at least 32"),
        (len(cfg.backbone.layers) >= 1, "backbone.layers must name at least one layer"),
        (cfg.backbone.local_avg >= 1 and cfg.backbone.local_avg % 2 == 1, "backbone.local_avg must be an odd number >= 1"),
        (cfg.model.coupling_blocks >= 1, "model.coupling_blocks must be >= 1"),
        (cfg.model.lora_rank >= 1, "model.lora_rank must be >= 1"),
        (cfg.model.context_kernel >= 1 and cfg.model.context_kernel % 2 == 1, "model.context_kernel must be an odd number >= 1"),
        (0 < cfg.model.context_init < cfg.model.context_max, "model.context_init must lie in (0, model.context_max)"),
        (cfg.model.dia_blocks >= 0, "model.dia_blocks must be >= 0"),
        (cfg.model.whitening_eps > 0, "model.whitening_eps must be > 0"),
        (0.0 <= cfg.loss.tail_weight <= 1.0, "loss.tail_weight must lie in [0, 1]"),
        (0.0 < cfg.loss.tail_ratio <= 1.0, "loss.tail_ratio must lie in (0, 1]"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.scoring.top_k >= 1, "scoring.top_k must be >= 1"),
        (0.0 < cfg.scoring.threshold_quantile <= 1.0, "scoring.threshold_quantile must lie in (0, 1]"),
        (0.0 <= cfg.scoring.calibration_holdout < 1.0, "scoring.calibration_holdout must lie in [0, 1)"),
        (cfg.scoring.calibration_folds >= 1, "scoring.calibration_folds must be at least 1"),
        (cfg.scoring.calibration_folds * cfg.scoring.calibration_holdout <= 1.0 + 1e-9,
         "scoring.calibration_folds × scoring.calibration_holdout must be at most 1 (the shares are disjoint)"),
        (0.0 <= cfg.model.memory_share <= 1.0, "model.memory_share must lie in [0, 1]"),
        (cfg.router.hybrid_score != "memory" or cfg.model.memory_share > 0,
         "router.hybrid_score memory reads each task's patch memory: set model.memory_share > 0 (e.g. 0.02)"),
        (0.0 <= cfg.scoring.memory_weight <= 1.0, "scoring.memory_weight must lie in [0, 1]"),
        (len(cfg.scoring.memory_weights) > 0 and all(0.0 <= w <= 1.0 for w in cfg.scoring.memory_weights),
         "scoring.memory_weights must be a non-empty list of weights in [0, 1]"),
        (cfg.scoring.patch_score != "blend" or cfg.model.memory_share > 0,
         "scoring.patch_score blend reads each task's patch memory: set model.memory_share > 0 (e.g. 0.02)"),
        (cfg.router.hybrid_top_k >= 2, "router.hybrid_top_k must be >= 2"),
        (cfg.router.unknown_margin > 0, "router.unknown_margin must be > 0"),
        (cfg.router.robust_dof >= 0.0, "router.robust_dof must be >= 0 (0: Gaussian)"),
        (cfg.router.shrinkage == -1.0 or 0.0 <= cfg.router.shrinkage <= 1.0, "router.shrinkage must be -1 (Ledoit-Wolf) or lie in [0, 1]"),
        (not cfg.train.ogp or cfg.method == "finetune",
         "train.ogp needs method: finetune (with moleflow no earlier task's weight ever trains again); set method=finetune or train.ogp=false"),
        (0.0 < cfg.train.ogp_threshold <= 1.0, "train.ogp_threshold must lie in (0, 1]"),
        (cfg.train.ogp_max_rank >= 1 and cfg.train.ogp_batches >= 1, "train.ogp_max_rank and train.ogp_batches must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
