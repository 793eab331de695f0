"""Benchmark: LaRP-CLIP inference time against the bare frozen backbone, on CPU.

Side by side, on the same backbone weights, input and batch, under `torch.inference_mode`:

- ``bare``        open_clip's ``clip.encode_image`` (the backbone alone, global feature only);
- ``extract``     ``FrozenBackbone.extract``: feature-layer tokens incl. the V-V path, plus the
                  global feature;
- ``larp``        ``LaRPCLIP.predict``: extract + all of LaRP (text embeddings cached, maps,
                  fusion, refiner, prototype branch, upsampling and the σ blur);
- ``anomalyclip`` ``predict`` of ``config.anomalyclip()`` (all four LaRP switches off).

and, to show where the time goes (the profile), the parts on their own:

- ``extract_no_vv``  ``extract`` with the V-V path off (its cost is extract − extract_no_vv);
- ``head``           ``predict_features`` on precomputed features (everything after the backbone);
- ``head_no_blur``   the same without the evaluation blur;
- ``blur``           upsampling + Gaussian blur of the final maps alone;
- ``prototype``      the prototype branch alone (quantile, prototype, μ).

Each variant gets ``--warmup`` untimed runs, then ``--repeats`` timed runs; the runs of all
variants are interleaved round-robin so that load from other processes spreads over all of them
evenly, and the median is reported as ms/image and as a ratio to ``bare``.

    python bench/bench_model.py --configs tiny,vit-b-16 --batch 8 --repeats 7

Writes ``bench/results/model.json`` and ``bench/results/model.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import add_out_argument, add_threads_argument, machine, set_threads, write_results  # noqa: E402

from larp.backbone import FrozenBackbone  # noqa: E402
from larp.config import LaRPConfig  # noqa: E402
from larp.model import LaRPCLIP  # noqa: E402
from larp.pixel import gaussian_blur, upsample  # noqa: E402
from larp.prototype import prototype_deviation  # noqa: E402

CONFIGS = {
    "tiny": lambda: LaRPConfig.tiny_random(),
    "vit-b-16": lambda: LaRPConfig(
        backbone="ViT-B-16",
        pretrained=None,
        image_size=224,
        feature_layers=(3, 6, 9, 12),
        shallow_layers=(3, 6),
        vv_from_layer=3,
    ),
}
MAIN = ("bare", "extract", "larp", "anomalyclip")
PARTS = ("extract_no_vv", "head", "head_no_blur", "blur", "prototype")


def vv_flop_share(width: int, tokens: int, layers: int, vv_from: int | None) -> float:
    """Multiply-adds of the V-V path as a fraction of the vision tower's blocks (analytic).

    Per token, a block costs 12·W² (qkv 3, out_proj 1, MLP 8) + 2·T·W (scores and mixing); a
    V-V step reuses the block's v, so it adds one attention (2·T·W) and one out_proj (W²).
    """
    if vv_from is None:
        return 0.0
    block = 12 * width**2 + 2 * tokens * width
    extra = width**2 + 2 * tokens * width
    return (layers - vv_from + 1) * extra / (layers * block)


# (width, tokens, vision layers, vv_from_layer) of the configs, and of the SPEC default
# ViT-L-14-336-quickgelu at 518 px (37x37 grid) for reference.
GEOMETRY = {
    "tiny": (64, 14 * 14 + 1, 4, 2),
    "vit-b-16": (768, 14 * 14 + 1, 12, 3),
    "default ViT-L-14-336 @ 518": (1024, 37 * 37 + 1, 24, 6),
}


def variants(config: LaRPConfig, batch: int) -> dict:
    """The callables to time, all on one backbone and one input batch."""
    torch.manual_seed(0)
    backbone = FrozenBackbone(config)
    larp = LaRPCLIP(config, backbone).eval()
    base = LaRPCLIP(config.anomalyclip(), backbone).eval()
    no_vv = FrozenBackbone(config.replace(vv_from_layer=None), clip=backbone.clip)
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    with torch.inference_mode():
        feats = backbone.extract(images)
        final = larp.predict_features(feats, config.lam, config.top_k, blur=False).final_map
        q = torch.rand(batch, backbone.grid_size**2)
        last = feats.patch_tokens[:, -1].float()
    size = config.image_size
    return {
        "bare": lambda: backbone.clip.encode_image(images),
        "extract": lambda: backbone.extract(images),
        "larp": lambda: larp.predict(images),
        "anomalyclip": lambda: base.predict(images),
        "extract_no_vv": lambda: no_vv.extract(images),
        "head": lambda: larp.predict_features(feats, config.lam, config.top_k, True, size),
        "head_no_blur": lambda: larp.predict_features(feats, config.lam, config.top_k, False, size),
        "blur": lambda: gaussian_blur(upsample(final, size), config.blur_sigma),
        "prototype": lambda: prototype_deviation(q, last, config.normal_quantile),
    }


def time_all(
    fns: dict, repeats: int, warmup: int, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Round-robin timings; at least `repeats` rounds, more for fast configs until the timed
    rounds take about `min_seconds` (estimated from the last warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        round_s = 0.0
        for _ in range(max(1, warmup)):
            start = time.perf_counter()
            for fn in fns.values():
                fn()
            round_s = time.perf_counter() - start
        rounds = max(repeats, math.ceil(min_seconds / max(round_s, 1e-6)))
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def run(names: list[str], batch: int, repeats: int, warmup: int, min_seconds: float = 0.0) -> dict:
    results = {
        "machine": machine(),
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "min_seconds": min_seconds,
    }
    results["configs"] = {}
    for name in names:
        config = CONFIGS[name]()
        print(f"[{name}] building {config.backbone} at {config.image_size}px ...", flush=True)
        fns = variants(config, batch)
        times = time_all(fns, repeats, warmup, min_seconds)
        median = {k: statistics.median(v) for k, v in times.items()}
        bare = median["bare"]
        rows = {
            k: {
                "ms_per_image": 1000 * median[k] / batch,
                "ratio_vs_bare": median[k] / bare,
                # robust to load from other processes: median of the per-round ratios (the
                # variants of a round run back to back) and the ratio of the fastest runs
                "paired_ratio_vs_bare": statistics.median(
                    t / b for t, b in zip(times[k], times["bare"], strict=True)
                ),
                "min_ratio_vs_bare": min(times[k]) / min(times["bare"]),
                "min_ms_per_image": 1000 * min(times[k]) / batch,
                "max_ms_per_image": 1000 * max(times[k]) / batch,
            }
            for k in fns
        }
        paired = {k: rows[k]["paired_ratio_vs_bare"] for k in fns}
        overhead = {
            "larp_over_bare_pct": 100 * (median["larp"] / bare - 1),
            "larp_over_bare_pct_paired": 100 * (paired["larp"] - 1),
            "larp_over_bare_pct_min": 100 * (rows["larp"]["min_ratio_vs_bare"] - 1),
            "larp_over_anomalyclip_pct_paired": 100 * (paired["larp"] / paired["anomalyclip"] - 1),
            "larp_over_anomalyclip_pct": 100 * (median["larp"] / median["anomalyclip"] - 1),
            "vv_path_pct_of_bare": 100 * (median["extract"] - median["extract_no_vv"]) / bare,
            "extract_no_vv_over_bare_pct": 100 * (median["extract_no_vv"] / bare - 1),
            "head_pct_of_bare": 100 * median["head"] / bare,
            "blur_pct_of_bare": 100 * median["blur"] / bare,
            "prototype_pct_of_bare": 100 * median["prototype"] / bare,
            "vv_path_flops_pct_analytic": 100 * vv_flop_share(*GEOMETRY[name]),
        }
        results["configs"][name] = {
            "rounds": len(times["bare"]),
            "config": {
                "backbone": config.backbone,
                "image_size": config.image_size,
                "feature_layers": list(config.feature_layers),
                "vv_from_layer": config.vv_from_layer,
                "blur_sigma": config.blur_sigma,
            },
            "variants": rows,
            "overhead": overhead,
            "target_larp_over_bare_le_5pct": overhead["larp_over_bare_pct_paired"] <= 5.0,
        }
        print(markdown_config(name, results["configs"][name]), flush=True)
    return results


def markdown_config(name: str, entry: dict) -> str:
    cfg = entry["config"]
    lines = [
        f"### {name}: {cfg['backbone']} at {cfg['image_size']} px, feature layers "
        f"{cfg['feature_layers']}, V-V from layer {cfg['vv_from_layer']} "
        f"({entry['rounds']} timed rounds)",
        "",
        "| variant | ms/image (median) | min–max ms/image | × bare (medians) "
        "| × bare (paired) | × bare (minima) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in (*MAIN, *PARTS):
        row = entry["variants"][key]
        lines.append(
            f"| {key} | {row['ms_per_image']:.2f} | {row['min_ms_per_image']:.2f}–"
            f"{row['max_ms_per_image']:.2f} | {row['ratio_vs_bare']:.3f} "
            f"| {row['paired_ratio_vs_bare']:.3f} | {row['min_ratio_vs_bare']:.3f} |"
        )
    o = entry["overhead"]
    verdict = "met" if entry["target_larp_over_bare_le_5pct"] else "MISSED"
    lines += [
        "",
        f"- LaRP over the bare backbone: {o['larp_over_bare_pct_paired']:+.1f} % paired "
        f"({o['larp_over_bare_pct']:+.1f} % medians, {o['larp_over_bare_pct_min']:+.1f} % "
        f"minima; target ≤ 5 %: {verdict}); over AnomalyCLIP mode: "
        f"{o['larp_over_anomalyclip_pct_paired']:+.1f} % paired",
        f"- where it goes (% of bare): V-V path {o['vv_path_pct_of_bare']:.1f}, block-by-block "
        f"extraction without V-V {o['extract_no_vv_over_bare_pct']:+.1f}, whole head "
        f"{o['head_pct_of_bare']:.1f} (of which upsample+blur {o['blur_pct_of_bare']:.1f}, "
        f"prototype {o['prototype_pct_of_bare']:.2f}); the V-V path is "
        f"{o['vv_path_flops_pct_analytic']:.1f} % of the tower's multiply-adds by count",
        "",
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines = [
        "# LaRP-CLIP inference benchmark (CPU)",
        "",
        f"Batch {results['batch']}, {results['warmup']} warm-up + at least "
        f"{results['repeats']} timed rounds (more until ~{results['min_seconds']:g} s of timing), "
        "each round running every variant once; `torch.inference_mode`; random-init weights.",
        "Ratios to `bare`: of the medians; *paired*, the median over rounds of each round's "
        "ratio (variants of a round run back to back, so load from other processes mostly "
        "cancels; the verdict uses it); and of the minima.",
        "",
    ]
    for name, entry in results["configs"].items():
        lines.append(markdown_config(name, entry))
    lines += [
        "V-V path share of the vision tower's multiply-adds (analytic, see `vv_flop_share`):",
        "",
        "| geometry | width | tokens | layers | V-V from | V-V share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, geometry in GEOMETRY.items():
        share = 100 * vv_flop_share(*geometry)
        lines.append(f"| {name} | " + " | ".join(str(g) for g in geometry) + f" | {share:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,vit-b-16", help=f"any of {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=20.0,
        help="add rounds for fast configs until the timing takes about this long",
    )
    add_threads_argument(parser)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    set_threads(args.threads)
    results = run(names, args.batch, args.repeats, args.warmup, args.min_seconds)
    write_results("model", results, markdown(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
