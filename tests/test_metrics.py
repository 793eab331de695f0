"""Tests for larp.metrics: hand-computed cases and an independent MVTec-style reference."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from larp import metrics as M
from larp.metrics import UndefinedMetricWarning

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Independent reference: a loop over every distinct score, regions from scipy.ndimage.label
# with a 3x3 structure per image (as the MVTec AD evaluation code does).
# ---------------------------------------------------------------------------------------------


def ref_pro_curve(maps, masks):
    regions, normal = [], []
    for m, g in zip(maps, masks, strict=True):
        labeled, n = ndimage.label(g, structure=np.ones((3, 3), dtype=int))
        regions.extend(m[labeled == k] for k in range(1, n + 1))
        normal.append(m[g == 0])
    normal = np.concatenate(normal)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fprs), np.array(pros)


def ref_area(x, y, limit):
    """Segment-by-segment area under the polyline for x in [0, limit], divided by limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
    return area / limit


def ref_aupro(maps, masks, limit=0.3):
    return ref_area(*ref_pro_curve(maps, masks), limit)


def ref_f1_max(scores, labels):
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    best, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:  # high to low: the first best is the highest threshold
        pred = scores >= t
        tp = np.sum(pred & labels)
        f1 = 2 * tp / (np.sum(pred) + np.sum(labels))
        if f1 > best:
            best, best_t = f1, t
    return best, best_t


def random_maps(seed, n=8, h=24, w=32, quantum=None):
    """Blurred-noise maps with blob and rectangle defects; the last two maps are defect-free."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 2):
        blobs = ndimage.gaussian_filter(rng.standard_normal((h, w)), 2.0)
        masks[i] = blobs > np.quantile(blobs, 0.93)
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 6)
        masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 6)] = True
    masks[0, 0, 0] = masks[0, 1, 1] = True  # a diagonal pair
    noise = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 1.0, 1.0))
    maps = noise + 0.25 * ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5))
    maps += 0.05 * rng.random((n, h, w))
    if quantum is not None:
        maps = np.round(maps / quantum) * quantum
    return maps, masks


# ---------------------------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------------------------


def test_image_auroc_perfect_and_inverted():
    labels = [0, 0, 0, 1, 1]
    assert M.image_auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert M.image_auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0


def test_image_auroc_ties_count_half():
    assert M.image_auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    # positives {0.5, 0.5} vs negatives {0.5, 0.1}: pairs 1/2, 1, 1/2, 1 -> 3/4
    assert M.image_auroc([0.5, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75, abs=1e-15)
    # positives {0.5, 0.9} vs negatives {0.1, 0.5}: 1 + 1/2 + 1 + 1 -> 7/8
    assert M.image_auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875, abs=1e-15)
    # the textbook example: 3 of 4 pairs ordered correctly
    assert M.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75, abs=1e-15)


def test_image_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < 0.35
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), 1e-12)
    assert M.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), 1e-12
    )


def test_average_precision_by_hand():
    # descending: 0.8 pos (P=1, R=1/2), 0.4 neg, 0.35 pos (P=2/3, R=1) -> 1/2 + 1/3
    ap = M.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-15)
    # a tie: the positive at 0.5 shares its operating point with a negative -> P = 1/3
    assert M.average_precision([0.5, 0.5, 0.9], [1, 0, 0]) == pytest.approx(1 / 3, abs=1e-15)
    assert M.average_precision([0.2, 0.9], [0, 1]) == 1.0


def test_f1_max_and_threshold_by_hand():
    # t=0.8: 2/3, t=0.4: 1/2, t=0.35: tp 2 fp 1 -> 4/5, t=0.1: 2/3
    f1, t = M.f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert f1 == pytest.approx(0.8, abs=1e-15)
    assert t == 0.35


def test_f1_max_ties_share_one_decision():
    # Splitting the tie at 0.6 (positive above the negative) would give F1 = 1.0. The tied
    # samples must be decided together: t=0.6 -> tp 2, fp 1 -> F1 = 4/5.
    f1, t = M.f1_max([0.2, 0.6, 0.6, 0.9], [0, 1, 0, 1])
    assert f1 == pytest.approx(0.8, abs=1e-15)
    assert t == 0.6


def test_f1_max_equal_best_returns_highest_threshold():
    # t=0.9: 2/3, t=0.8: 1/2, t=0.7: 2/5, t=0.6: 2/3 -> the highest of the two bests
    f1, t = M.f1_max([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 1])
    assert f1 == pytest.approx(2 / 3, abs=1e-15)
    assert t == 0.9


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(5)
    scores, labels = np.round(rng.random(200), 2), rng.random(200) < 0.3
    f1, t = M.f1_max(scores, labels)
    ref_f1, ref_t = ref_f1_max(scores, labels)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == ref_t
    # the threshold reproduces the F1 with the "score >= t" rule
    pred = scores >= t
    assert 2 * np.sum(pred & labels) / (pred.sum() + labels.sum()) == pytest.approx(f1, 1e-12)


def test_single_label_is_nan_with_warning():
    scores, normal = [0.1, 0.5, 0.3], [0, 0, 0]
    with pytest.warns(UndefinedMetricWarning, match="image_auroc.*3 normal, 0 anomalous"):
        assert math.isnan(M.image_auroc(scores, normal))
    with pytest.warns(UndefinedMetricWarning, match="image_auroc"):
        assert math.isnan(M.image_auroc(scores, [1, 1, 1]))
    with pytest.warns(UndefinedMetricWarning, match="average_precision"):
        assert math.isnan(M.average_precision(scores, normal))
    with pytest.warns(UndefinedMetricWarning, match="f1_max"):
        f1, t = M.f1_max(scores, normal)
    assert math.isnan(f1) and math.isnan(t)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(M.image_auroc([], []))


def test_invalid_image_inputs_raise():
    with pytest.raises(ValueError, match="binary"):
        M.image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="differ in size"):
        M.image_auroc([0.1, 0.2, 0.3], [0, 1])


# ---------------------------------------------------------------------------------------------
# AUPRO, hand-computed
# ---------------------------------------------------------------------------------------------


def two_region_case():
    """3x5 image: region A (2x2, 4 px) and region B (1 px); 10 normal pixels."""
    mask = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    amap = np.array(
        [
            [0.9, 0.9, 0.1, 0.1, 0.6],
            [0.3, 0.3, 0.1, 0.1, 0.6],
            [0.1, 0.1, 0.1, 0.1, 0.5],
        ]
    )
    return amap[None], mask[None]


def test_aupro_two_regions_of_different_sizes():
    maps, masks = two_region_case()
    # t=0.9: FPR 0, PRO (2/4 + 0)/2 = 0.25;  t=0.6: FPR 2/10, PRO 0.25
    # t=0.5: FPR 0.2, PRO (2/4 + 1)/2 = 0.75;  t=0.3: FPR 0.2, PRO 1;  t=0.1: (1, 1)
    # to FPR 1: 0.2 * 0.25 + 0.8 * 1 = 0.85 (pixel-weighted "PRO" would give 0.88)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.85, abs=1e-12)
    # to FPR 0.3: (0.05 + 0.1 * 1) / 0.3 = 0.5
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    fpr, pro = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.2, 0.2, 1.0], atol=1e-15)
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1.0, 1.0], atol=1e-15)


def test_aupro_diagonal_pixels_are_one_region():
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])  # (0,1) and (1,2) touch diagonally
    amap = np.array([[0.9, 0.9, 0.5], [0.5, 0.5, 0.2], [0.5, 0.5, 0.5]])
    # one region of 3 px: PRO 2/3 from FPR 0 -> AUPRO 2/3 (4-connectivity: 2 regions -> 0.5)
    acc = M.MapAccumulator(fpr_limit=1.0)
    acc.update(amap, mask)
    assert acc.compute()["aupro"] == pytest.approx(2 / 3, abs=1e-12)
    assert acc.diagnostics()["n_regions"] == 1
    assert M.aupro(amap[None], mask[None]) == pytest.approx(2 / 3, abs=1e-12)


def test_aupro_adjacent_defects_form_one_region():
    # a 2x2 defect and a 1x2 defect sharing an edge: one region of 6 px
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    amap = np.array([[0.9, 0.9, 0.5, 0.5], [0.9, 0.9, 0.2, 0.2]])
    # t=0.9: PRO 4/6 at FPR 0 -> AUPRO 2/3 (as two regions it would be (1 + 0)/2)
    assert M.aupro(amap[None], mask[None], fpr_limit=1.0) == pytest.approx(2 / 3, abs=1e-12)
    assert M.aupro(amap[None], mask[None]) == pytest.approx(2 / 3, abs=1e-12)


def test_aupro_regions_are_pooled_over_images():
    maps = np.full((2, 3, 3), 0.5)
    masks = np.zeros((2, 3, 3), dtype=int)
    masks[0, 0, 0] = 1  # one region, found at t=0.9
    maps[0, 0, 0] = 0.9
    for y, x in [(0, 0), (0, 2), (2, 0)]:  # three separate regions, missed until t=0.2
        masks[1, y, x] = 1
        maps[1, y, x] = 0.2
    # mean over the 4 regions: PRO 1/4 until FPR 1 -> 0.25 (a mean of per-image means: 0.5)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.25, abs=1e-12)
    assert M.aupro(maps, masks) == pytest.approx(0.25, abs=1e-12)


def test_aupro_defect_free_images_count_in_fpr():
    maps, masks = two_region_case()
    free_map = np.zeros((1, 3, 5))
    free_map[0, 0, :] = 0.95  # 5 normal pixels above every defect score
    maps = np.concatenate([maps, free_map])
    masks = np.concatenate([masks, np.zeros((1, 3, 5), dtype=int)])
    # N = 25. t=0.95: (0.2, 0); 0.9: (0.2, 0.25); 0.6: (0.28, 0.25); 0.5: (0.28, 0.75);
    # 0.3: (0.28, 1); 0.1: (0.6, 1); 0: (1, 1).
    # area to 0.3: 0.08 * 0.25 + 0.02 * 1 = 0.04 -> 0.04 / 0.3
    assert M.aupro(maps, masks) == pytest.approx(0.04 / 0.3, abs=1e-12)
    fpr, _ = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0.2, 0.2, 0.28, 0.28, 0.28, 0.6, 1.0], atol=1e-15)


def interpolation_case():
    """2x7 image, one 2x2 region; 10 normal pixels. A tie level makes a sloped segment."""
    mask = np.zeros((2, 7), dtype=int)
    mask[:, :2] = 1
    amap = np.array(
        [
            [0.7, 0.7, 0.9, 0.7, 0.7, 0.2, 0.2],
            [0.2, 0.2, 0.7, 0.7, 0.2, 0.2, 0.2],
        ]
    )
    return amap[None], mask[None]


def test_aupro_interpolates_at_the_limit():
    maps, masks = interpolation_case()
    # t=0.9: 1 normal -> (0.1, 0); t=0.7: 4 normal + 2 of 4 region px -> (0.5, 0.5);
    # t=0.2: (1, 1). The limit 0.3 falls inside (0.1, 0) -> (0.5, 0.5): PRO(0.3) = 0.25,
    # area 0.2 * (0 + 0.25) / 2 = 0.025 -> 0.025 / 0.3. (No interpolation would give 0.)
    assert M.aupro(maps, masks) == pytest.approx(0.025 / 0.3, abs=1e-12)
    # to FPR 1: 0 + 0.4 * 0.25 + 0.5 * 0.75 = 0.475
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.475, abs=1e-12)
    # a limit exactly on a point: 0.1 -> area 0
    assert M.aupro(maps, masks, fpr_limit=0.1) == 0.0
    # a limit inside the second segment: 0.7 -> 0.1 + (0.5 + 0.7) / 2 * 0.2 = 0.22 -> / 0.7
    assert M.aupro(maps, masks, fpr_limit=0.7) == pytest.approx(0.22 / 0.7, abs=1e-12)


def test_pixel_auroc_and_f1_hand_cases():
    maps, masks = interpolation_case()
    # 4 region px (0.7, 0.7, 0.2, 0.2) vs 10 normal (one 0.9, four 0.7, five 0.2):
    # a 0.7 beats 5, ties 4 -> 7 each; a 0.2 ties 5 -> 2.5 each; (14 + 5) / 40
    assert M.pixel_auroc(maps, masks) == pytest.approx(19 / 40, abs=1e-15)
    # t=0.9: 0; t=0.7: tp 2 of 7 predicted -> 4/11; t=0.2: 8/18
    f1, t = M.pixel_f1_max(maps, masks)
    assert f1 == pytest.approx(8 / 18, abs=1e-15)
    assert t == 0.2
    perfect = np.where(masks == 1, 0.8, 0.1).astype(np.float32)
    assert M.pixel_auroc(perfect, masks) == 1.0
    assert M.aupro(perfect, masks) == 1.0
    assert M.pixel_auroc(1 - perfect, masks) == 0.0
    assert M.aupro(1 - perfect, masks) == 0.0


def test_pixel_metrics_undefined_are_nan_with_warning():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.warns(UndefinedMetricWarning) as rec:
        out = M.pixel_metrics(maps, np.zeros((2, 4, 4), dtype=bool))
    assert all(math.isnan(out[k]) for k in ("pixel_auroc", "aupro", "pixel_f1_max"))
    assert any("aupro" in str(w.message) and "0 regions" in str(w.message) for w in rec)
    with pytest.warns(UndefinedMetricWarning) as rec:  # all anomalous: no normal pixels
        assert math.isnan(M.aupro(maps, np.ones((2, 4, 4))))
    assert any("aupro" in str(w.message) and "0 normal pixels" in str(w.message) for w in rec)


def test_invalid_map_inputs_raise():
    maps = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="binary"):
        M.aupro(maps, np.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match="shape"):
        M.pixel_auroc(maps, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_auroc(np.full((1, 2, 2), np.inf), np.eye(2)[None])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(maps, np.zeros((2, 4, 4)), fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------
# Streaming / histogram against the reference
# ---------------------------------------------------------------------------------------------


def stream(maps, masks, batch=3, **kwargs):
    acc = M.MapAccumulator(**kwargs)
    for i in range(0, len(maps), batch):
        acc.update(maps[i : i + batch], masks[i : i + batch])
    return acc


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_exact_streaming_matches_reference(limit):
    maps, masks = random_maps(0, quantum=1 / 64)  # many ties
    acc = stream(maps, masks, fpr_limit=limit)
    out = acc.compute()
    assert acc.diagnostics()["mode"] == "exact"
    assert out["aupro"] == pytest.approx(ref_aupro(maps, masks, limit), abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), 1e-12)
    f1, t = ref_f1_max(maps, masks)
    assert out["pixel_f1_max"] == pytest.approx(f1, abs=1e-12)
    assert out["pixel_f1_threshold"] == t


def test_histogram_is_exact_for_dyadic_scores():
    # k/64 scores with negative and > 1 values: one score per bin, so binning changes nothing
    maps, masks = random_maps(1, quantum=1 / 64)
    maps = 3.0 * maps - 1.0
    acc = stream(maps, masks, exact_limit=0)
    out, diag = acc.compute(), acc.diagnostics()
    assert diag["mode"] == "histogram"
    assert out["aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), 1e-12)
    f1, t = ref_f1_max(maps, masks)
    assert out["pixel_f1_max"] == pytest.approx(f1, abs=1e-12)
    assert out["pixel_f1_threshold"] == t


def test_histogram_continuous_scores_within_stated_tolerance():
    maps, masks = random_maps(2, n=6, h=16, w=20)
    ref = ref_aupro(maps, masks)
    ref_auc = roc_auc_score(masks.ravel(), maps.ravel())
    acc = stream(maps, masks, exact_limit=0)  # default 2**20 bins
    out, diag = acc.compute(), acc.diagnostics()
    assert abs(out["aupro"] - ref) <= diag["aupro_error_bound"] + 1e-12
    assert abs(out["pixel_auroc"] - ref_auc) <= diag["pixel_auroc_error_bound"] + 1e-12
    assert diag["aupro_error_bound"] < 1e-3 and diag["pixel_auroc_error_bound"] < 1e-4
    assert abs(out["aupro"] - ref) < 1e-6


def test_histogram_error_bounds_hold_with_coarse_bins():
    maps, masks = random_maps(3, n=6, h=16, w=20)
    ref = ref_aupro(maps, masks)
    ref_auc = roc_auc_score(masks.ravel(), maps.ravel())
    ref_f1, _ = ref_f1_max(maps, masks)
    for bins in (16, 64, 256):
        acc = stream(maps, masks, exact_limit=0, bins=bins)
        out, diag = acc.compute(), acc.diagnostics()
        assert diag["aupro_error_bound"] > 0 and diag["pixel_auroc_error_bound"] > 0
        assert abs(out["aupro"] - ref) <= diag["aupro_error_bound"] + 1e-12
        assert abs(out["pixel_auroc"] - ref_auc) <= diag["pixel_auroc_error_bound"] + 1e-12
        assert 0 <= ref_f1 - out["pixel_f1_max"] <= diag["pixel_f1_max_error_bound"] + 1e-12
        # the reported threshold reproduces the reported F1 with "score >= t"
        pred = maps >= out["pixel_f1_threshold"]
        f1 = 2 * np.sum(pred & masks) / (pred.sum() + masks.sum())
        assert f1 == pytest.approx(out["pixel_f1_max"], abs=1e-12)
    # coarse bins give visibly different values: the comparison above is not vacuous
    assert abs(stream(maps, masks, exact_limit=0, bins=16).compute()["aupro"] - ref) > 1e-4


def test_histogram_grid_grows_exactly():
    # ranges widen batch after batch (up and down); dyadic scores stay one per bin
    maps, masks = random_maps(4, n=8, quantum=1 / 32)
    maps = maps * np.array([1, 1, 2, 4, -3, 8, 0.5, 16])[:, None, None]
    acc = stream(maps, masks, batch=1, exact_limit=0, bins=2**14)
    assert acc.diagnostics()["bin_width"] <= 1 / 32
    out = acc.compute()
    assert out["aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), 1e-12)
    # a constant first batch, then wider data
    acc = M.MapAccumulator(exact_limit=0, bins=2**14)
    acc.update(np.full((1, 24, 32), 0.5), np.zeros((1, 24, 32)))
    acc.update(maps, masks)
    both_maps = np.concatenate([np.full((1, 24, 32), 0.5), maps])
    both_masks = np.concatenate([np.zeros((1, 24, 32), dtype=bool), masks])
    assert acc.compute()["aupro"] == pytest.approx(ref_aupro(both_maps, both_masks), abs=1e-12)


def test_switch_from_exact_to_histogram_and_score_range():
    maps, masks = random_maps(5, quantum=1 / 128)
    per_map = maps[0].size
    acc = stream(maps, masks, batch=2, exact_limit=3 * per_map, score_range=(0.0, 1.0))
    assert acc.diagnostics()["mode"] == "histogram"
    ref = stream(maps, masks, exact_limit=None).compute()
    for key, value in acc.compute().items():
        assert value == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("exact_limit", [None, 0])
def test_merge_equals_single_pass(exact_limit):
    maps, masks = random_maps(6, quantum=1 / 64)
    whole = stream(maps, masks, exact_limit=exact_limit)
    a = stream(maps[:3], masks[:3], exact_limit=exact_limit)
    b = stream(maps[3:5], masks[3:5], exact_limit=exact_limit)
    c = stream(maps[5:], masks[5:], exact_limit=None)  # an exact part merged into either mode
    merged = a.merge(b).merge(c)
    assert merged.n_regions == whole.n_regions and merged.n_pixels == whole.n_pixels
    expected = whole.compute()
    for key, value in merged.compute().items():
        assert value == pytest.approx(expected[key], abs=1e-12), key


def test_merge_coarsens_to_the_coarser_grid():
    maps, masks = random_maps(7, quantum=1 / 16)
    a = stream(maps[:4], masks[:4], exact_limit=0, bins=2**12)
    b = stream(100 * maps[4:], masks[4:], exact_limit=0, bins=2**12)  # much coarser grid
    merged = a.merge(b)
    full_maps = np.concatenate([maps[:4], 100 * maps[4:]])
    ref = ref_aupro(full_maps, masks)
    diag = merged.diagnostics()
    assert diag["bin_width"] >= b.diagnostics()["bin_width"]
    assert abs(merged.compute()["aupro"] - ref) <= diag["aupro_error_bound"] + 1e-12


def test_accepts_2d_4d_float_masks_and_float32():
    maps, masks = two_region_case()
    expected = M.aupro(maps, masks)
    acc = M.MapAccumulator()
    acc.update(maps[0].astype(np.float32), masks[0].astype(np.float32))
    assert acc.compute()["aupro"] == pytest.approx(expected, abs=1e-6)
    assert M.aupro(maps[:, None], masks[:, None].astype(bool)) == pytest.approx(expected)
    assert acc.shapes == {(3, 5)}


def test_buffer_does_not_alias_caller_arrays():
    maps, masks = two_region_case()
    maps, masks = maps.astype(np.float64), masks.astype(bool)
    acc = M.MapAccumulator()
    acc.update(maps, masks)
    expected = acc.compute()
    maps[:] = 0.0
    masks[:] = False
    acc._cache = None
    assert acc.compute() == expected


# ---------------------------------------------------------------------------------------------
# Per class, mean, tables
# ---------------------------------------------------------------------------------------------


def test_class_metrics_per_class_and_nan_ignoring_mean():
    maps, masks = random_maps(8, n=8, quantum=1 / 64)
    masks[4:] = False  # bottle: 4 defective + 1 good; cable: 3 good only
    labels = masks.reshape(8, -1).any(axis=1)
    scores = maps.reshape(8, -1).mean(axis=1)
    classes = ["bottle"] * 5 + ["cable"] * 3
    cm = M.ClassMetrics()
    cm.update(classes[:4], scores[:4], labels[:4], maps[:4], masks[:4])
    cm.update(classes[4:], scores[4:], labels[4:], maps[4:], masks[4:])
    with pytest.warns(UndefinedMetricWarning, match=r"\[cable\]") as rec:
        rows = cm.compute()
    assert not any("bottle" in str(w.message) for w in rec)
    assert list(rows) == ["bottle", "cable", "mean"]
    b = rows["bottle"]
    assert b["image_auroc"] == M.image_auroc(scores[:5], labels[:5])
    assert b["image_ap"] == M.average_precision(scores[:5], labels[:5])
    assert (b["image_f1_max"], b["f1_threshold"]) == M.f1_max(scores[:5], labels[:5])
    assert b["pixel_auroc"] == pytest.approx(roc_auc_score(masks[:5].ravel(), maps[:5].ravel()))
    assert b["aupro"] == pytest.approx(ref_aupro(maps[:5], masks[:5]), abs=1e-12)
    assert b["n_images"] == 5 and b["n_anomalous"] == 4
    cable = rows["cable"]
    assert math.isnan(cable["image_auroc"]) and math.isnan(cable["aupro"])
    assert not math.isnan(b["image_auroc"]) and not math.isnan(b["aupro"])
    mean = rows["mean"]
    assert mean["image_auroc"] == b["image_auroc"]  # the NaN class is ignored
    assert mean["aupro"] == b["aupro"]
    assert mean["image_ap"] == pytest.approx(b["image_ap"])  # cable's AP is NaN too
    assert math.isnan(mean["f1_threshold"])
    assert mean["n_images"] == 8 and mean["n_anomalous"] == 4
    assert cm.resolutions == [(24, 32)]


def test_class_mean_is_mean_over_classes_not_pooled():
    scores = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4]
    labels = [1, 0, 0, 1, 0, 1]
    rows = M.compute_metrics(["a", "a", "b", "b", "c", "c"], scores, labels)
    assert rows["a"]["image_auroc"] == 1.0 and rows["c"]["image_auroc"] == 0.0
    assert rows["mean"]["image_auroc"] == pytest.approx(2 / 3)
    assert math.isnan(rows["mean"]["pixel_auroc"])  # no maps given: NaN, no warning


def test_class_metrics_without_maps_and_mixing_errors():
    cm = M.ClassMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # image-only classes must not warn about pixels
        cm.update("headct", [0.2, 0.7, 0.4], [0, 1, 1])
        rows = cm.compute()
    assert rows["headct"]["image_auroc"] == 1.0 and math.isnan(rows["headct"]["aupro"])
    with pytest.raises(ValueError, match="maps in some batches"):
        cm.update("headct", [0.5], [1], np.zeros((1, 4, 4)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="both maps and masks"):
        cm.update("x", [0.5], [1], np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="class names"):
        cm.update(["a", "b"], [0.5], [1])


def test_class_metrics_merge_and_overall_threshold():
    maps, masks = random_maps(9, quantum=1 / 64)
    labels = masks.reshape(8, -1).any(axis=1)
    scores = maps.reshape(8, -1).max(axis=1)
    names = ["a", "b"] * 4
    whole = M.compute_metrics(names, scores, labels, maps, masks)
    left, right = M.ClassMetrics(), M.ClassMetrics()
    left.update(names[:3], scores[:3], labels[:3], maps[:3], masks[:3])
    right.update(names[3:], scores[3:], labels[3:], maps[3:], masks[3:])
    merged = left.merge(right).compute()
    for cls in whole:
        for key, value in whole[cls].items():
            assert merged[cls][key] == pytest.approx(value, nan_ok=True), (cls, key)
    assert left.overall_f1_max() == M.f1_max(scores, labels)


def test_format_table_markdown_and_csv_round_trip(tmp_path):
    rows = {
        "bottle": {
            "image_auroc": 0.9234,
            "image_ap": 1.0,
            "pixel_auroc": 0.91,
            "aupro": 0.8,
            "n_images": 10,
            "n_anomalous": 6,
        },
        "cable": {
            "image_auroc": float("nan"),
            "image_ap": 0.5,
            "pixel_auroc": 0.7,
            "aupro": 0.6,
            "n_images": 4,
            "n_anomalous": 0,
        },
    }
    rows["mean"] = M._mean_row(list(rows.values()))
    text = M.format_table_markdown(rows, resolution=(518, 518))
    lines = text.splitlines()
    assert lines[0] == (
        "| Class | Images | Anomalous | Image AUROC | Image AP | Pixel AUROC | AUPRO@0.3 |"
    )
    assert lines[2] == "| bottle | 10 | 6 | 92.3 | 100.0 | 91.0 | 80.0 |"
    assert lines[3] == "| cable | 4 | 0 | - | 50.0 | 70.0 | 60.0 |"
    assert lines[4] == "| **mean** | 14 | 6 | 92.3 | 75.0 | 80.5 | 70.0 |"
    assert "Evaluation resolution: 518x518" in text
    assert "Evaluation resolution: 336x336" in M.format_table_markdown(rows, resolution=336)
    raw = M.format_table_markdown(rows, metrics=["image_ap"], percent=False, digits=2)
    assert "| bottle | 1.0000 |" in raw
    path = tmp_path / "table.csv"
    M.write_csv(rows, path)
    back = M.read_csv(path)
    assert list(back) == list(rows)
    for cls, row in rows.items():
        for key, value in row.items():
            assert back[cls][key] == pytest.approx(value, nan_ok=True)
    assert isinstance(back["mean"]["n_images"], int)


METRICS_FILE = ROOT / "larp" / "metrics.py"


def test_module_imports_no_heavy_modules():
    # Load larp/metrics.py by path, so what larp/__init__.py imports does not count here.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(METRICS_FILE)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = [m for m in ('torch', 'ray', 'sklearn', 'open_clip', 'mlflow', 'larp') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
