"""`moleflow analyze tail`: why does the tail-aware loss help? (METHOD.md §7, seeds/tail-aware-loss-analysis.md §4)

Two trained run directories are compared, one trained with the plain mean NLL (loss.tail_weight = 0) and
one with the tail-aware loss, on one task (default 0). Seven measurements, each with its statistic:

1. where the top-ρ NLL patches of the training images lie: distance to the image border (two-sample KS
   against all patches' distances, which is exact for the grid), Spearman of patch NLL with the image
   gradient magnitude (Sobel of the grey image, averaged per patch cell);
2. cosine similarity of the train-tail backbone features to test-defect vs test-good features;
3. gradient norms per coupling block during training (results.json, train.record_grad_norms=true);
4. latent calibration of z on test-good patches: QQ correlation, tail-quantile error, per-channel
   normality (D'Agostino–Pearson);
5. separation of good and defective pixel scores: Fisher ratio and histogram overlap;
6. per-block log-det statistics on test-good patches (and the defect − good shift);
7. the weight each patch gets in the loss (∂L/∂n by autograd) and its Gini coefficient, and, given
   sweep runs, tail ratio vs image AUROC / pixel AP / Gini.

Everything runs on a subsample (`max_images` images per split, patch subsamples for the statistics),
so it is CPU-cheap. The output folder gets `analysis.md`, `analysis.json` (the numbers) and PNG figures.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; figures are drawn on the Agg canvas

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import ndimage, stats
from sklearn.metrics import roc_auc_score

from moleflow.atomic import atomic_write_bytes, atomic_write_text
from moleflow.research.compare import collect_runs, flatten
from moleflow.config import ConfigError, LossConfig, config_to_dict
from moleflow.data import ImageDataset, build_dataset, load_image
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.model.loss import patch_nll, tail_aware_loss, tail_count
from moleflow.model.mole_flow import MoLEFlow
from moleflow.continual.system import System, load_system
from moleflow.scoring import anomaly_map, patch_scores

DPI = 110
RUN_COLORS = ("tab:blue", "tab:orange")
RUN_STYLES = ("-", "--")  # the two runs often overlap: a dashed line over a solid one keeps both visible
# Patch subsample sizes of the statistics (keeps scipy and the cosine matrices cheap).
MAX_STAT_PATCHES = 4000
MAX_QQ_VALUES = 100_000
MAX_NORMALITY_PATCHES = 1000
MAX_PIXELS = 200_000
MAX_TAIL_FOR_NEAREST = 2000
DEFECT_CELL_FRACTION = 0.5  # a patch is "defective" when at least this fraction of its cell is in the mask
CALIBRATION_QUANTILES = (0.99, 0.999)


# =========================================================================== statistics helpers


def gini(values: np.ndarray | torch.Tensor) -> float:
    """Gini coefficient of non-negative magnitudes (absolute values are taken): 0 = all equal,
    1 − 1/n = everything on one of n items. Mean absolute difference / (2·mean)."""
    x = np.sort(np.abs(np.asarray(values, dtype=np.float64).reshape(-1)))
    n = x.size
    if n == 0:
        raise ValueError("gini of an empty array")
    total = x.sum()
    if total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * total) - (n + 1) / n)


def loss_weight_gini_exact(tail_weight: float, tail_ratio: float, n_patches: int) -> float:
    """Gini of the per-patch loss weights ∂L/∂n of L = (1−w)·mean(n) + w·mean(top K of n), K = ⌈ρN⌉.

    The top K get (1−w)/N + w/K, the others (1−w)/N; their sum is 1 (mean 1/N), and the pairwise
    differences are w/K for the K·(N−K) mixed pairs, so Gini = Σ|xi−xj| / (2N²·mean) = w·(1 − K/N).
    """
    k = tail_count(n_patches, tail_ratio)
    return float(tail_weight * (1.0 - k / n_patches))


def effective_count(weights: np.ndarray | torch.Tensor) -> float:
    """exp(entropy) of the normalised magnitudes: how many patches effectively carry the gradient."""
    p = np.abs(np.asarray(weights, dtype=np.float64).reshape(-1))
    p = p[p > 0] / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def fisher_ratio(positive: np.ndarray, negative: np.ndarray) -> float:
    """(μ1 − μ0)² / (σ1² + σ0²): separation of two score samples, scale-free."""
    a, b = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    denom = a.var() + b.var()
    if denom == 0:
        return math.inf if a.mean() != b.mean() else 0.0
    return float((a.mean() - b.mean()) ** 2 / denom)


def histogram_overlap(a: np.ndarray, b: np.ndarray, bins: int = 100) -> float:
    """Intersection Σ min(p, q) of the two normalised histograms on common bins: 1 = same, 0 = disjoint."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(a, edges)[0] / a.size
    q = np.histogram(b, edges)[0] / b.size
    return float(np.minimum(p, q).sum())


def border_distance(h: int, w: int) -> np.ndarray:
    """(H, W) distance of each grid cell to the nearest image border, in patches (0 = outermost ring)."""
    i = np.arange(h)[:, None]
    j = np.arange(w)[None, :]
    return np.minimum(np.minimum(i, h - 1 - i), np.minimum(j, w - 1 - j))


def border_ks(tail_distances: np.ndarray, all_distances: np.ndarray) -> tuple[float, float]:
    """Two-sample KS of the tail patches' border distances against those of all patches (statistic, p).

    Uniform positions on the grid give exactly the all-patches distribution of border distances, so
    this tests "tail positions are uniform over the grid" as far as the border distance can tell.
    """
    res = stats.ks_2samp(np.asarray(tail_distances, np.float64), np.asarray(all_distances, np.float64))
    return float(res.statistic), float(res.pvalue)


def gradient_cells(image: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Image (3, S, S) in [0, 1] -> (H, W) mean Sobel gradient magnitude of the grey image per patch cell."""
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).double().numpy()  # (S, S)
    mag = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))  # (S, S)
    cells = F.adaptive_avg_pool2d(torch.from_numpy(mag)[None, None], grid)  # (1, 1, H, W)
    return cells[0, 0].numpy()


def latent_calibration(z: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Gaussianity of latent vectors z (n, C) that should follow N(0, I)."""
    z = np.asarray(z, np.float64)
    n, c = z.shape
    flat = z.reshape(-1)
    if flat.size > MAX_QQ_VALUES:
        flat = rng.choice(flat, MAX_QQ_VALUES, replace=False)
    (_, _), (slope, intercept, r) = stats.probplot(flat, dist="norm")
    out: dict[str, Any] = {"n_patches": n, "channels": c, "qq_r": float(r), "qq_slope": float(slope),
                           "qq_intercept": float(intercept), "z_mean": float(flat.mean()), "z_std": float(flat.std()),
                           "sq_norm_per_dim": float((z**2).sum(1).mean() / c)}
    for p in CALIBRATION_QUANTILES:
        out[f"q_err_{p}"] = float(abs(np.quantile(flat, p) - stats.norm.ppf(p)))
        out[f"q_err_{1 - p:.3g}"] = float(abs(np.quantile(flat, 1 - p) - stats.norm.ppf(1 - p)))
    if n >= 20:  # normaltest needs a few dozen samples to mean anything
        # On MAX_NORMALITY_PATCHES patches (the notes' 1000): with many more every channel "fails".
        zn = z if n <= MAX_NORMALITY_PATCHES else z[rng.choice(n, MAX_NORMALITY_PATCHES, replace=False)]
        pvals = np.asarray(stats.normaltest(zn, axis=0).pvalue, np.float64)  # (C,)
        out["normal_frac_p_gt_0.05"] = float(np.mean(pvals > 0.05))
        out["normal_median_p"] = float(np.median(pvals))
    else:
        out["normal_frac_p_gt_0.05"] = out["normal_median_p"] = None
    return out


def loss_patch_weights(z: torch.Tensor, log_det: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    """∂L/∂n per patch (B, H, W): the weight each patch NLL gets in the training loss, by autograd.

    The NLL part of the real loss is used (tail_aware_loss with its regularisers switched off: they are
    not functions of n). Since n = (½‖z‖² − log_det)/C, ∂L/∂n = −C·∂L/∂log_det.
    """
    cfg = dataclasses.replace(loss_cfg, lambda_logdet=0.0, center_weight=0.0, whitening_reg=0.0)
    ld = log_det.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = tail_aware_loss(z.detach(), ld, cfg)
        (grad,) = torch.autograd.grad(loss, ld)
    return -grad * z.shape[-1]


@dataclass
class FlowOutputs:
    z: torch.Tensor  # (N, H, W, C')
    log_det: torch.Tensor  # (N, H, W) total
    block_logdets: list[torch.Tensor]  # per base-flow coupling block, (N, H, W) each
    dia_logdet: torch.Tensor  # (N, H, W), zeros without DIA


@torch.no_grad()
def flow_outputs(model: MoLEFlow, task: int, patches: torch.Tensor, device: torch.device, batch_size: int = 16) -> FlowOutputs:
    """The flow under task `task` with each coupling block's log-det (same order as BaseFlow.forward)."""
    model.eval()
    zs, lds, dias = [], [], []
    blocks: list[list[torch.Tensor]] = [[] for _ in model.flow.blocks]
    with model.use_task(task):
        for start in range(0, len(patches), batch_size):
            x = patches[start : start + batch_size].to(device=device, dtype=torch.float32)  # (B, H, W, C)
            per_block: list[torch.Tensor] = []
            z, ld = model.flow(model.prepare(x), block_logdets=per_block)
            dia_ld = torch.zeros_like(ld)
            if model.cfg.dia_blocks > 0:
                z, dia_ld = model.dia[str(task)](z)
                ld = ld + dia_ld
            zs.append(z.cpu())
            lds.append(ld.cpu())
            dias.append(dia_ld.cpu())
            for i, b in enumerate(per_block):
                blocks[i].append(b.cpu())
    return FlowOutputs(torch.cat(zs), torch.cat(lds), [torch.cat(b) for b in blocks], torch.cat(dias))


# =========================================================================== runs and features


@dataclass
class Run:
    label: str  # "mean-only" / "tail-aware" / sweep directory name
    path: Path
    system: System
    task: int
    results: dict

    @property
    def loss(self) -> LossConfig:
        return self.system.cfg.loss

    def metrics(self) -> dict[str, float | None]:
        """This task's metrics after the last step of the run (routing on)."""
        steps = self.results.get("steps") or []
        for entry in (steps[-1].get("per_task", []) if steps else []):
            if entry.get("task") == self.task:
                return {m: entry.get(m) for m in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}
        return {m: None for m in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}

    def grad_norms(self) -> list[dict[str, float]]:
        for step in self.results.get("steps") or []:
            if step.get("after_task") == self.task:
                return list((step.get("train") or {}).get("grad_norms") or [])
        return []


def open_run(path: Path, label: str, task: int) -> Run:
    path = Path(path)
    for name in ("config.yaml", "results.json", "model"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a finished run directory: {name} is missing (train it with `moleflow fit ... --out {path}`)")
    results = json.loads((path / "results.json").read_text())
    system = load_system(path / "model")
    if not 0 <= task < len(system.tasks):
        raise ConfigError(f"--task {task}: the model in {path / 'model'} has tasks 0..{len(system.tasks) - 1}")
    return Run(label, path, system, task, results)


def _even_pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


class FeatureStore:
    """Subsampled features of a task's images, computed once per backbone/data setting and reused."""

    def __init__(self, max_images: int, progress: bool) -> None:
        self.max_images = max_images
        self.progress = progress
        self._cache: dict[str, FeatureSet] = {}

    def get(self, run: Run, split: str) -> FeatureSet:
        system = run.system
        specs = system.tasks[run.task].specs
        key = json.dumps([system.extractor.identity(), config_to_dict(system.cfg.data), specs, split], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = self._extract(system, specs, split)
        return self._cache[key]

    def _extract(self, system: System, specs: list[str], split: str) -> FeatureSet:
        per_spec = max(1, math.ceil(self.max_images / len(specs)))
        sets = []
        for spec in specs:
            ds = build_dataset(system.cfg.data, spec, split)
            labels = ds.labels
            if split == "test":  # keep both kinds: up to half goods, the rest defects (or whatever exists)
                good = [i for i, y in enumerate(labels) if y == 0]
                bad = [i for i, y in enumerate(labels) if y != 0]
                k_good = min(len(good), max(per_spec // 2, per_spec - len(bad)))
                k_bad = min(len(bad), per_spec - k_good)
                idx = [good[i] for i in _even_pick(len(good), k_good)] + [bad[i] for i in _even_pick(len(bad), k_bad)]
            else:
                idx = _even_pick(len(ds), per_spec)
            sub = ImageDataset([ds.samples[i] for i in sorted(idx)], ds.image_size, ds.has_masks)
            sets.append(extract_features(
                system.extractor, sub, batch_size=system.cfg.backbone.batch_size,
                cache_dir=system.cfg.backbone.cache_dir or None, progress=self.progress, desc=f"features {spec}/{split}",
            ))
        return sets[0] if len(sets) == 1 else FeatureSet.concat(sets)


def _subsample_rows(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= k else x[rng.choice(len(x), k, replace=False)]


def _cell_fractions(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, S, S) bool masks -> (N, H, W) fraction of each patch cell inside the mask."""
    return F.adaptive_avg_pool2d(masks.float(), grid)[:, 0]


def _tail_mask(nll: torch.Tensor, ratio: float, scope: str) -> torch.Tensor:
    """(N, H, W) bool: the top ⌈ρ·count⌉ NLL patches over all analysed images (scope batch) or per image."""
    if scope == "image":
        flat = nll.reshape(nll.shape[0], -1)
        idx = flat.topk(tail_count(flat.shape[1], ratio), dim=1).indices
        out = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
        return out.reshape(nll.shape)
    flat = nll.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[flat.topk(tail_count(flat.numel(), ratio)).indices] = True
    return out.reshape(nll.shape)


# =========================================================================== the seven measurements


def spatial_tail(run: Run, train: FeatureSet, out_train: FlowOutputs) -> dict[str, Any]:
    """1. Where the top-ρ training patches lie."""
    nll = patch_nll(out_train.z, out_train.log_det)  # (N, H, W)
    n, h, w = nll.shape
    tail = _tail_mask(nll, run.loss.tail_ratio, run.loss.tail_scope)  # (N, H, W)
    dist = np.broadcast_to(border_distance(h, w), (n, h, w))
    tail_np = tail.numpy()
    ks, p = border_ks(dist[tail_np], dist.reshape(-1))
    size = run.system.cfg.data.image_size
    grads = np.stack([gradient_cells(load_image(pth, size), (h, w)) for pth in train.paths])  # (N, H, W)
    rho, rho_p = stats.spearmanr(nll.numpy().reshape(-1), grads.reshape(-1))
    return {
        "grid": [h, w], "n_images": n, "n_tail": int(tail_np.sum()), "tail_ratio": run.loss.tail_ratio,
        "tail_scope": run.loss.tail_scope,
        "mean_border_distance_tail": float(dist[tail_np].mean()), "mean_border_distance_all": float(dist.mean()),
        "outer_ring_frac_tail": float((dist[tail_np] == 0).mean()), "outer_ring_frac_all": float((dist == 0).mean()),
        "ks_stat": ks, "ks_p": p,
        "spearman_nll_gradient": float(rho), "spearman_p": float(rho_p),
        "gradient_tail_over_rest": float(grads[tail_np].mean() / max(grads[~tail_np].mean(), 1e-12)),
        "_tail_freq": tail_np.mean(axis=0),  # (H, W), for the plot
        "_tail_dist": dist[tail_np], "_tail": tail,
    }


def feature_similarity(train: FeatureSet, tail: torch.Tensor, test: FeatureSet, rng: np.random.Generator) -> dict[str, Any]:
    """2. Cosine similarity of train-tail backbone features to test-defect vs test-good features."""
    if test.masks is None:
        return {"applicable": False, "reason": "not applicable (no masks)"}
    grid = tuple(test.patches.shape[1:3])
    x_train = train.patches.float()
    tail_f = x_train[tail].numpy().astype(np.float64)  # (K, C)
    frac = _cell_fractions(test.masks, grid)  # (N, H, W)
    defect_sel = frac >= DEFECT_CELL_FRACTION
    rule = f"cell ≥ {DEFECT_CELL_FRACTION:.0%} in the mask"
    if not defect_sel.any():
        defect_sel, rule = frac > 0, "cell touches the mask (no cell is half inside)"
    good_img = test.labels == 0
    x_test = test.patches.float()
    defect_f = x_test[defect_sel].numpy().astype(np.float64)
    good_f = x_test[good_img].reshape(-1, x_test.shape[-1]).numpy().astype(np.float64)
    if len(defect_f) == 0 or len(good_f) == 0:
        return {"applicable": False, "reason": "not applicable (no defect patches or no good test images)"}
    train_mean = x_train.reshape(-1, x_train.shape[-1]).mean(0).numpy().astype(np.float64)
    defect_f, good_f = _subsample_rows(defect_f, MAX_STAT_PATCHES, rng), _subsample_rows(good_f, MAX_STAT_PATCHES, rng)
    tail_n = _subsample_rows(tail_f, MAX_TAIL_FOR_NEAREST, rng)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    res: dict[str, Any] = {"applicable": True, "defect_rule": rule, "n_tail": len(tail_f), "n_defect": int(defect_sel.sum()),
                           "n_good": int(good_img.sum()) * grid[0] * grid[1]}
    for name, centre in (("raw", np.zeros_like(train_mean)), ("centred", train_mean)):
        proto = tail_f.mean(0) - centre
        res[f"{name}_proto_defect"] = cos(proto, defect_f.mean(0) - centre)
        res[f"{name}_proto_good"] = cos(proto, good_f.mean(0) - centre)
        tn = unit(tail_n - centre)
        nd = (unit(defect_f - centre) @ tn.T).max(1)  # nearest train-tail patch of each defect patch
        ng = (unit(good_f - centre) @ tn.T).max(1)
        res[f"{name}_nearest_defect"], res[f"{name}_nearest_good"] = float(nd.mean()), float(ng.mean())
        if name == "centred":
            res["_nearest_defect"], res["_nearest_good"] = nd, ng
    return res


def grad_norm_table(run_a: Run, run_b: Run) -> dict[str, Any]:
    """3. Per-block gradient norms recorded during training."""
    ga, gb = run_a.grad_norms(), run_b.grad_norms()
    if not ga or not gb:
        missing = [r.label for r, g in ((run_a, ga), (run_b, gb)) if not g]
        return {"recorded": False, "missing": missing}
    blocks = [k for k in ga[0] if k in gb[0]]
    rows = []
    for k in blocks:
        a = float(np.mean([e[k] for e in ga]))
        b = float(np.mean([e[k] for e in gb]))
        rows.append({"block": k, "mean_only": a, "tail_aware": b, "ratio": b / a if a > 0 else None,
                     "first_ratio": gb[0][k] / ga[0][k] if ga[0][k] > 0 else None,
                     "last_ratio": gb[-1][k] / ga[-1][k] if ga[-1][k] > 0 else None})
    return {"recorded": True, "rows": rows, "epochs": [len(ga), len(gb)], "_series": (ga, gb)}


def score_separation(run: Run, test: FeatureSet, out_test: FlowOutputs, rng: np.random.Generator) -> dict[str, Any]:
    """5. Good vs defective pixel scores of the anomaly maps."""
    if test.masks is None:
        return {"applicable": False, "reason": "not applicable (no masks)"}
    cfg = run.system.cfg
    s = patch_scores(out_test.z, out_test.log_det)  # (N, H, W)
    maps = torch.cat([anomaly_map(s[i : i + 16], cfg.data.image_size, cfg.scoring.blur_sigma) for i in range(0, len(s), 16)])
    masks = test.masks[:, 0]
    defect, good = maps[masks].numpy(), maps[~masks].numpy()
    if defect.size == 0:
        return {"applicable": False, "reason": "not applicable (the masks mark no pixel)"}
    defect, good = _subsample_rows(defect, MAX_PIXELS, rng), _subsample_rows(good, MAX_PIXELS, rng)
    y = np.r_[np.ones(len(defect)), np.zeros(len(good))]
    return {
        "applicable": True, "n_defect_px": int(masks.sum()), "n_good_px": int((~masks).sum()),
        "mean_good": float(good.mean()), "std_good": float(good.std()),
        "mean_defect": float(defect.mean()), "std_defect": float(defect.std()),
        "fisher": fisher_ratio(defect, good), "overlap": histogram_overlap(defect, good),
        "pixel_auroc_subsample": float(roc_auc_score(y, np.r_[defect, good])),
        "_defect": defect, "_good": good,
    }


def block_logdet_stats(run: Run, test: FeatureSet, out_test: FlowOutputs) -> dict[str, Any]:
    """6. Mean/std of each coupling block's per-patch log-det on test-good patches (and defect patches)."""
    good = (test.labels == 0).numpy()
    if not good.any():
        return {"applicable": False, "reason": "no good test images"}
    defect_sel = None
    if test.masks is not None:
        defect_sel = (_cell_fractions(test.masks, tuple(out_test.log_det.shape[1:])) >= DEFECT_CELL_FRACTION).numpy()
        if not defect_sel.any():
            defect_sel = None
    parts = [(f"block{i}", ld) for i, ld in enumerate(out_test.block_logdets)]
    if run.system.cfg.model.dia_blocks > 0:
        parts.append(("dia", out_test.dia_logdet))
    parts.append(("total", out_test.log_det))
    rows = []
    for name, ld in parts:
        g = ld.numpy()[good].reshape(-1)
        row = {"part": name, "mean": float(g.mean()), "std": float(g.std())}
        row["defect_minus_good"] = float(ld.numpy()[defect_sel].mean() - g.mean()) if defect_sel is not None else None
        rows.append(row)
    return {"applicable": True, "rows": rows}


def loss_concentration(run: Run, train: FeatureSet, out_train: FlowOutputs | None = None) -> dict[str, Any]:
    """7. The per-patch loss weights ∂L/∂n on training batches: Gini, effective count, tail share."""
    if out_train is None:
        out_train = flow_outputs(run.system.model, run.task, train.patches, run.system.device)
    bs = min(run.system.cfg.train.batch_size, len(train))
    starts = list(range(0, len(train) - bs + 1, bs))  # full batches only: every batch has the same N
    ginis, effs, shares, weights_all = [], [], [], []
    for s in starts:
        w = loss_patch_weights(out_train.z[s : s + bs], out_train.log_det[s : s + bs], run.loss).abs()
        flat = w.reshape(-1).numpy()
        k = tail_count(flat.size, run.loss.tail_ratio)
        ginis.append(gini(flat))
        effs.append(effective_count(flat))
        shares.append(float(np.sort(flat)[::-1][:k].sum() / flat.sum()))
        weights_all.append(flat)
    n = bs * out_train.log_det.shape[1] * out_train.log_det.shape[2]
    return {
        "tail_weight": run.loss.tail_weight, "tail_ratio": run.loss.tail_ratio, "tail_scope": run.loss.tail_scope,
        "batch_images": bs, "batch_patches": n, "n_batches": len(starts), "tail_count": tail_count(n, run.loss.tail_ratio),
        "gini": float(np.mean(ginis)),
        "gini_exact": loss_weight_gini_exact(run.loss.tail_weight, run.loss.tail_ratio, n) if run.loss.tail_scope == "batch" else None,
        "effective_patches": float(np.mean(effs)), "tail_share": float(np.mean(shares)),
        "_weights": weights_all[0],
        **{k: v for k, v in run.metrics().items() if k in ("image_auroc", "pixel_ap")},
    }


# =========================================================================== plots


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # layout is constrained: one draw, no tight-bbox pass
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plot_spatial(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(13, 4), layout="constrained")
    vmax = max(float(r["_tail_freq"].max()) for r in res) or 1.0
    for i, (r, lab) in enumerate(zip(res, labels)):
        ax = fig.add_subplot(1, 3, i + 1)
        im = ax.imshow(r["_tail_freq"], cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{lab}: tail frequency per cell")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(1, 3, 3)
    h, w = res[0]["grid"]
    all_d = border_distance(h, w).reshape(-1)
    bins = np.arange(all_d.max() + 2) - 0.5
    ax.hist(all_d, bins=bins, density=True, histtype="step", color="k", label="all patches")
    for r, lab, c, ls in zip(res, labels, RUN_COLORS, RUN_STYLES):
        ax.hist(r["_tail_dist"], bins=bins, density=True, histtype="step", color=c, ls=ls, lw=1.5, label=f"tail, {lab}")
    ax.set_xlabel("distance to the border (patches)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_similarity(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for i, (r, lab) in enumerate(zip(res, labels)):
        ax = fig.add_subplot(1, 2, i + 1)
        bins = np.linspace(min(r["_nearest_good"].min(), r["_nearest_defect"].min()), 1.0, 50)
        ax.hist(r["_nearest_good"], bins=bins, density=True, alpha=0.6, color="tab:blue", label="test good patches")
        ax.hist(r["_nearest_defect"], bins=bins, density=True, alpha=0.6, color="tab:red", label="test defect patches")
        ax.set_title(f"{lab}: cosine to nearest train-tail patch (centred)", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_grad_norms(series: tuple[list[dict], list[dict]], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"]
    blocks = list(series[0][0])
    for j, k in enumerate(blocks):
        col = cmap(j / max(1, len(blocks) - 1))
        for ser, style, lab in zip(series, ("-", "--"), labels):
            ax.plot(np.arange(1, len(ser) + 1), [e[k] for e in ser], style, marker="o", ms=3, color=col,
                    label=f"{k} {lab}" if j in (0, len(blocks) - 1) else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean gradient norm (colour: block index)")
    ax.set_yscale("log")
    ax.set_title("coupling-block gradient norms (solid: " + labels[0] + ", dashed: " + labels[1] + ")", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_latent(zs: list[np.ndarray], labels: list[str], path: Path, rng: np.random.Generator) -> Path:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    probs = np.linspace(0.0005, 0.9995, 400)
    theo = stats.norm.ppf(probs)
    for z, lab, c, m in zip(zs, labels, RUN_COLORS, ("o", "x")):
        ax.plot(theo, np.quantile(z.reshape(-1), probs), m, ms=3, mfc="none", color=c, label=lab)
    ax.plot(theo, theo, "k--", lw=1, label="N(0,1)")
    ax.set_xlabel("normal quantile")
    ax.set_ylabel("empirical quantile of z")
    ax.set_title("QQ plot of z components (test good patches)", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    lo = min(np.quantile(z, 0.0005) for z in zs)
    hi = max(np.quantile(z, 0.9995) for z in zs)
    bins = np.linspace(min(lo, -4), max(hi, 4), 80)
    for z, lab, c, ls in zip(zs, labels, RUN_COLORS, RUN_STYLES):
        ax.hist(_subsample_rows(z.reshape(-1), MAX_QQ_VALUES, rng), bins=bins, density=True, histtype="step", color=c, ls=ls,
                label=lab)
    ax.plot(bins, stats.norm.pdf(bins), "k--", lw=1, label="N(0,1)")
    ax.set_yscale("log")
    ax.set_title("density of z components (log scale)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_separation(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for i, (r, lab) in enumerate(zip(res, labels)):
        ax = fig.add_subplot(1, 2, i + 1)
        bins = np.linspace(min(r["_good"].min(), r["_defect"].min()), max(r["_good"].max(), r["_defect"].max()), 80)
        ax.hist(r["_good"], bins=bins, density=True, alpha=0.6, color="tab:blue", label="good pixels")
        ax.hist(r["_defect"], bins=bins, density=True, alpha=0.6, color="tab:red", label="defect pixels")
        ax.set_title(f"{lab}: Fisher {r['fisher']:.3f}, overlap {r['overlap']:.3f}", fontsize=9)
        ax.set_xlabel("pixel anomaly score")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_logdets(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names = [r["part"] for r in res[0]["rows"] if r["part"] != "total"]
    x = np.arange(len(names))
    for i, (r, lab, c) in enumerate(zip(res, labels, RUN_COLORS)):
        rows = {row["part"]: row for row in r["rows"]}
        ax.bar(x + (i - 0.5) * 0.38, [rows[n]["mean"] for n in names], 0.38, yerr=[rows[n]["std"] for n in names],
               color=c, label=lab, capsize=2)
    ax.set_xticks(x, names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("per-patch log|det J| (mean ± std)")
    ax.set_title("per-block log-det on test good patches", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_concentration(main: list[dict], labels: list[str], sweep: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(11 if sweep else 5.5, 4), layout="constrained")
    ax = fig.add_subplot(1, 2 if sweep else 1, 1)
    for r, lab, c in zip(main, labels, RUN_COLORS):
        w = np.sort(r["_weights"])
        lorenz = np.r_[0, np.cumsum(w) / w.sum()]
        ax.plot(np.linspace(0, 1, len(lorenz)), lorenz, color=c, label=f"{lab} (Gini {r['gini']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("fraction of patches (sorted by loss weight)")
    ax.set_ylabel("fraction of the total loss weight")
    ax.set_title("Lorenz curve of per-patch loss weights ∂L/∂n", fontsize=9)
    ax.legend(fontsize=8)
    if sweep:
        rows = sorted(sweep, key=lambda r: r["tail_ratio"])
        ratios = [r["tail_ratio"] for r in rows]
        ax = fig.add_subplot(1, 2, 2)
        for key, lab, c in (("pixel_ap", "pixel AP", "tab:red"), ("image_auroc", "image AUROC", "tab:green")):
            ax.plot(ratios, [np.nan if r[key] is None else r[key] for r in rows], "o-", color=c, label=lab)
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("loss.tail_ratio ρ")
        ax.set_ylabel("metric")
        ax2 = ax.twinx()
        ax2.plot(ratios, [r["gini"] for r in rows], "s--", color="k", label="Gini")
        ax2.set_ylabel("Gini of loss weights")
        ax.legend(loc="center left", fontsize=8)
        ax2.legend(loc="center right", fontsize=8)
        ax.set_title("tail-ratio sweep", fontsize=9)
    return _save(fig, path)


# =========================================================================== report


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else _f(c) for c in r) + " |")
    return "\n".join(lines)


def _public(obj: Any) -> Any:
    """The JSON-able part of a result (keys starting with '_' hold arrays for the plots)."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_public(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _config_diff(a: Run, b: Run) -> list[tuple[str, Any, Any]]:
    fa = flatten(yaml.safe_load((a.path / "config.yaml").read_text()))
    fb = flatten(yaml.safe_load((b.path / "config.yaml").read_text()))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if not k.startswith("output.") and fa.get(k) != fb.get(k)]


def _diff_line(a: float | None, b: float | None, what: str) -> str:
    if a is None or b is None:
        return ""
    return f"tail-aware − mean-only {what}: {b - a:+.4f}."


def analyze_tail(
    run_mean_only: Path,
    run_tail_aware: Path,
    out: Path,
    task: int = 0,
    sweep: list[Path] | tuple[Path, ...] = (),
    max_images: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """The seven measurements of the tail-aware loss analysis; writes out/analysis.md (returned),
    out/analysis.json and PNG figures into `out`. `sweep`: run directories (or grid folders) that
    differ in loss.tail_ratio, for measurement 7."""
    if max_images < 2:
        raise ConfigError(f"max_images must be at least 2, got {max_images}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    runs = [open_run(run_mean_only, "mean-only", task), open_run(run_tail_aware, "tail-aware", task)]
    labels = [r.label for r in runs]
    store = FeatureStore(max_images, progress)

    per_run: list[dict[str, Any]] = []
    for run in runs:
        train, test = store.get(run, "train"), store.get(run, "test")
        dev = run.system.device
        o_train = flow_outputs(run.system.model, task, train.patches, dev)
        o_test = flow_outputs(run.system.model, task, test.patches, dev)
        sp = spatial_tail(run, train, o_train)
        good = (test.labels == 0).numpy()
        z_good = o_test.z.numpy()[good].reshape(-1, o_test.z.shape[-1]) if good.any() else np.zeros((0, o_test.z.shape[-1]))
        z_good = _subsample_rows(z_good, MAX_STAT_PATCHES, rng)
        per_run.append({
            "spatial": sp,
            "similarity": feature_similarity(train, sp["_tail"], test, rng),
            "latent": latent_calibration(z_good, rng) if len(z_good) else {"applicable": False},
            "_z_good": z_good,
            "separation": score_separation(run, test, o_test, rng),
            "logdet": block_logdet_stats(run, test, o_test),
            "concentration": loss_concentration(run, train, o_train),
            "n_train_images": len(train), "n_test_images": len(test),
        })
    grads = grad_norm_table(*runs)

    sweep_rows: list[dict[str, Any]] = []
    sweep_skipped: list[str] = []
    if sweep:
        found, skipped = collect_runs([Path(p) for p in sweep])
        sweep_skipped = [f"{s.path}: {s.reason}" for s in skipped]
        main_runs = {r.path.resolve(): r for r in runs}
        for item in found:
            r = main_runs.get(item.path.resolve()) or open_run(item.path, item.name, task)
            row = loss_concentration(r, store.get(r, "train"))
            row["run"] = item.name
            sweep_rows.append(row)

    pngs: dict[str, str] = {}
    pngs["1"] = _plot_spatial([p["spatial"] for p in per_run], labels, out / "tail_spatial.png").name
    if all(p["similarity"].get("applicable") for p in per_run):
        pngs["2"] = _plot_similarity([p["similarity"] for p in per_run], labels, out / "tail_feature_similarity.png").name
    if grads["recorded"]:
        pngs["3"] = _plot_grad_norms(grads["_series"], labels, out / "grad_norms.png").name
    if all(len(p["_z_good"]) for p in per_run):
        pngs["4"] = _plot_latent([p["_z_good"] for p in per_run], labels, out / "latent_calibration.png", rng).name
    if all(p["separation"].get("applicable") for p in per_run):
        pngs["5"] = _plot_separation([p["separation"] for p in per_run], labels, out / "score_separation.png").name
    if all(p["logdet"].get("applicable") for p in per_run):
        pngs["6"] = _plot_logdets([p["logdet"] for p in per_run], labels, out / "block_logdets.png").name
    pngs["7"] = _plot_concentration([p["concentration"] for p in per_run], labels, sweep_rows, out / "loss_concentration.png").name

    data = {
        "runs": [{"label": r.label, "path": str(r.path), "task": task, "classes": r.system.tasks[task].classes,
                  "tail_weight": r.loss.tail_weight, "tail_ratio": r.loss.tail_ratio, **r.metrics()} for r in runs],
        "config_diff": [list(d) for d in _config_diff(*runs)],
        "per_run": [{k: v for k, v in p.items() if not k.startswith("_")} for p in per_run],
        "grad_norms": grads, "sweep": sweep_rows, "sweep_skipped": sweep_skipped, "plots": pngs,
        "max_images": max_images,
    }
    atomic_write_text(out / "analysis.json", json.dumps(_public(data), indent=2))
    md = _markdown(runs, per_run, grads, sweep_rows, sweep_skipped, pngs, data["config_diff"], max_images)
    atomic_write_text(out / "analysis.md", md)
    return out / "analysis.md"


def _markdown(runs: list[Run], per_run: list[dict], grads: dict, sweep_rows: list[dict], sweep_skipped: list[str],
              pngs: dict[str, str], diff: list, max_images: int) -> str:
    a, b = per_run
    labels = [r.label for r in runs]
    L: list[str] = ["# Tail-aware loss analysis", ""]
    L.append(f"Task {runs[0].task} ({'+'.join(runs[0].system.tasks[runs[0].task].classes)}); up to {max_images} images per "
             f"split (train {a['n_train_images']}, test {a['n_test_images']}). METHOD.md §7, seeds/tail-aware-loss-analysis.md §4.")
    L.append("")
    L.append(_table(["run", "directory", "tail_weight", "tail_ratio", "image AUROC", "pixel AUROC", "pixel AP"],
                    [[r.label, f"`{r.path}`", r.loss.tail_weight, r.loss.tail_ratio, r.metrics()["image_auroc"],
                      r.metrics()["pixel_auroc"], r.metrics()["pixel_ap"]] for r in runs]))
    L.append("")
    other = [d for d in diff if d[0] != "loss.tail_weight"]
    if runs[0].loss.tail_weight != 0:
        L.append(f"**Note:** the mean-only run has loss.tail_weight = {runs[0].loss.tail_weight}, not 0.")
    if other:
        L.append("**Note:** the runs differ in more than loss.tail_weight: "
                 + ", ".join(f"`{k}` ({x!r} vs {y!r})" for k, x, y in other) + ".")
    L.append("")

    def img(key: str) -> None:
        if key in pngs:
            L.extend([f"![]({pngs[key]})", ""])

    # 1
    L += ["## 1. Where tail patches lie", ""]
    sa, sb = a["spatial"], b["spatial"]
    scope = "over all analysed images" if sa["tail_scope"] == "batch" else "within each image"
    L.append(f"Top ρ = {sa['tail_ratio']} of the training patches by NLL ({scope}, as loss.tail_scope = {sa['tail_scope']}), "
             f"{sa['n_images']} images, grid {sa['grid'][0]}×{sa['grid'][1]}. Border distance in patches (0 = outermost ring); "
             "KS: two-sample test of the tail's border distances against all patches' (= uniform positions). "
             "Spearman: patch NLL vs mean Sobel gradient magnitude of the grey image in the patch cell.")
    L.append("")
    rows = []
    for key, name in (("n_tail", "tail patches"), ("mean_border_distance_tail", "mean border distance, tail"),
                      ("mean_border_distance_all", "mean border distance, all patches"),
                      ("outer_ring_frac_tail", "fraction on the outer ring, tail"),
                      ("outer_ring_frac_all", "fraction on the outer ring, all patches"),
                      ("ks_stat", "KS statistic"), ("ks_p", "KS p-value"),
                      ("spearman_nll_gradient", "Spearman ρ(NLL, image gradient)"), ("spearman_p", "Spearman p-value"),
                      ("gradient_tail_over_rest", "image gradient, tail / rest")):
        rows.append([name, sa[key], sb[key]])
    L += [_table(["statistic", *labels], rows), ""]
    for lab, s in zip(labels, (sa, sb)):
        where = "nearer to" if s["mean_border_distance_tail"] < s["mean_border_distance_all"] else "farther from"
        sig = "differ significantly from" if s["ks_p"] < 0.05 else "do not differ significantly from"
        L.append(f"- {lab}: on average the tail lies {where} the border than all patches do "
                 f"({_f(s['mean_border_distance_tail'], 2)} vs {_f(s['mean_border_distance_all'], 2)} patches); its border "
                 f"distances {sig} uniform positions (KS p = {_f(s['ks_p'])}); Spearman of NLL with the image gradient "
                 f"{_f(s['spearman_nll_gradient'], 3)}.")
    L.append("")
    img("1")

    # 2
    L += ["## 2. Train-tail features vs test defect / good features", ""]
    ra, rb = a["similarity"], b["similarity"]
    if not ra.get("applicable"):
        L += [ra["reason"].capitalize() + ".", ""]
    else:
        L.append(f"Backbone patch features. Tail: top-ρ training patches of each run. Defect patches: {ra['defect_rule']} "
                 f"({ra['n_defect']} patches); good: all patches of good test images ({ra['n_good']}). Prototype: cosine "
                 "of the mean vectors; nearest: mean over test patches of the cosine to their most similar tail patch. "
                 "'Centred' subtracts the mean training feature first, so that an offset shared by all features does "
                 "not dominate the cosine.")
        L.append("")
        rows = []
        for kind in ("raw", "centred"):
            for how in ("proto", "nearest"):
                for lab, r in zip(labels, (ra, rb)):
                    d, g = r[f"{kind}_{how}_defect"], r[f"{kind}_{how}_good"]
                    # a ratio of cosines only reads as "how much more similar" when both are positive
                    rows.append([f"{kind}, {how}", lab, d, g, d - g, d / g if d > 0 and g > 0 else None])
        L += [_table(["cosine", "run", "to test defect", "to test good", "difference", "ratio"], rows), ""]
        L.append("A difference > 0 (ratio > 1) means the train tail resembles test defects more than test goods (H2); "
                 "the ratio is left out when a cosine is not positive.")
        L.append("")
        img("2")

    # 3
    L += ["## 3. Gradient norms per coupling block during training", ""]
    if not grads["recorded"]:
        L += [f"Not recorded for {', '.join(grads['missing'])}: train with `train.record_grad_norms=true` "
              "(results.json then holds, per epoch, the mean gradient norm of each coupling block).", ""]
    else:
        L.append(f"Mean over epochs ({grads['epochs'][0]} / {grads['epochs'][1]}) of the per-step gradient norm of each "
                 "base-flow coupling block (before clipping); ratio = tail-aware / mean-only, also for the first and last epoch.")
        L.append("")
        L += [_table(["block", *labels, "ratio", "ratio, first epoch", "ratio, last epoch"],
                     [[r["block"], r["mean_only"], r["tail_aware"], r["ratio"], r["first_ratio"], r["last_ratio"]]
                      for r in grads["rows"]]), ""]
        img("3")

    # 4
    L += ["## 4. Latent calibration (test good patches)", ""]
    la, lb = a["latent"], b["latent"]
    if la.get("applicable") is False or lb.get("applicable") is False:
        L += ["Not applicable: the test set has no good images.", ""]
    else:
        L.append(f"z of up to {MAX_STAT_PATCHES} patches of good test images. QQ r: scipy.stats.probplot correlation of all "
                 "z components with N(0,1); quantile error |empirical − normal| at p; normality: D'Agostino–Pearson "
                 f"test per channel on {MAX_NORMALITY_PATCHES} of the patches (neighbouring patches are correlated, so "
                 "the p-values come out smaller than for independent samples: compare the runs rather than read them "
                 "absolutely); ‖z‖²/C should be 1.")
        L.append("")
        rows = [["patches × channels", f"{la['n_patches']} × {la['channels']}", f"{lb['n_patches']} × {lb['channels']}", ""]]
        keys = [("qq_r", "QQ correlation r"), ("z_mean", "mean of z"), ("z_std", "std of z"), ("sq_norm_per_dim", "‖z‖²/C")]
        for p in CALIBRATION_QUANTILES:
            keys += [(f"q_err_{p}", f"quantile error at {p}"), (f"q_err_{1 - p:.3g}", f"quantile error at {1 - p:.3g}")]
        keys += [("normal_frac_p_gt_0.05", "channels with normality p > 0.05"), ("normal_median_p", "median normality p")]
        for k, name in keys:
            rows.append([name, la[k], lb[k], None if la[k] is None or lb[k] is None else lb[k] - la[k]])
        L += [_table(["statistic", *labels, "tail − mean"], rows), ""]
        img("4")

    # 5
    L += ["## 5. Separation of good and defective pixel scores", ""]
    ea, eb = a["separation"], b["separation"]
    if not ea.get("applicable"):
        L += [ea["reason"].capitalize() + ".", ""]
    else:
        L.append("Anomaly maps (upsampled, blurred patch scores) of the analysed test images; good = pixels outside the "
                 f"masks, defect = inside (subsampled to ≤ {MAX_PIXELS} each). Fisher = (μ1−μ0)²/(σ1²+σ0²); overlap = "
                 "intersection of the two normalised 100-bin histograms.")
        L.append("")
        rows = [[name, ea[k], eb[k]] for k, name in (
            ("mean_good", "mean, good"), ("std_good", "std, good"), ("mean_defect", "mean, defect"),
            ("std_defect", "std, defect"), ("fisher", "Fisher ratio"), ("overlap", "histogram overlap"),
            ("pixel_auroc_subsample", "pixel AUROC (these pixels)"))]
        L += [_table(["statistic", *labels], rows), ""]
        L.append(_diff_line(ea["fisher"], eb["fisher"], "Fisher ratio") + " " + _diff_line(ea["overlap"], eb["overlap"], "overlap"))
        L.append("")
        img("5")

    # 6
    L += ["## 6. Per-block log-det statistics", ""]
    ga, gb = a["logdet"], b["logdet"]
    if not ga.get("applicable"):
        L += [ga["reason"].capitalize() + ".", ""]
    else:
        L.append("Per-patch log|det J| of each base-flow coupling block (in BaseFlow order), of the whole DIA and the "
                 "total, on patches of good test images; 'defect − good': mean on defect patches minus mean on good ones.")
        L.append("")
        rows = []
        for x, y in zip(ga["rows"], gb["rows"]):
            rows.append([x["part"], x["mean"], x["std"], y["mean"], y["std"], y["mean"] - x["mean"],
                         x["defect_minus_good"], y["defect_minus_good"]])
        L += [_table(["part", f"mean, {labels[0]}", f"std, {labels[0]}", f"mean, {labels[1]}", f"std, {labels[1]}",
                      "Δ mean", f"defect − good, {labels[0]}", f"defect − good, {labels[1]}"], rows), ""]
        img("6")

    # 7
    L += ["## 7. Gradient concentration and the tail-ratio sweep", ""]
    ca, cb = a["concentration"], b["concentration"]
    L.append(f"Loss weight of each patch = ∂L/∂n_patch, by autograd through the run's own loss (NLL part) on "
             f"{ca['n_batches']} training batch(es) of {ca['batch_images']} images ({ca['batch_patches']} patches, "
             f"K = {ca['tail_count']} in the tail). For the batch-scope loss it is (1−w)/N + w/K in the top ρ and (1−w)/N "
             "elsewhere, whose Gini is exactly w·(1 − K/N). Effective patches = exp(entropy of the weights); tail "
             "share = fraction of the total weight on the top K.")
    L.append("")
    rows = [[lab, c["tail_weight"], c["tail_ratio"], c["gini"], c["gini_exact"], c["effective_patches"], c["tail_share"],
             c.get("image_auroc"), c.get("pixel_ap")] for lab, c in zip(labels, (ca, cb))]
    head = ["run", "w", "ρ", "Gini", "Gini exact", "effective patches", "tail share", "image AUROC", "pixel AP"]
    L += [_table(head, rows), ""]
    if sweep_rows:
        L += ["Sweep (sorted by ρ):", ""]
        rows = [[f"`{r['run']}`", r["tail_weight"], r["tail_ratio"], r["gini"], r["gini_exact"], r["effective_patches"],
                 r["tail_share"], r.get("image_auroc"), r.get("pixel_ap")] for r in sorted(sweep_rows, key=lambda r: r["tail_ratio"])]
        L += [_table(head, rows), ""]
    else:
        L += ["No sweep runs given (`--sweep RUN_DIR...`, e.g. a `moleflow grid ... --vary loss.tail_ratio=0.01,0.02,0.05` folder).", ""]
    if sweep_skipped:
        L += ["Skipped: " + "; ".join(sweep_skipped), ""]
    img("7")
    return "\n".join(L).rstrip() + "\n"
