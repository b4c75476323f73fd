"""Tests of moleflow.metrics: wiring to scikit-learn, step-wise AP, and AUPRO by hand and by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label as sk_label
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from moleflow.metrics import (
    METRIC_KEYS,
    aupro,
    compute_metrics,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pro_curve,
    roc_points,
)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def random_rect_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool: every other image gets one or two random rectangles, the rest are good."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 3)):
            rh, rw = rng.integers(1, h // 3, size=2)
            y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
            masks[i, y : y + rh, x : x + rw] = True
    return masks


def brute_force_pro_points(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent PRO curve: one point per distinct threshold, FPR and mean region overlap counted directly.

    Regions come from scikit-image (connectivity=2 is 8-connectivity), per image.
    """
    regions = []  # list of score arrays, one per region
    for mask_i, map_i in zip(masks, maps):
        lab = sk_label(mask_i, connectivity=2)
        regions += [map_i[lab == r] for r in range(1, lab.max() + 1)]
    ok = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:  # descending thresholds, prediction = score >= t
        fprs.append(np.mean(ok >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fprs), np.array(pros)


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    fprs, pros = brute_force_pro_points(masks, maps)
    if limit == 1.0:
        return float(np.trapezoid(pros, fprs))
    # Cut at the limit: keep points with fpr <= limit, add the linearly interpolated point at the limit.
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    nxt = np.argmax(fprs > limit)  # first point past the limit (x is non-decreasing)
    if x[-1] < limit:
        y_lim = y[-1] + (pros[nxt] - y[-1]) * (limit - x[-1]) / (fprs[nxt] - x[-1])
        x, y = np.append(x, limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x)) / limit


# --------------------------------------------------------------------------------------------------
# scikit-learn wiring
# --------------------------------------------------------------------------------------------------


def test_image_and_pixel_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=40)
    scores = rng.normal(size=40).astype(np.float32) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)

    masks = random_rect_masks(rng, 6, 16, 16)
    maps = rng.random((6, 16, 16)).astype(np.float32) + 0.5 * masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)

    fpr, tpr, thr = roc_points(labels, scores)
    ref = roc_curve(labels, scores)
    for ours, theirs in zip((fpr, tpr, thr), ref):
        np.testing.assert_array_equal(ours, theirs)


def test_torch_tensors_and_01_masks_are_accepted() -> None:
    rng = np.random.default_rng(1)
    masks = random_rect_masks(rng, 4, 12, 12)
    maps = rng.random((4, 12, 12)).astype(np.float32)
    labels = masks.reshape(4, -1).any(1)
    scores = maps.reshape(4, -1).max(1)
    ref = compute_metrics(labels, scores, masks, maps)
    got = compute_metrics(
        torch.from_numpy(labels.astype(np.int64)),
        torch.from_numpy(scores).requires_grad_(True),  # detach must happen inside
        torch.from_numpy(masks.astype(np.float32)),  # 0/1 floats
        torch.from_numpy(maps),
    )
    assert got == ref


def test_pixel_ap_is_stepwise_not_trapezoid() -> None:
    # Pixels ranked by score: 0.9 (defect), 0.8 (ok), 0.7 (defect), 0.6 (ok); 2 defect pixels.
    masks = np.array([[[1, 0], [1, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.8], [0.7, 0.6]]])
    # Thresholds high to low: (recall, precision) = (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2).
    # Step-wise AP = Σ (R_n − R_{n−1}) P_n = 1/2·1 + 1/2·(2/3) = 5/6.
    stepwise = 5 / 6
    # Trapezoid through (0, 1), (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2):
    # 1/2·(1 + 1)/2 + 0 + 1/2·(1/2 + 2/3)/2 + 0 = 1/2 + 7/24 = 19/24.
    trapezoid = 19 / 24
    recall_precision = precision_recall_curve(masks.ravel(), maps.ravel())
    assert auc(recall_precision[1], recall_precision[0]) == pytest.approx(trapezoid)  # hand value is right
    assert pixel_ap(masks, maps) == pytest.approx(stepwise, abs=1e-12)
    assert abs(pixel_ap(masks, maps) - trapezoid) > 0.04


def test_none_when_undefined() -> None:
    assert image_auroc([1, 1, 1], [0.1, 0.5, 0.2]) is None
    assert image_auroc(np.zeros(4), np.arange(4.0)) is None
    good = np.zeros((3, 8, 8), dtype=bool)
    maps = np.random.default_rng(2).random((3, 8, 8))
    assert pixel_auroc(good, maps) is None
    assert pixel_ap(good, maps) is None
    assert aupro(good, maps) is None
    assert aupro(np.ones((2, 4, 4), dtype=bool), maps[:2, :4, :4]) is None  # no defect-free pixel
    with pytest.raises(ValueError, match="one class"):
        roc_points([0, 0], [0.1, 0.2])


def test_clear_errors() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="255"):
        pixel_auroc(np.full((2, 4, 4), 255, dtype=np.uint8), maps)
    with pytest.raises(ValueError, match="differ in shape"):
        aupro(np.zeros((2, 8, 8), dtype=bool), maps)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.eye(4, dtype=bool)[None].repeat(2, 0), np.full((2, 4, 4), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(4, dtype=bool)[None], np.zeros((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc([0, 1, 1], [0.1, 0.2])


# --------------------------------------------------------------------------------------------------
# AUPRO by hand
# --------------------------------------------------------------------------------------------------


def test_aupro_perfect_scores_is_one() -> None:
    masks = random_rect_masks(np.random.default_rng(3), 6, 16, 16)
    maps = masks.astype(np.float32)  # every defect pixel above every ok pixel
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_two_images_by_hand() -> None:
    # Image A: region R1 = 2 pixels (scores 0.9, 0.3), 4 ok pixels (0.8, 0.1, 0.2, 0.3).
    # Image B: region R2 = 1 pixel (score 0.7), 5 ok pixels (0.4, 0.15, 0.25, 0.3, 0.05).
    # R1 ends at A[0, 1], R2 sits at B[0, 2]: neighbours if the stack were labelled in 3-D, so this also
    # checks that regions are labelled per image.
    masks = np.array([[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.3, 0.8], [0.1, 0.2, 0.3]], [[0.4, 0.15, 0.7], [0.25, 0.3, 0.05]]])
    # 9 ok pixels, 2 regions. Thresholds high to low, (FPR, PRO = mean of region overlaps):
    #   0.9: R1 1/2, R2 0 → (0, 1/4)
    #   0.8: one ok     → (1/9, 1/4)
    #   0.7: R2 full    → (1/9, (1/2 + 1)/2 = 3/4)
    #   0.4: one ok     → (2/9, 3/4)
    #   0.3: two ok + R1's second pixel (a tie) → (4/9, 1): a diagonal segment
    #   0.25 … 0.05: the remaining ok pixels → (5/9, 1) … (1, 1)
    # Area up to 0.3:
    #   [0, 1/9] at 1/4                          → 1/36
    #   [1/9, 2/9] at 3/4                        → 1/12
    #   [2/9, 0.3] on the line (2/9, 3/4)→(4/9, 1), slope 9/8; width 0.3 − 2/9 = 7/90;
    #     y(0.3) = 3/4 + 9/8 · 7/90 = 3/4 + 7/80 → area (3/4 + 3/4 + 7/80)/2 · 7/90 = 889/14400
    #   total 400/14400 + 1200/14400 + 889/14400 = 2489/14400; divided by 0.3 → 2489/4320
    assert aupro(masks, maps) == pytest.approx(2489 / 4320, abs=1e-12)
    # Full area: 1/4·1/9 + 3/4·1/9 + (3/4 + 1)/2·2/9 + 1·5/9 = (1/4 + 3/4 + 7/4 + 5)/9 = 31/36.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(31 / 36, abs=1e-12)


def test_aupro_all_equal_scores_is_diagonal() -> None:
    # One threshold: the curve jumps from (0, 0) straight to (1, 1); area to 0.3 is 0.3²/2 = 0.045.
    masks = random_rect_masks(np.random.default_rng(4), 4, 10, 10)
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    assert aupro(masks, maps) == pytest.approx(0.045 / 0.3, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_random_scores_near_diagonal() -> None:
    # Random scores: every region's overlap at FPR f is ≈ f, so AUPRO@0.3 ≈ 0.045 / 0.3 = 0.15.
    rng = np.random.default_rng(5)
    masks = random_rect_masks(rng, 50, 64, 64)
    maps = rng.random(masks.shape, dtype=np.float32)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("levels", [None, 7, 3])  # None: continuous scores; else quantised (many ties)
@pytest.mark.parametrize("seed", [6, 7])
def test_aupro_matches_brute_force(levels: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_rect_masks(rng, 6, 12, 12)
    maps = rng.random(masks.shape) + 0.3 * masks
    if levels is not None:
        maps = np.floor(maps * levels) / levels  # ties between ok and defect pixels → diagonal segments
    for limit in (1.0, 0.3, 0.05, 0.7):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_force_aupro(masks, maps, limit), abs=1e-6
        ), limit
    # float32 maps give the same result as the float64 values they hold.
    maps32 = maps.astype(np.float32)
    assert aupro(masks, maps32) == pytest.approx(brute_force_aupro(masks, maps32.astype(np.float64), 0.3), abs=1e-6)


def test_pro_curve_contains_the_brute_force_points() -> None:
    # Every official (FPR, PRO) point lies on our compacted curve: at its FPR, our curve spans its PRO.
    rng = np.random.default_rng(8)
    masks = random_rect_masks(rng, 4, 10, 10)
    maps = np.floor((rng.random(masks.shape) + 0.3 * masks) * 5)
    fpr, pro = pro_curve(masks, maps)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    for x, y in zip(*brute_force_pro_points(masks, maps)):
        at_x = pro[np.isclose(fpr, x, atol=1e-12)]
        if at_x.size:  # a vertex (or vertical segment) of our curve
            assert at_x.min() - 1e-12 <= y <= at_x.max() + 1e-12
        else:  # inside a segment
            assert np.interp(x, fpr, pro) == pytest.approx(y, abs=1e-12)


def test_aupro_regions_are_eight_connected() -> None:
    # Defect pixels (0,0), (0,1) and (1,2): (1,2) touches (0,1) only diagonally.
    # 8-connected: one region of 3 pixels. 4-connected it would be {(0,0),(0,1)} and {(1,2)}.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0] = maps[0, 0, 1] = 0.0
    maps[0, 1, 2] = 1.0
    # Threshold 1.0 catches (1,2) with no false positive: PRO = 1/3 (one region) — with two regions it
    # would be (0 + 1)/2 = 1/2. Threshold 0.5 adds all 6 ok pixels (FPR 1); 0.0 completes the region.
    # Curve (0,0) → (0,1/3) → (1,1/3) → (1,1): AUPRO@0.3 = 1/3.
    assert aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------------------------------


def test_compute_metrics_keys_and_none_without_masks() -> None:
    rng = np.random.default_rng(9)
    labels = np.array([0, 1, 0, 1])
    scores = rng.random(4)
    result = compute_metrics(labels, scores)
    assert set(result) == set(METRIC_KEYS) == {"image_auroc", "pixel_auroc", "pixel_ap", "aupro"}
    assert result["image_auroc"] == image_auroc(labels, scores)
    assert result["pixel_auroc"] is None and result["pixel_ap"] is None and result["aupro"] is None
    # Maps without masks: still no pixel metrics.
    assert compute_metrics(labels, scores, maps=rng.random((4, 8, 8)))["aupro"] is None

    masks = random_rect_masks(rng, 4, 8, 8)
    maps = rng.random((4, 8, 8))
    full = compute_metrics(labels, scores, masks, maps)
    assert full["pixel_auroc"] == pixel_auroc(masks, maps)
    assert full["pixel_ap"] == pixel_ap(masks, maps)
    assert full["aupro"] == aupro(masks, maps)
    assert all(type(v) is float for v in full.values())  # plain floats, JSON-serialisable
    with pytest.raises(ValueError, match="without anomaly maps"):
        compute_metrics(labels, scores, masks=masks)
