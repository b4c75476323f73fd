"""Evaluation metrics: image AUROC, pixel AUROC, pixel AP and AUPRO (FPR ≤ 0.3 by default).

Image and pixel AUROC use scikit-learn's ``roc_auc_score``; pixel AP uses ``average_precision_score``,
i.e. the step-wise sum  Σ_n (R_n − R_{n−1}) · P_n  (not a trapezoid under the PR curve).

AUPRO follows the official MVTec AD evaluation code (``compute_pro`` + ``trapezoid``):

* every test image's ground-truth mask is split into 8-connected components (3×3 structure of ones),
  per image; each component is one region, regions of all images are pooled;
* every defect-free pixel of every test image (good images and the background of defective images)
  counts toward the false-positive rate;
* one curve point per distinct anomaly score s, thresholding at ``score >= s``:
  FPR(s) = #{ok pixels ≥ s} / #ok pixels, PRO(s) = mean over regions of #{region pixels ≥ s} / |region|;
  the curve starts at (0, 0) and ends at (1, 1);
* the area is integrated with the trapezoid rule up to ``fpr_limit``; the curve value at the limit is
  linearly interpolated between its neighbours; the area is divided by ``fpr_limit``.

The official code builds per-pixel FPR/PRO increments for all pixels, argsorts all scores and takes
cumulative sums. We compute the same piecewise-linear curve with less memory: the defect-free scores are
sorted in place (no index array) and only the few defect pixels are argsorted. Between two consecutive
distinct defect scores the PRO is constant, so the official points there lie on one horizontal line and
only its ends matter; at a distinct defect score u the curve goes from (#ok > u, PRO before u) to
(#ok ≥ u, PRO at u), which is exactly the official point (a diagonal when ok pixels tie with u). Counts
are exact integers; only the PRO sums are floating point (float64).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

ArrayLike = np.ndarray | torch.Tensor

METRIC_KEYS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")

# 8-connectivity for ground-truth regions, as in the official MVTec AD evaluation.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Tensors (any device, any float dtype) and array-likes → numpy without copying when possible."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # numpy has no bfloat16; float32 holds both exactly
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from err


def _scores(x: ArrayLike, name: str) -> np.ndarray:
    """Real-valued, finite scores in a float dtype that represents every input value exactly."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected real-valued scores, got dtype {arr.dtype}")
    # float16/int8/int16 → float32, int32/int64 → float64, float32/float64 unchanged (no copy).
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values; metrics need finite scores")
    return arr


def _binary(x: ArrayLike, name: str) -> np.ndarray:
    """Labels / masks as a bool array; only {0, 1} (or bool) is accepted."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: expected bool or 0/1 values, got dtype {arr.dtype}")
    positive = arr == 1
    if not (positive | (arr == 0)).all():
        bad = arr[(arr != 0) & (arr != 1)].ravel()[:3]
        raise ValueError(
            f"{name}: must be binary (bool or 0/1), found values such as {bad.tolist()} "
            "(a 0/255 mask must be divided by 255 first)"
        )
    return positive


def _image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels, "labels").ravel()
    s = _scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} labels vs {s.size} scores")
    return y, s


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = _binary(masks, "masks")
    a = _scores(maps, "maps")
    if m.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {m.shape}")
    if m.shape != a.shape:
        raise ValueError(
            f"masks and maps differ in shape: {m.shape} vs {a.shape} "
            "(anomaly maps must be resized to the mask resolution first)"
        )
    return m, a


# --------------------------------------------------------------------------------------------------
# image level and pixel level (scikit-learn)
# --------------------------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """ROC AUC of image scores (higher = more anomalous) against labels (1 = defective).

    None when only one class is present (the AUROC is undefined then).
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float | None:
    """ROC AUC over all pixels. masks (N, H, W) bool/0-1, maps (N, H, W) float.

    Good images must be included with all-zero masks. None when there is no defective pixel (or no
    defect-free one).
    """
    m, a = _pixel_inputs(masks, maps)
    if not m.any() or m.all():
        return None
    return float(roc_auc_score(m.ravel(), a.ravel()))


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float | None:
    """Average precision over all pixels, step-wise as scikit-learn defines it: Σ (R_n − R_{n−1}) P_n.

    None when there is no defective pixel.
    """
    m, a = _pixel_inputs(masks, maps)
    if not m.any():
        return None
    return float(average_precision_score(m.ravel(), a.ravel()))


def roc_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the image-level ROC curve, from scikit-learn's ``roc_curve``, for plots."""
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        raise ValueError("roc_points: labels hold only one class; a ROC curve needs good and defective images")
    fpr, tpr, thresholds = roc_curve(y, s)
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------


def _ok_and_region_pixels(m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Sorted scores of all defect-free pixels, the scores of all region pixels, and each region pixel's
    PRO weight 1 / (n_regions · |its region|); None when there is no region or no defect-free pixel."""
    # Scores of all defect-free pixels, filled image by image. Preallocated at full size (worst case
    # "no defects") so that no list of per-image copies plus a concatenated copy coexist.
    ok_scores = np.empty(m.size, dtype=a.dtype)  # (N·H·W,) only the first n_ok entries are used
    n_ok = 0
    defect_scores: list[np.ndarray] = []  # per defective image: scores of its region pixels
    defect_sizes: list[np.ndarray] = []  # per defective image: size of the region of each such pixel
    n_regions = 0
    for i in range(m.shape[0]):
        mask_i, map_i = m[i], a[i]  # (H, W)
        if not mask_i.any():
            ok_scores[n_ok : n_ok + map_i.size] = map_i.ravel()
            n_ok += map_i.size
            continue
        # Label per image: regions never connect across images.
        labeled, n_comp = ndimage.label(mask_i, structure=_EIGHT_CONNECTED)  # (H, W) int32
        ok_i = map_i[~mask_i]
        ok_scores[n_ok : n_ok + ok_i.size] = ok_i
        n_ok += ok_i.size
        sizes = np.bincount(labeled.ravel(), minlength=n_comp + 1)  # sizes[0] is the background
        defect_scores.append(map_i[mask_i])
        defect_sizes.append(sizes[labeled[mask_i]])  # same C order as map_i[mask_i]
        n_regions += n_comp
    if n_regions == 0 or n_ok == 0:
        return None
    ok_sorted = ok_scores[:n_ok]
    ok_sorted.sort()  # ascending, in place: no index array over the ok pixels
    d = np.concatenate(defect_scores)  # (D,) scores of all region pixels
    # Each region pixel adds 1 / (n_regions · |region|) to the PRO once the threshold reaches it.
    weight = 1.0 / (np.concatenate(defect_sizes).astype(np.float64) * n_regions)
    return ok_sorted, d, weight


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """The PRO curve (fpr, pro) as a piecewise-linear curve from (0, 0) to (1, 1), float64 arrays.

    It is the official MVTec AD curve with the collinear points of constant-PRO runs left out (see the
    module docstring), so plotting it or integrating it gives the same result. None when there is no
    ground-truth region or no defect-free pixel.
    """
    pixels = _ok_and_region_pixels(*_pixel_inputs(masks, maps))
    if pixels is None:
        return None
    ok_sorted, d, weight = pixels
    del pixels
    n_ok = ok_sorted.size
    order = np.argsort(d)[::-1]  # descending scores; order within ties is irrelevant (see below)
    d = d[order]
    cum_pro = np.cumsum(weight[order])
    del order, weight
    # Ties: one threshold per distinct score, so keep only the last entry of each run of equal scores.
    last_of_run = np.flatnonzero(np.append(d[1:] != d[:-1], True))
    u = d[last_of_run]  # (K,) distinct defect scores, descending
    pro = np.minimum(cum_pro[last_of_run], 1.0)  # clip float round-off, as the official code does
    del d, cum_pro, last_of_run

    # Exact FP counts at each distinct defect score u: ok pixels strictly above u (the point just before
    # u's pixels are added) and ok pixels ≥ u (the point after).
    above = n_ok - np.searchsorted(ok_sorted, u, side="right")  # (K,) #ok > u
    at_or_above = n_ok - np.searchsorted(ok_sorted, u, side="left")  # (K,) #ok ≥ u

    k = u.size
    fp = np.empty(2 * k + 3, dtype=np.float64)
    pr = np.empty(2 * k + 3, dtype=np.float64)
    fp[0], pr[0] = 0.0, 0.0
    fp[1 : 2 * k + 1 : 2], pr[1 : 2 * k + 1 : 2] = above, np.concatenate(([0.0], pro[:-1]))
    fp[2 : 2 * k + 2 : 2], pr[2 : 2 * k + 2 : 2] = at_or_above, pro
    # After the lowest defect score only ok pixels remain: a horizontal run to FPR 1, then up to (1, 1).
    fp[-2], pr[-2] = n_ok, pro[-1]
    fp[-1], pr[-1] = n_ok, 1.0
    fp /= n_ok
    return fp, pr


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid-rule area under (x, y) on [x[0], x_max]; x non-decreasing with x[0] ≤ x_max ≤ x[-1].

    As the official ``trapezoid(x, y, x_max)``: the y value at x_max is linearly interpolated between the
    last point with x ≤ x_max and the next one.
    """
    ins = int(np.searchsorted(x, x_max, side="right"))  # first index with x > x_max (bisect_right)
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max:  # x_max is not a curve point: add the partial segment up to it
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (official MVTec AD algorithm), in [0, 1].

    masks (N, H, W) bool/0-1 with all-zero masks for good images, maps (N, H, W) float. None when there
    is no defective pixel (or no defect-free pixel).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(masks, maps)
    if curve is None:
        return None
    fpr, pro = curve
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


# --------------------------------------------------------------------------------------------------
# all at once
# --------------------------------------------------------------------------------------------------


def compute_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    aupro_fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """All four metrics; keys ``METRIC_KEYS``. Pixel metrics are None without masks (never faked)."""
    if masks is not None and maps is None:
        raise ValueError("compute_metrics: masks given without anomaly maps")
    result: dict[str, float | None] = {key: None for key in METRIC_KEYS}
    result["image_auroc"] = image_auroc(labels, scores)
    if masks is None or maps is None:
        return result
    m, a = _pixel_inputs(masks, maps)  # validate and convert once, then reuse
    n_labels = _to_numpy(labels, "labels").size
    if m.shape[0] != n_labels:
        raise ValueError(f"compute_metrics: {m.shape[0]} masks (images) for {n_labels} labels")
    result["pixel_auroc"] = pixel_auroc(m, a)
    result["pixel_ap"] = pixel_ap(m, a)
    result["aupro"] = aupro(m, a, fpr_limit=aupro_fpr_limit)
    return result
