"""The seven measurements of a run (METHOD.md §7): each returns a dict of numbers for analysis.json and
the report; keys starting with '_' hold the arrays the figures need and are left out of the JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from moleflow.data import load_image
from moleflow.features.cache import FeatureSet
from moleflow.model.loss import patch_nll, tail_count
from moleflow.research.analysis.loading import FeatureStore, FlowOutputs, Run, open_run
from moleflow.research.analysis.statistics import (
    DEFECT_CELL_FRACTION,
    MAX_PIXELS,
    MAX_STAT_PATCHES,
    MAX_TAIL_FOR_NEAREST,
    border_distance,
    border_ks,
    cell_fractions,
    effective_count,
    fisher_ratio,
    gini,
    gradient_cells,
    histogram_overlap,
    latent_calibration,
    loss_patch_weights,
    loss_weight_gini_exact,
    subsample_rows,
    tail_mask,
)
from moleflow.research.compare import collect_runs
from moleflow.scoring import anomaly_map, patch_scores


def spatial_tail(run: Run, train: FeatureSet, out_train: FlowOutputs) -> dict[str, Any]:
    """1. Where the top-ρ training patches lie."""
    nll = patch_nll(out_train.z, out_train.log_det)  # (N, H, W)
    n, h, w = nll.shape
    tail = tail_mask(nll, run.loss.tail_ratio, run.loss.tail_scope)  # (N, H, W)
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


def _defect_patches(test: FeatureSet, grid: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """(N, H, W) bool defect patches of the test images and the rule that chose them."""
    frac = cell_fractions(test.masks, grid)  # (N, H, W)
    defect_sel = frac >= DEFECT_CELL_FRACTION
    if not defect_sel.any():
        return frac > 0, "cell touches the mask (no cell is half inside)"
    return defect_sel, f"cell ≥ {DEFECT_CELL_FRACTION:.0%} in the mask"


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def feature_similarity(train: FeatureSet, tail: torch.Tensor, test: FeatureSet, rng: np.random.Generator) -> dict[str, Any]:
    """2. Cosine similarity of train-tail backbone features to test-defect vs test-good features."""
    if test.masks is None:
        return {"applicable": False, "reason": "not applicable (no masks)"}
    grid = tuple(test.patches.shape[1:3])
    x_train = train.patches.float()
    tail_f = x_train[tail].numpy().astype(np.float64)  # (K, C)
    defect_sel, rule = _defect_patches(test, grid)
    good_img = test.labels == 0
    x_test = test.patches.float()
    defect_f = x_test[defect_sel].numpy().astype(np.float64)
    good_f = x_test[good_img].reshape(-1, x_test.shape[-1]).numpy().astype(np.float64)
    if len(defect_f) == 0 or len(good_f) == 0:
        return {"applicable": False, "reason": "not applicable (no defect patches or no good test images)"}
    train_mean = x_train.reshape(-1, x_train.shape[-1]).mean(0).numpy().astype(np.float64)
    defect_f, good_f = subsample_rows(defect_f, MAX_STAT_PATCHES, rng), subsample_rows(good_f, MAX_STAT_PATCHES, rng)
    tail_n = subsample_rows(tail_f, MAX_TAIL_FOR_NEAREST, rng)
    res: dict[str, Any] = {"applicable": True, "defect_rule": rule, "n_tail": len(tail_f), "n_defect": int(defect_sel.sum()),
                           "n_good": int(good_img.sum()) * grid[0] * grid[1]}
    for name, centre in (("raw", np.zeros_like(train_mean)), ("centred", train_mean)):
        proto = tail_f.mean(0) - centre
        res[f"{name}_proto_defect"] = _cos(proto, defect_f.mean(0) - centre)
        res[f"{name}_proto_good"] = _cos(proto, good_f.mean(0) - centre)
        tn = _unit(tail_n - centre)
        nd = (_unit(defect_f - centre) @ tn.T).max(1)  # nearest train-tail patch of each defect patch
        ng = (_unit(good_f - centre) @ tn.T).max(1)
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


def good_latents(test: FeatureSet, out_test: FlowOutputs, rng: np.random.Generator) -> np.ndarray:
    """4. (input) z (n, C') of up to MAX_STAT_PATCHES patches of the good test images."""
    good = (test.labels == 0).numpy()
    c = out_test.z.shape[-1]
    z_good = out_test.z.numpy()[good].reshape(-1, c) if good.any() else np.zeros((0, c))
    return subsample_rows(z_good, MAX_STAT_PATCHES, rng)


def score_separation(run: Run, test: FeatureSet, out_test: FlowOutputs, rng: np.random.Generator) -> dict[str, Any]:
    """5. Good vs defective pixel scores of the anomaly maps (of the patch NLL, whatever scoring.patch_score)."""
    if test.masks is None:
        return {"applicable": False, "reason": "not applicable (no masks)"}
    cfg = run.system.cfg
    s = patch_scores(out_test.z, out_test.log_det, "nll")  # (N, H, W)
    maps = torch.cat([anomaly_map(s[i : i + 16], cfg.data.image_size, cfg.scoring.blur_sigma) for i in range(0, len(s), 16)])
    masks = test.masks[:, 0]
    defect, good = maps[masks].numpy(), maps[~masks].numpy()
    if defect.size == 0:
        return {"applicable": False, "reason": "not applicable (the masks mark no pixel)"}
    defect, good = subsample_rows(defect, MAX_PIXELS, rng), subsample_rows(good, MAX_PIXELS, rng)
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
        defect_sel = (cell_fractions(test.masks, tuple(out_test.log_det.shape[1:])) >= DEFECT_CELL_FRACTION).numpy()
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
        out_train = run.flow(train.patches)
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


# --------------------------------------------------------------------------- all of a run, the sweep


def measure_run(run: Run, train: FeatureSet, test: FeatureSet, rng: np.random.Generator) -> dict[str, Any]:
    """Measurements 1, 2, 4, 5, 6, 7 of one run on its task's subsampled train and test features."""
    o_train, o_test = run.flow(train.patches), run.flow(test.patches)
    sp = spatial_tail(run, train, o_train)
    z_good = good_latents(test, o_test, rng)  # drawn before the others: the order of rng draws is the output's
    return {
        "spatial": sp,
        "similarity": feature_similarity(train, sp["_tail"], test, rng),
        "latent": latent_calibration(z_good, rng) if len(z_good) else {"applicable": False},
        "_z_good": z_good,
        "separation": score_separation(run, test, o_test, rng),
        "logdet": block_logdet_stats(run, test, o_test),
        "concentration": loss_concentration(run, train, o_train),
        "n_train_images": len(train), "n_test_images": len(test),
    }


def sweep_concentration(sweep: list[Path] | tuple[Path, ...], runs: list[Run], store: FeatureStore,
                        task: int) -> tuple[list[dict[str, Any]], list[str]]:
    """7. Loss concentration of each sweep run (run directories or grid folders); rows and skipped reasons."""
    if not sweep:
        return [], []
    found, skipped = collect_runs([Path(p) for p in sweep])
    main_runs = {r.path.resolve(): r for r in runs}
    rows = []
    for item in found:
        r = main_runs.get(item.path.resolve()) or open_run(item.path, item.name, task)
        row = loss_concentration(r, store.get(r, "train"))
        row["run"] = item.name
        rows.append(row)
    return rows, [f"{s.path}: {s.reason}" for s in skipped]
