"""Evaluation metrics for zero-shot anomaly detection (numpy in, floats out).

Image level (one score and one 0/1 label per image):

* :func:`image_auroc` -- area under the ROC curve. Ties count one half (Mann-Whitney), which
  is the trapezoid area of the ROC curve through one point per distinct score.
* :func:`average_precision` -- ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores in
  decreasing order (scikit-learn's definition, no interpolation).
* :func:`f1_max` -- the best F1 over all thresholds and the threshold reaching it.

Pixel level (maps ``[N, H, W]`` float, masks ``[N, H, W]`` in {0, 1}):

* :func:`pixel_auroc`, :func:`pixel_f1_max`, and :func:`aupro`, the area under the
  per-region-overlap curve as the MVTec AD evaluation defines it (see :func:`aupro`).

Every metric thresholds as "anomalous when ``score >= threshold``", one threshold per distinct
score, so samples with equal scores always share one decision.

Memory. MVTec AD at 518x518 is ~460 M pixels; holding and sorting them all needs many GB.
:class:`MapAccumulator` streams batch by batch. Small evaluations (up to ``exact_limit``
pixels, default 2**20, ~60 MB to compute) are buffered and computed exactly. Beyond that the
accumulator keeps three histograms over a fixed grid of ``bins`` (default 2**20) equal bins:
normal pixels per bin, anomalous pixels per bin, and the PRO weight per bin (each anomalous
pixel of ground-truth region ``r`` adds ``1 / |r|``; the total is divided by the number of
regions at the end). All curves are then reverse cumulative sums over the bins. The grid is
dyadic: bin ``g`` is ``[g * 2**q, (g + 1) * 2**q)`` and ``g = floor(score * 2**-q)`` is
computed exactly in float64, so the binning is an exact monotone quantisation; when data falls
outside the grid it is widened by whole powers of two and old bins merge exactly. The results
are therefore *exact for the quantised scores*, and because the quantised curve's points are a
subset of the exact curve's points, the distance to the exact value is bounded by quantities
computed from the same histograms (:meth:`MapAccumulator.diagnostics`):

* pixel AUROC: ``0.5 * sum_b pos_b * neg_b / (P * N)`` (only pairs sharing a bin can differ);
* AUPRO: ``sum_b dFPR_b * dPRO_b / fpr_limit`` over bins below the limit (between two grid
  points the exact curve is monotone, so it stays inside their rectangle);
* pixel F1-max: the best F1 any threshold inside a bin could reach, minus the reported value.

On realistic MVTec-sized maps these bounds are ~1e-6 (see ``bench/bench_metrics.py``).
Scores that are dyadic with at least the grid's resolution (e.g. ``k / 256``) are binned
one value per bin, so the histogram results are then identical to the exact ones.

Per class and mean over classes (the paper's tables): :class:`ClassMetrics`,
:func:`compute_metrics`, :func:`format_table_markdown`, :func:`write_csv`, :func:`read_csv`.

Undefined metrics (a single label present, no normal pixels, no regions) return NaN with an
:class:`UndefinedMetricWarning`; the class mean ignores NaN.

This module imports only numpy and scipy.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_EXACT_LIMIT",
    "DEFAULT_FPR_LIMIT",
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "TABLE_METRICS",
    "ClassMetrics",
    "MapAccumulator",
    "UndefinedMetricWarning",
    "aupro",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "format_table_markdown",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_metrics",
    "pro_curve",
    "read_csv",
    "table_to_csv",
    "write_csv",
]

DEFAULT_FPR_LIMIT = 0.3
DEFAULT_BINS = 2**20
DEFAULT_EXACT_LIMIT = 2**20
# Pixels per chunk when the functional API streams a full array through a MapAccumulator.
_CHUNK_PIXELS = 2**22

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max", "f1_threshold")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max")
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro")
_COUNT_KEYS = ("n_images", "n_anomalous")
# 8-connectivity in the image plane, none across the batch axis.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. one label only); NaN is returned."""


def _warn_undefined(metric: str, reason: str, context: str = "") -> None:
    where = f" [{context}]" if context else ""
    warnings.warn(
        f"{metric} is undefined{where}: {reason}; returning NaN",
        UndefinedMetricWarning,
        stacklevel=4,
    )


# --------------------------------------------------------------------------------------------
# Curves from per-level counts. A "level" is one distinct score (or one histogram bin), levels
# are in increasing score order, and thresholding at level k keeps levels k, k+1, ...
# --------------------------------------------------------------------------------------------


def _auroc_levels(neg: np.ndarray, pos: np.ndarray, metric: str, context: str = "") -> float:
    n_pos = float(pos.sum())
    n_neg = float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        _warn_undefined(
            metric, f"needs both classes ({int(n_neg)} normal, {int(n_pos)} anomalous)", context
        )
        return math.nan
    pos_f = pos.astype(np.float64)
    above = n_pos - np.cumsum(pos_f)  # positives strictly above each level
    return float(np.sum(neg.astype(np.float64) * (above + 0.5 * pos_f)) / (n_pos * n_neg))


def _ap_levels(neg: np.ndarray, pos: np.ndarray, metric: str, context: str = "") -> float:
    n_pos = float(pos.sum())
    if n_pos == 0:
        _warn_undefined(metric, "no anomalous samples", context)
        return math.nan
    pos_d = pos[::-1].astype(np.float64)
    tp = np.cumsum(pos_d)
    fp = np.cumsum(neg[::-1].astype(np.float64))
    keep = pos_d > 0
    return float(np.sum(pos_d[keep] / n_pos * (tp[keep] / (tp[keep] + fp[keep]))))


def _f1_levels(
    neg: np.ndarray, pos: np.ndarray, thresholds: np.ndarray, metric: str, context: str = ""
) -> tuple[float, float]:
    n_pos = float(pos.sum())
    if n_pos == 0:
        _warn_undefined(metric, "no anomalous samples", context)
        return math.nan, math.nan
    tp = np.cumsum(pos[::-1].astype(np.float64))
    fp = np.cumsum(neg[::-1].astype(np.float64))
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))  # first from the top: the highest threshold among ties
    return float(f1[best]), float(thresholds[::-1][best])


def _f1_upper_bound(neg: np.ndarray, pos: np.ndarray) -> float:
    """Best F1 any threshold inside a level could reach (for histogram levels)."""
    n_pos = float(pos.sum())
    if n_pos == 0:
        return math.nan
    pos_d = pos[::-1].astype(np.float64)
    tp = np.cumsum(pos_d)
    fp_above = np.cumsum(neg[::-1].astype(np.float64)) - neg[::-1]
    return float(np.max(2.0 * tp / (tp + fp_above + n_pos)))


def _pro_points(
    neg: np.ndarray, pro_w: np.ndarray, n_normal: float, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    fpr = np.concatenate(([0.0], np.cumsum(neg[::-1].astype(np.float64)) / n_normal))
    pro = np.concatenate(([0.0], np.cumsum(pro_w[::-1]) / n_regions))
    np.clip(fpr, 0.0, 1.0, out=fpr)
    np.clip(pro, 0.0, 1.0, out=pro)
    return fpr, pro


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [0, limit], interpolating y at ``limit``.

    ``x`` must be non-decreasing and start at 0. Points with ``x <= limit`` are kept; when
    ``limit`` falls strictly between two points, ``y(limit)`` is linearly interpolated between
    them and the partial trapezoid is added (as the MVTec AD reference ``trapezoid``).
    """
    k = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:k], y[:k]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs))) if k > 1 else 0.0
    if k < len(x) and x[k - 1] < limit:
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_lim) * (limit - x[k - 1])
    return float(area)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


# --------------------------------------------------------------------------------------------
# Image-level metrics (exact: one level per distinct score)
# --------------------------------------------------------------------------------------------


def _as_binary(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool); found values {bad.tolist()}")
    return arr != 0


def _image_levels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _as_binary(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    values, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1)
    pos = np.bincount(inverse[y], minlength=len(values))
    neg = np.bincount(inverse, minlength=len(values)) - pos
    return values, neg, pos


def image_auroc(scores: Any, labels: Any) -> float:
    """Image AUROC (ties count 1/2). NaN with a warning when only one label is present."""
    _, neg, pos = _image_levels(scores, labels)
    return _auroc_levels(neg, pos, "image_auroc")


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct scores, high to low.

    Equal scores form one operating point (as scikit-learn). NaN with a warning when there
    is no anomalous sample.
    """
    _, neg, pos = _image_levels(scores, labels)
    return _ap_levels(neg, pos, "average_precision")


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it.

    Predictions are "anomalous when ``score >= threshold``" with one candidate threshold per
    distinct score, so equal scores always share a decision. The returned threshold is a score
    value; among thresholds with the same best F1 the highest is returned. ``(nan, nan)`` with
    a warning when there is no anomalous sample.
    """
    values, neg, pos = _image_levels(scores, labels)
    return _f1_levels(neg, pos, values, "f1_max")


# --------------------------------------------------------------------------------------------
# Pixel-level metrics: streaming accumulator
# --------------------------------------------------------------------------------------------


def _as_maps(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(maps, dtype=np.float64)
    g = np.asarray(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim == 2:
        m = m[None]
    if g.ndim == 2:
        g = g[None]
    if m.ndim != 3:
        raise ValueError(f"maps must be [N, H, W] (or [H, W], [N, 1, H, W]); got {m.shape}")
    if m.shape != g.shape:
        raise ValueError(f"maps {m.shape} and masks {g.shape} differ in shape")
    if not np.all(np.isfinite(m)):
        raise ValueError("anomaly maps contain NaN or infinity")
    return m, _as_binary(g, "masks")


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """PRO weight ``1/|region|`` of every anomalous pixel (C order) and the region count.

    Regions are the connected components of each image's ground truth, 8-connectivity.
    """
    if not masks.any():
        return np.zeros(0, dtype=np.float64), 0
    labeled, n_regions = ndimage.label(masks, structure=_STRUCTURE_3D)
    region_of_pixel = labeled[masks]
    sizes = np.bincount(region_of_pixel)
    return 1.0 / sizes[region_of_pixel].astype(np.float64), int(n_regions)


class MapAccumulator:
    """Streaming pixel AUROC, AUPRO and pixel F1-max over batches of maps and masks.

    ``update(maps, masks)`` takes one batch (``[N, H, W]``; ``[H, W]`` and ``[N, 1, H, W]``
    are accepted; masks bool or 0/1); ``compute()`` returns ``{"pixel_auroc", "aupro",
    "pixel_f1_max", "pixel_f1_threshold"}``. Ground-truth regions are labelled image by image
    as each batch arrives, so nothing but the accumulated state is kept.

    Up to ``exact_limit`` pixels the batches are buffered and every metric is exact (one level
    per distinct score). Past it the buffer is folded into ``bins`` histogram bins (~24 bytes
    a bin, 25 MB at the default 2**20) and later batches are binned directly; see the module
    docstring for the grid and :meth:`diagnostics` for the error bounds. ``exact_limit=0``
    always bins, ``exact_limit=None`` never does. ``score_range=(lo, hi)`` may be given when
    the score range is known (e.g. ``(0, 1)``) so the grid is sized once; scores outside it
    are still handled. Accumulators with the same ``bins`` can be combined with
    :meth:`merge` (e.g. results from parallel workers); they pickle.
    """

    def __init__(
        self,
        fpr_limit: float = DEFAULT_FPR_LIMIT,
        bins: int = DEFAULT_BINS,
        exact_limit: int | None = DEFAULT_EXACT_LIMIT,
        score_range: tuple[float, float] | None = None,
    ) -> None:
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        if int(bins) < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = int(bins)
        self.exact_limit = exact_limit
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(
                    f"score_range must be finite (lo, hi) with lo <= hi: {score_range}"
                )
            score_range = (lo, hi)
        self.score_range = score_range
        self.n_maps = 0
        self.n_pixels = 0
        self.n_anomalous = 0
        self.n_regions = 0
        self.shapes: set[tuple[int, int]] = set()
        # exact buffer
        self._buf_scores: list[np.ndarray] = []
        self._buf_pos: list[np.ndarray] = []
        self._buf_w: list[np.ndarray] = []
        # histogram state (None while exact)
        self._q: int | None = None  # bin width is 2**q
        self._base = 0  # global index of slot 0
        self._total: np.ndarray | None = None  # all pixels per slot (int64)
        self._pos: np.ndarray | None = None  # anomalous pixels per slot (int64)
        self._pro: np.ndarray | None = None  # sum of 1/|region| per slot (float64)
        self._lo_seen = math.inf
        self._hi_seen = -math.inf
        self._cache: dict[str, float] | None = None
        self._cache_diag: dict[str, Any] | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """True while all pixels are buffered and metrics are exact."""
        return self._total is None

    def update(self, maps: Any, masks: Any) -> None:
        """Add a batch of anomaly maps and their ground-truth masks."""
        m, g = _as_maps(maps, masks)
        if m.size == 0:
            return
        w, n_regions = _label_regions(g)
        scores = m.reshape(-1)
        pos = g.reshape(-1)
        self.n_maps += m.shape[0]
        self.n_pixels += scores.size
        self.n_anomalous += int(w.size)
        self.n_regions += n_regions
        self.shapes.add((int(m.shape[1]), int(m.shape[2])))
        self._cache = self._cache_diag = None
        if self.exact:
            buffered = sum(a.size for a in self._buf_scores)
            if self.exact_limit is None or buffered + scores.size <= self.exact_limit:
                # copies: the inputs may alias the caller's (reused) buffers
                self._buf_scores.append(scores.copy())
                self._buf_pos.append(pos.copy())
                self._buf_w.append(w)
                return
            self._fold_buffer(extra=(float(scores.min()), float(scores.max())))
        self._add_pixels(scores, pos, w)

    def merge(self, other: MapAccumulator) -> MapAccumulator:
        """Add another accumulator's data to this one (in place); returns ``self``."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge accumulators with bins {self.bins} and {other.bins}")
        self.n_maps += other.n_maps
        self.n_pixels += other.n_pixels
        self.n_anomalous += other.n_anomalous
        self.n_regions += other.n_regions
        self.shapes |= other.shapes
        self._cache = self._cache_diag = None
        if other.exact:
            scores, pos, w = other._buffer_arrays()
            if self.exact:
                buffered = sum(a.size for a in self._buf_scores)
                if self.exact_limit is None or buffered + scores.size <= self.exact_limit:
                    self._buf_scores.append(scores)
                    self._buf_pos.append(pos)
                    self._buf_w.append(w)
                    return self
                self._fold_buffer(extra=(float(scores.min()), float(scores.max())))
            if scores.size:
                self._add_pixels(scores, pos, w)
            return self
        if self.exact:
            self._fold_buffer(extra=(other._lo_seen, other._hi_seen), min_q=other._q)
        else:
            self._ensure_grid(other._lo_seen, other._hi_seen, min_q=other._q)
        assert other._total is not None and other._pos is not None and other._pro is not None
        nz = np.flatnonzero(other._total)
        values = (other._base + nz).astype(np.float64) * math.ldexp(1.0, other._q)
        idx = self._slot_index(values)
        n = len(self._total)
        self._total += np.rint(np.bincount(idx, other._total[nz], n)).astype(np.int64)
        self._pos += np.rint(np.bincount(idx, other._pos[nz], n)).astype(np.int64)
        self._pro += np.bincount(idx, other._pro[nz], n)
        return self

    def compute(self) -> dict[str, float]:
        """``{"pixel_auroc", "aupro", "pixel_f1_max", "pixel_f1_threshold"}`` (NaN if undefined)."""
        if self._cache is None:
            self._summarise()
        assert self._cache is not None
        return dict(self._cache)

    def diagnostics(self) -> dict[str, Any]:
        """Counts, mode, bin width, state size and error bounds of the last :meth:`compute`.

        ``*_error_bound`` is a proven bound on ``|reported - exact|`` (0 in exact mode).
        """
        if self._cache_diag is None:
            self._summarise()
        assert self._cache_diag is not None
        return dict(self._cache_diag)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The full (FPR, PRO) curve, from (0, 0) at the top threshold to (1, 1)."""
        thresholds, neg, pos, pro_w = self._levels()
        n_normal = float(neg.sum())
        if n_normal == 0 or self.n_regions == 0:
            raise ValueError("PRO curve needs both normal pixels and ground-truth regions")
        return _pro_points(neg, pro_w, n_normal, self.n_regions)

    def state_bytes(self) -> int:
        """Bytes held by the buffer or histograms."""
        if self.exact:
            return sum(a.nbytes for a in (*self._buf_scores, *self._buf_pos, *self._buf_w))
        assert self._total is not None and self._pos is not None and self._pro is not None
        return self._total.nbytes + self._pos.nbytes + self._pro.nbytes

    # -- internals ----------------------------------------------------------------------------

    def _buffer_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._buf_scores:
            empty = np.zeros(0)
            return empty, np.zeros(0, dtype=bool), empty
        return (
            np.concatenate(self._buf_scores),
            np.concatenate(self._buf_pos),
            np.concatenate(self._buf_w),
        )

    def _fold_buffer(self, extra: tuple[float, float], min_q: int | None = None) -> None:
        """Switch from the exact buffer to histograms."""
        scores, pos, w = self._buffer_arrays()
        self._buf_scores, self._buf_pos, self._buf_w = [], [], []
        lo, hi = extra
        if scores.size:
            lo, hi = min(lo, float(scores.min())), max(hi, float(scores.max()))
        self._ensure_grid(lo, hi, min_q=min_q)
        if scores.size:
            self._add_pixels(scores, pos, w)

    def _slot_index(self, scores: np.ndarray) -> np.ndarray:
        assert self._q is not None
        t = scores * math.ldexp(1.0, -self._q)  # exact: a power-of-two scaling
        np.floor(t, out=t)
        t -= self._base  # integers below 2**53: exact
        return t.astype(np.intp)

    def _add_pixels(self, scores: np.ndarray, pos: np.ndarray, w: np.ndarray) -> None:
        self._ensure_grid(float(scores.min()), float(scores.max()))
        assert self._total is not None and self._pos is not None and self._pro is not None
        idx = self._slot_index(scores)
        n = len(self._total)
        self._total += np.bincount(idx, minlength=n)
        if w.size:
            idx_pos = idx[pos]
            self._pos += np.bincount(idx_pos, minlength=n)
            self._pro += np.bincount(idx_pos, weights=w, minlength=n)

    def _required_q(self, lo: float, hi: float) -> int:
        span = hi - lo
        q = -1074
        if span > 0:
            q = math.ceil(math.log2(span / self.bins))
        biggest = max(abs(lo), abs(hi))
        if biggest > 0:  # keep global bin indices below 2**50
            q = max(q, math.ceil(math.log2(biggest)) - 50)
        else:
            q = max(q, -60)
        return max(q, -1000)

    def _ensure_grid(self, lo: float, hi: float, min_q: int | None = None) -> None:
        """Make the grid cover [lo, hi] (and everything seen), re-binning exactly if needed."""
        if self.score_range is not None and self._q is None:
            lo, hi = min(lo, self.score_range[0]), max(hi, self.score_range[1])
        new_lo, new_hi = min(lo, self._lo_seen), max(hi, self._hi_seen)
        n_slots = self.bins + 2
        if self._q is not None and min_q is None:
            g_lo = math.floor(new_lo * math.ldexp(1.0, -self._q))
            g_hi = math.floor(new_hi * math.ldexp(1.0, -self._q))
            if g_lo >= self._base and g_hi < self._base + n_slots:
                self._lo_seen, self._hi_seen = new_lo, new_hi
                return
        q = self._required_q(new_lo, new_hi)
        if self._q is not None:
            q = max(q, self._q)
        if min_q is not None:
            q = max(q, min_q)
        while True:
            g_lo = math.floor(new_lo * math.ldexp(1.0, -q))
            g_hi = math.floor(new_hi * math.ldexp(1.0, -q))
            if g_hi - g_lo + 1 <= n_slots:
                break
            q += 1
        base = g_lo - (n_slots - (g_hi - g_lo + 1)) // 2
        if self._q is None:
            self._total = np.zeros(n_slots, dtype=np.int64)
            self._pos = np.zeros(n_slots, dtype=np.int64)
            self._pro = np.zeros(n_slots, dtype=np.float64)
        else:
            assert self._total is not None and self._pos is not None and self._pro is not None
            shift = q - self._q
            nz = np.flatnonzero(self._total)
            target = ((self._base + nz) >> shift) - base  # floor division by 2**shift: exact
            total = np.zeros(n_slots, dtype=np.int64)
            pos = np.zeros(n_slots, dtype=np.int64)
            pro = np.zeros(n_slots, dtype=np.float64)
            np.add.at(total, target, self._total[nz])
            np.add.at(pos, target, self._pos[nz])
            np.add.at(pro, target, self._pro[nz])
            self._total, self._pos, self._pro = total, pos, pro
        self._q, self._base = q, base
        self._lo_seen, self._hi_seen = new_lo, new_hi

    def _levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, normal count, anomalous count, PRO weight) per non-empty level."""
        if self.exact:
            scores, pos, w = self._buffer_arrays()
            values, inverse = np.unique(scores, return_inverse=True)
            inverse = inverse.reshape(-1)
            n = len(values)
            pos_c = np.bincount(inverse[pos], minlength=n)
            neg_c = np.bincount(inverse, minlength=n) - pos_c
            pro_w = np.bincount(inverse[pos], weights=w, minlength=n)
            return values, neg_c, pos_c, pro_w
        assert self._total is not None and self._pos is not None and self._pro is not None
        assert self._q is not None
        nz = np.flatnonzero(self._total)
        edges = (self._base + nz).astype(np.float64) * math.ldexp(1.0, self._q)
        pos_c = self._pos[nz]
        return edges, self._total[nz] - pos_c, pos_c, self._pro[nz]

    def _summarise(self) -> None:
        thresholds, neg, pos, pro_w = self._levels()
        n_normal = float(neg.sum())
        n_pos = float(pos.sum())
        out: dict[str, float] = {}
        out["pixel_auroc"] = _auroc_levels(neg, pos, "pixel_auroc")
        if n_normal == 0 or self.n_regions == 0:
            _warn_undefined(
                "aupro",
                f"needs normal pixels and ground-truth regions ({int(n_normal)} normal pixels, "
                f"{self.n_regions} regions)",
            )
            out["aupro"] = math.nan
            fpr = pro = None
        else:
            fpr, pro = _pro_points(neg, pro_w, n_normal, self.n_regions)
            out["aupro"] = float(_area_to_limit(fpr, pro, self.fpr_limit) / self.fpr_limit)
        out["pixel_f1_max"], out["pixel_f1_threshold"] = _f1_levels(
            neg, pos, thresholds, "pixel_f1_max"
        )
        diag: dict[str, Any] = {
            "mode": "exact" if self.exact else "histogram",
            "n_maps": self.n_maps,
            "n_pixels": self.n_pixels,
            "n_normal": int(n_normal),
            "n_anomalous": int(n_pos),
            "n_regions": self.n_regions,
            "n_levels": len(thresholds),
            "bin_width": 0.0 if self.exact else math.ldexp(1.0, self._q or 0),
            "state_bytes": self.state_bytes(),
            "fpr_limit": self.fpr_limit,
            "resolutions": sorted(self.shapes),
        }
        if self.exact:
            bounds = dict.fromkeys(("pixel_auroc", "aupro", "pixel_f1_max"), 0.0)
        else:
            bounds = {"pixel_auroc": math.nan, "aupro": math.nan, "pixel_f1_max": math.nan}
            if n_pos and n_normal:
                pairs = np.sum(pos.astype(np.float64) * neg.astype(np.float64))
                bounds["pixel_auroc"] = float(0.5 * pairs / (n_pos * n_normal))
            if fpr is not None and pro is not None:
                below = fpr[:-1] < self.fpr_limit
                area = np.sum(np.diff(fpr)[below] * np.diff(pro)[below])
                bounds["aupro"] = float(area / self.fpr_limit)
            if n_pos:
                bounds["pixel_f1_max"] = max(0.0, _f1_upper_bound(neg, pos) - out["pixel_f1_max"])
        for key, value in bounds.items():
            diag[f"{key}_error_bound"] = value
        self._cache, self._cache_diag = out, diag


# --------------------------------------------------------------------------------------------
# Pixel-level functional API (streams the given arrays through a MapAccumulator)
# --------------------------------------------------------------------------------------------


def _accumulate(maps: Any, masks: Any, **kwargs: Any) -> MapAccumulator:
    acc = MapAccumulator(**kwargs)
    m = maps if hasattr(maps, "shape") else np.asarray(maps)
    g = masks if hasattr(masks, "shape") else np.asarray(masks)
    if len(m.shape) < 3 or m.shape[0] == 0:
        acc.update(m, g)
        return acc
    if len(g.shape) < 1 or g.shape[0] != m.shape[0]:
        raise ValueError(f"maps {tuple(m.shape)} and masks {tuple(g.shape)} differ in shape")
    per_map = max(1, int(np.prod(m.shape[1:])))
    step = max(1, _CHUNK_PIXELS // per_map)
    for start in range(0, m.shape[0], step):
        acc.update(m[start : start + step], g[start : start + step])
    return acc


def pixel_metrics(
    maps: Any,
    masks: Any,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    bins: int = DEFAULT_BINS,
    exact_limit: int | None = DEFAULT_EXACT_LIMIT,
) -> dict[str, float]:
    """Pixel AUROC, AUPRO, pixel F1-max and its threshold in one pass (see MapAccumulator)."""
    return _accumulate(
        maps, masks, fpr_limit=fpr_limit, bins=bins, exact_limit=exact_limit
    ).compute()


def pixel_auroc(
    maps: Any, masks: Any, bins: int = DEFAULT_BINS, exact_limit: int | None = DEFAULT_EXACT_LIMIT
) -> float:
    """Pixel AUROC over all pixels of all maps (ties count 1/2)."""
    acc = _accumulate(maps, masks, bins=bins, exact_limit=exact_limit)
    thresholds, neg, pos, _ = acc._levels()
    return _auroc_levels(neg, pos, "pixel_auroc")


def pixel_f1_max(
    maps: Any, masks: Any, bins: int = DEFAULT_BINS, exact_limit: int | None = DEFAULT_EXACT_LIMIT
) -> tuple[float, float]:
    """Best pixel F1 over all thresholds and that threshold (``score >= threshold``)."""
    acc = _accumulate(maps, masks, bins=bins, exact_limit=exact_limit)
    thresholds, neg, pos, _ = acc._levels()
    return _f1_levels(neg, pos, thresholds, "pixel_f1_max")


def aupro(
    maps: Any,
    masks: Any,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    bins: int = DEFAULT_BINS,
    exact_limit: int | None = DEFAULT_EXACT_LIMIT,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``, as in the MVTec AD evaluation.

    * Regions: connected components of each image's ground truth with 8-connectivity
      (diagonal neighbours join); regions never span images.
    * Thresholds: every distinct score ``t``; a pixel is predicted anomalous when
      ``score >= t``.
    * ``PRO(t)``: the mean over all regions of all images of the fraction of the region's
      pixels predicted anomalous (each region weighs the same, whatever its size or image).
    * ``FPR(t)``: the fraction of all normal pixels (ground truth 0 in every image, defect-free
      images included) predicted anomalous.
    * The curve starts at (0, 0) above the highest score and ends at (1, 1); it is integrated
      with the trapezoid rule from FPR 0 to ``fpr_limit``, with PRO at exactly ``fpr_limit``
      linearly interpolated between the two surrounding points, and divided by ``fpr_limit``.

    NaN with a warning when there are no normal pixels or no regions. Large inputs are binned
    (module docstring); ``exact_limit=None`` forces the exact computation.
    """
    acc = _accumulate(maps, masks, fpr_limit=fpr_limit, bins=bins, exact_limit=exact_limit)
    return acc.compute()["aupro"]


def pro_curve(
    maps: Any, masks: Any, exact_limit: int | None = DEFAULT_EXACT_LIMIT
) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, PRO) points of :func:`aupro`'s curve, from (0, 0) to (1, 1)."""
    return _accumulate(maps, masks, exact_limit=exact_limit).pro_curve()


# --------------------------------------------------------------------------------------------
# Per class and mean over classes
# --------------------------------------------------------------------------------------------


class ClassMetrics:
    """Per-class image and pixel metrics, streamed batch by batch, and their class mean.

    ``update(classes, scores, labels, maps=None, masks=None)``: ``classes`` is one class name
    for the whole batch or one per sample; ``scores``/``labels`` are per image; ``maps`` and
    ``masks`` (``[N, H, W]``) are optional: a class that never gets maps (classification-only
    data sets) has NaN pixel metrics without a warning, but a class must not get maps in some
    batches and not in others.

    ``compute()`` returns ``{class: row, ..., "mean": row}`` in first-seen class order, each row
    ``{image_auroc, image_ap, image_f1_max, f1_threshold, pixel_auroc, aupro, pixel_f1_max,
    n_images, n_anomalous}``. The "mean" row is the mean over classes of each metric, ignoring
    NaN (NaN if every class is NaN); its ``f1_threshold`` is NaN (a mean of per-class thresholds
    is no threshold) and its counts are totals. :attr:`resolutions` lists the map sizes seen.
    """

    MEAN = "mean"

    def __init__(
        self,
        fpr_limit: float = DEFAULT_FPR_LIMIT,
        bins: int = DEFAULT_BINS,
        exact_limit: int | None = DEFAULT_EXACT_LIMIT,
        score_range: tuple[float, float] | None = None,
    ) -> None:
        self._acc_kwargs = {
            "fpr_limit": _check_fpr_limit(fpr_limit),
            "bins": bins,
            "exact_limit": exact_limit,
            "score_range": score_range,
        }
        self._scores: dict[str, list[np.ndarray]] = {}
        self._labels: dict[str, list[np.ndarray]] = {}
        self._maps: dict[str, MapAccumulator | None] = {}

    @property
    def classes(self) -> list[str]:
        return list(self._scores)

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        shapes: set[tuple[int, int]] = set()
        for acc in self._maps.values():
            if acc is not None:
                shapes |= acc.shapes
        return sorted(shapes)

    def update(
        self,
        classes: str | Sequence[str],
        scores: Any,
        labels: Any,
        maps: Any = None,
        masks: Any = None,
    ) -> None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        y = _as_binary(labels, "labels").reshape(-1)
        if s.shape != y.shape:
            raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or infinity")
        if isinstance(classes, str):
            names = np.full(s.size, classes, dtype=object)
        else:
            names = np.asarray(list(classes), dtype=object)
            if names.shape != s.shape:
                raise ValueError(f"{names.size} class names for {s.size} scores")
        if (maps is None) != (masks is None):
            raise ValueError("give both maps and masks, or neither")
        m = g = None
        if maps is not None:
            m, g = _as_maps(maps, masks)
            if m.shape[0] != s.size:
                raise ValueError(f"{m.shape[0]} maps for {s.size} scores")
        for name in dict.fromkeys(names.tolist()):
            sel = np.flatnonzero(names == name)
            key = str(name)
            if key not in self._scores:
                self._scores[key], self._labels[key] = [], []
                self._maps[key] = MapAccumulator(**self._acc_kwargs) if m is not None else None
            elif (self._maps[key] is None) != (m is None):
                raise ValueError(f"class {key!r} got maps in some batches and not in others")
            self._scores[key].append(s[sel])
            self._labels[key].append(y[sel])
            acc = self._maps[key]
            if acc is not None and m is not None and g is not None:
                acc.update(m[sel], g[sel])

    def merge(self, other: ClassMetrics) -> ClassMetrics:
        """Add another ClassMetrics' data (same settings) to this one; returns ``self``."""
        for key in other.classes:
            other_acc = other._maps[key]
            if key not in self._scores:
                self._scores[key], self._labels[key] = [], []
                self._maps[key] = None if other_acc is None else MapAccumulator(**self._acc_kwargs)
            elif (self._maps[key] is None) != (other_acc is None):
                raise ValueError(f"class {key!r} has maps in one part and not in the other")
            self._scores[key].extend(other._scores[key])
            self._labels[key].extend(other._labels[key])
            acc = self._maps[key]
            if acc is not None and other_acc is not None:
                acc.merge(other_acc)
        return self

    def class_scores(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """All image scores and labels of one class."""
        return np.concatenate(self._scores[name]), np.concatenate(self._labels[name])

    def overall_f1_max(self) -> tuple[float, float]:
        """Image F1-max and threshold over all classes pooled (one deployment threshold)."""
        if not self._scores:
            raise ValueError("no data")
        parts = [self.class_scores(c) for c in self.classes]
        return f1_max(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def compute(self) -> dict[str, dict[str, float]]:
        rows: dict[str, dict[str, float]] = {}
        for name in self.classes:
            s, y = self.class_scores(name)
            values, neg, pos = _image_levels(s, y)
            row: dict[str, float] = {}
            row["image_auroc"] = _auroc_levels(neg, pos, "image_auroc", name)
            row["image_ap"] = _ap_levels(neg, pos, "image_ap", name)
            row["image_f1_max"], row["f1_threshold"] = _f1_levels(
                neg, pos, values, "image_f1_max", name
            )
            acc = self._maps[name]
            if acc is None:
                row.update(dict.fromkeys(PIXEL_METRICS, math.nan))
            else:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    px = acc.compute()
                for w in caught:
                    warnings.warn(f"[{name}] {w.message}", w.category, stacklevel=2)
                row.update({k: px[k] for k in PIXEL_METRICS})
            row["n_images"] = int(s.size)
            row["n_anomalous"] = int(y.sum())
            rows[name] = row
        rows[self.MEAN] = _mean_row(list(rows.values()))
        return rows


def _mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    mean: dict[str, float] = {}
    for key in (*IMAGE_METRICS, *PIXEL_METRICS):
        vals = np.array([r.get(key, math.nan) for r in rows], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        mean[key] = float(vals.mean()) if vals.size else math.nan
    mean["f1_threshold"] = math.nan
    for key in _COUNT_KEYS:
        mean[key] = int(sum(int(r.get(key, 0)) for r in rows))
    return mean


def compute_metrics(
    classes: str | Sequence[str],
    scores: Any,
    labels: Any,
    maps: Any = None,
    masks: Any = None,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """One-shot :class:`ClassMetrics`: ``{class: row, ..., "mean": row}``."""
    cm = ClassMetrics(**kwargs)
    cm.update(classes, scores, labels, maps, masks)
    return cm.compute()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_PERCENT_KEYS = frozenset({*IMAGE_METRICS, *PIXEL_METRICS} - {"f1_threshold"})
_HEADERS = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "f1_threshold": "F1 threshold",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO@0.3",
    "pixel_f1_max": "Pixel F1-max",
    "n_images": "Images",
    "n_anomalous": "Anomalous",
}


def _fmt(key: str, value: Any, percent: bool, digits: int) -> str:
    if value is None:
        return "-"
    if key in _COUNT_KEYS:
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "-"
    if key in _PERCENT_KEYS and percent:
        return f"{100.0 * v:.{digits}f}"
    return f"{v:.{digits + 3 if key == 'f1_threshold' else digits + 2}f}"


def format_table_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    metrics: Iterable[str] | None = None,
    percent: bool = True,
    digits: int = 1,
    resolution: tuple[int, int] | int | str | None = None,
) -> str:
    """A Markdown table, one row per class (as :meth:`ClassMetrics.compute` returns).

    ``metrics`` defaults to the image counts and :data:`TABLE_METRICS` that the class rows
    hold. Scores are in percent with ``digits`` decimals (the paper's tables); NaN prints as
    ``-``. With ``resolution`` (``(H, W)``, a side length or a string) a line "Evaluation resolution: HxW"
    follows the table.
    """
    class_rows = [r for name, r in rows.items() if name != ClassMetrics.MEAN] or list(rows.values())
    present = {k for r in class_rows for k in r}
    if metrics is None:
        metrics = [k for k in (*_COUNT_KEYS, *TABLE_METRICS) if k in present]
    keys = list(metrics)
    header = "| Class | " + " | ".join(_HEADERS.get(k, k) for k in keys) + " |"
    rule = "|---|" + "|".join("---:" for _ in keys) + "|"
    lines = [header, rule]
    for name, row in rows.items():
        label = f"**{name}**" if name == ClassMetrics.MEAN else str(name)
        cells = [_fmt(k, row.get(k), percent, digits) for k in keys]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    text = "\n".join(lines) + "\n"
    if resolution is not None:
        if isinstance(resolution, str):
            res = resolution
        elif isinstance(resolution, int):
            res = f"{resolution}x{resolution}"
        else:
            res = f"{resolution[0]}x{resolution[1]}"
        text += f"\nEvaluation resolution: {res}\n"
    return text


def table_to_csv(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """CSV text with a ``class`` column and one column per key (full float precision)."""
    keys: list[str] = []
    for row in rows.values():
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *keys])
    for name, row in rows.items():
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append("" if v is None else repr(float(v)) if isinstance(v, float) else str(v))
        writer.writerow([name, *cells])
    return buf.getvalue()


def write_csv(rows: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write :func:`table_to_csv` to ``path``."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(table_to_csv(rows))


def read_csv(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read a table written by :func:`write_csv` (counts as int, the rest as float)."""
    rows: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            name = rec.pop("class")
            row: dict[str, float] = {}
            for k, v in rec.items():
                if v is None or v == "":
                    row[k] = math.nan
                elif k in _COUNT_KEYS:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows[name] = row
    return rows
