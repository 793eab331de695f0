"""Benchmark: streaming pixel AUROC + AUPRO (larp.metrics.MapAccumulator) vs holding all pixels.

Phase "stream": ``--n-maps`` maps of ``--size``^2 (default 1,700 x 518^2, MVTec AD's test set
at LaRP's input size, ~460 M pixels) are generated batch by batch and fed to a
MapAccumulator; nothing but the current batch and the accumulator is ever held.

Phase "naive" (smaller, ``--naive-maps``): all maps are held in memory and scored with
scikit-learn's ``roc_auc_score`` and with the MVTec AD style sort-everything AUPRO; the same
data then goes through the MapAccumulator, and the differences are reported beside the
accumulator's proven error bounds.

Each phase runs in its own process (fresh peak RSS). Memory is reported as the tracemalloc
peak above what was live before the step (numpy buffers are traced) and as the growth of the
process's peak RSS. Synthetic maps resemble a CLIP detector's output: a 37x37 patch-grid map
(noise + a response of random strength on the defects), bilinearly upsampled and blurred with
sigma 4 as at evaluation; masks are 1-3 rotated ellipses (0.01 %-5 % of the image) on ~73 %
of the images (MVTec AD: 1,258 of 1,725 test images are defective).

    python bench/bench_metrics.py --n-maps 1700 --size 518 [--out FOLDER]
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import add_out_argument, machine, write_results  # noqa: E402

GRID = 37  # patch grid of a ViT-L/14 at 518


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def make_batch(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 maps in [0, 1] and bool masks of ``size`` x ``size``."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if rng.random() >= 0.73:
            continue
        for _ in range(int(rng.integers(1, 4))):
            area = math.exp(rng.uniform(math.log(1e-4), math.log(5e-2))) * size * size
            aspect = rng.uniform(0.15, 1.0)
            a = math.sqrt(area / (math.pi * aspect))
            b = a * aspect
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            th = rng.uniform(0, math.pi)
            r = int(math.ceil(a)) + 1
            y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
            x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            dy, dx = yy - cy, xx - cx
            u = dx * math.cos(th) + dy * math.sin(th)
            v = -dx * math.sin(th) + dy * math.cos(th)
            masks[i, y0:y1, x0:x1] |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    zoom_down = (1, GRID / size, GRID / size)
    low = 0.45 * rng.random((n, GRID, GRID), dtype=np.float32)
    response = ndimage.zoom(masks.astype(np.float32), zoom_down, order=1)
    low += response * rng.uniform(0.1, 0.8, (n, 1, 1)).astype(np.float32)
    maps = ndimage.zoom(low, (1, size / GRID, size / GRID), order=1)[:, :size, :size]
    maps = ndimage.gaussian_filter(maps, (0, 4, 4))
    return np.clip(maps, 0.0, 1.0).astype(np.float32), masks


def _stream_into(acc, batches) -> tuple[float, float, float]:
    """Feed batches; returns (seconds in update, max transient MB in update, seconds outside)."""
    t_update = 0.0
    transient = 0
    t_gen = 0.0
    t0 = time.perf_counter()
    for maps, masks in batches:
        t_gen += time.perf_counter() - t0
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t1 = time.perf_counter()
        acc.update(maps, masks)
        t_update += time.perf_counter() - t1
        transient = max(transient, tracemalloc.get_traced_memory()[1] - before)
        t0 = time.perf_counter()
    return t_update, transient / 2**20, t_gen


def phase_stream(n_maps: int, size: int, batch: int, bins: int, seed: int) -> dict:
    from larp.metrics import MapAccumulator

    rss0 = _rss_mb()
    tracemalloc.start()
    rng = np.random.default_rng(seed)
    acc = MapAccumulator(bins=bins)

    def batches():
        for start in range(0, n_maps, batch):
            yield make_batch(rng, min(batch, n_maps - start), size)

    t0 = time.perf_counter()
    t_update, transient_mb, t_gen = _stream_into(acc, batches())
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t1 = time.perf_counter()
    out = acc.compute()
    t_compute = time.perf_counter() - t1
    compute_mb = (tracemalloc.get_traced_memory()[1] - before) / 2**20
    wall = time.perf_counter() - t0
    diag = acc.diagnostics()
    tracemalloc.stop()
    return {
        "n_maps": n_maps,
        "size": size,
        "batch": batch,
        "pixels": diag["n_pixels"],
        "wall_s": wall,
        "generate_s": t_gen,
        "update_s": t_update,
        "compute_s": t_compute,
        "metric_s": t_update + t_compute,
        "update_transient_mb": transient_mb,
        "compute_transient_mb": compute_mb,
        "state_mb": acc.state_bytes() / 2**20,
        "rss_baseline_mb": rss0,
        "rss_peak_mb": _rss_mb(),
        "metrics": out,
        "diagnostics": {k: v for k, v in diag.items() if k != "resolutions"},
    }


def _naive_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Sort every pixel (the MVTec AD reference approach)."""
    structure = np.ones((3, 3), dtype=int)
    fp = np.zeros(maps.shape, dtype=np.uint32)
    pro = np.zeros(maps.shape, dtype=np.float64)
    n_normal = n_regions = 0
    for i in range(len(maps)):
        labeled, n = ndimage.label(masks[i], structure=structure)
        n_regions += n
        fp[i] = labeled == 0
        n_normal += int(fp[i].sum())
        sizes = np.bincount(labeled.ravel())
        w = np.zeros(n + 1)
        w[1:] = 1.0 / sizes[1:]
        pro[i] = w[labeled]
    flat = maps.ravel()
    order = np.argsort(flat, kind="stable")[::-1]
    s = flat[order]
    fprs = np.cumsum(fp.ravel()[order], dtype=np.float64) / n_normal
    pros = np.cumsum(pro.ravel()[order]) / n_regions
    keep = np.append(s[1:] != s[:-1], True)
    x = np.concatenate(([0.0], fprs[keep]))
    y = np.concatenate(([0.0], pros[keep]))
    k = int(np.searchsorted(x, limit, side="right"))
    area = float(np.sum((x[1:k] - x[: k - 1]) * (y[1:k] + y[: k - 1]) / 2))
    if k < len(x):
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        area += (limit - x[k - 1]) * (y[k - 1] + y_at) / 2
    return area / limit


def _measure(fn):
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    return value, seconds, (tracemalloc.get_traced_memory()[1] - before) / 2**20


def phase_naive(n_maps: int, size: int, batch: int, bins: int, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from larp.metrics import MapAccumulator

    rss0 = _rss_mb()
    tracemalloc.start()
    rng = np.random.default_rng(seed)
    parts = [make_batch(rng, min(batch, n_maps - s), size) for s in range(0, n_maps, batch)]
    maps = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    del parts
    data_mb = (maps.nbytes + masks.nbytes) / 2**20
    rss_data = _rss_mb()
    res: dict = {"n_maps": n_maps, "size": size, "pixels": int(maps.size), "data_mb": data_mb}

    auc, sec, peak = _measure(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
    res["sklearn_auroc"] = {"value": float(auc), "s": sec, "peak_mb": peak}
    pro, sec, peak = _measure(lambda: _naive_aupro(maps, masks))
    res["naive_aupro"] = {"value": pro, "s": sec, "peak_mb": peak}

    def streamed():
        acc = MapAccumulator(bins=bins)
        gen = ((maps[s : s + batch], masks[s : s + batch]) for s in range(0, n_maps, batch))
        _stream_into(acc, gen)
        return acc.compute(), acc.diagnostics()

    (out, diag), sec, peak = _measure(streamed)
    res["stream"] = {
        "s": sec,
        "peak_mb": peak,
        "metrics": out,
        "pixel_auroc_abs_diff": abs(out["pixel_auroc"] - auc),
        "aupro_abs_diff": abs(out["aupro"] - pro),
        "pixel_auroc_error_bound": diag["pixel_auroc_error_bound"],
        "aupro_error_bound": diag["aupro_error_bound"],
        "mode": diag["mode"],
        "bin_width": diag["bin_width"],
    }
    tracemalloc.stop()
    res["rss_baseline_mb"] = rss0
    res["rss_with_data_mb"] = rss_data
    res["rss_peak_mb"] = _rss_mb()
    return res


def _in_child(fn, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def markdown(result: dict) -> str:
    lines = [
        "| run | maps | pixels | metric time (s) | peak memory (MB) | peak RSS growth (MB) "
        "| pixel AUROC | AUPRO@0.3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    s = result.get("stream")
    if s:
        mem = s["state_mb"] + max(s["update_transient_mb"], s["compute_transient_mb"])
        lines.append(
            f"| MapAccumulator, streamed | {s['n_maps']} x {s['size']}^2 | {s['pixels']:,} "
            f"| {s['metric_s']:.1f} | {mem:.0f} | {s['rss_peak_mb'] - s['rss_baseline_mb']:.0f} "
            f"| {s['metrics']['pixel_auroc']:.6f} | {s['metrics']['aupro']:.6f} |"
        )
    n = result.get("naive")
    if n:
        size = f"{n['n_maps']} x {n['size']}^2"
        rss = n["rss_peak_mb"] - n["rss_baseline_mb"]
        lines += [
            f"| all maps held (data only) | {size} | {n['pixels']:,} | - | {n['data_mb']:.0f} "
            f"| {n['rss_with_data_mb'] - n['rss_baseline_mb']:.0f} | - | - |",
            f"| sklearn roc_auc_score (data held) | {size} | {n['pixels']:,} "
            f"| {n['sklearn_auroc']['s']:.1f} | {n['sklearn_auroc']['peak_mb']:.0f} | {rss:.0f}* "
            f"| {n['sklearn_auroc']['value']:.6f} | - |",
            f"| sort-all AUPRO, MVTec style (data held) | {size} | {n['pixels']:,} "
            f"| {n['naive_aupro']['s']:.1f} | {n['naive_aupro']['peak_mb']:.0f} | {rss:.0f}* "
            f"| - | {n['naive_aupro']['value']:.6f} |",
            f"| MapAccumulator on the same data | {size} | {n['pixels']:,} "
            f"| {n['stream']['s']:.1f} | {n['stream']['peak_mb']:.0f} | - "
            f"| {n['stream']['metrics']['pixel_auroc']:.6f} "
            f"| {n['stream']['metrics']['aupro']:.6f} |",
            "",
            "Peak memory: tracemalloc peak above the memory live before the step (for the "
            "streamed run: accumulator state + the largest transient of one update/compute, "
            "batches excluded). *: RSS growth of the whole naive process (data + both).",
            "",
            f"Histogram vs exact on the same data: |d pixel AUROC| = "
            f"{n['stream']['pixel_auroc_abs_diff']:.2e} (bound "
            f"{n['stream']['pixel_auroc_error_bound']:.2e}), |d AUPRO| = "
            f"{n['stream']['aupro_abs_diff']:.2e} (bound {n['stream']['aupro_error_bound']:.2e}),"
            f" bin width {n['stream']['bin_width']:.3g}.",
        ]
    if s:
        d = s["diagnostics"]
        lines += [
            "",
            f"Streamed run: {s['wall_s']:.1f} s wall ({s['generate_s']:.1f} s generating maps), "
            f"{d['n_regions']} regions, bin width {d['bin_width']:.3g}, error bounds: pixel "
            f"AUROC {d['pixel_auroc_error_bound']:.2e}, AUPRO {d['aupro_error_bound']:.2e}, "
            f"pixel F1-max {d['pixel_f1_max_error_bound']:.2e}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-maps", type=int, default=1700)
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bins", type=int, default=2**20)
    p.add_argument("--naive-maps", type=int, default=200, help="0 skips the naive phase")
    p.add_argument("--naive-size", type=int, default=None, help="default: --size")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p)
    args = p.parse_args(argv)

    result: dict = {
        "machine": machine(numpy=np.__version__),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.n_maps > 0:
        result["stream"] = _in_child(
            phase_stream, args.n_maps, args.size, args.batch, args.bins, args.seed
        )
    if args.naive_maps > 0:
        result["naive"] = _in_child(
            phase_naive,
            args.naive_maps,
            args.naive_size or args.size,
            args.batch,
            args.bins,
            args.seed,
        )
    text = markdown(result)
    print(text)
    write_results("metrics", result, text, args.out)
    return result


if __name__ == "__main__":
    main()
