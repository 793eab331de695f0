"""Benchmark: inference at the paper's scale on a GPU (ViT-L-14-336 at 518x518).

For LaRP, for the AnomalyCLIP mode (all four switches off) and for the bare backbone
(`clip.encode_image`), at each batch size the script reports:

- ms/image and images/s (median of `--repeats` timed runs, after `--warmup`);
- model FLOP utilisation (MFU): the variant's own FLOPs per image, counted once with
  `torch.utils.flop_counter` (attention included), times images/s, over the GPU's dense bf16
  peak (`PEAK_BF16_TFLOPS`, or `--peak-tflops`);
- peak memory (`torch.cuda.max_memory_allocated`).

It uses the fast inference path the product uses: `LaRPCLIP.predict(precision=...)`, backbone
under bf16 autocast, head in fp32, text embeddings cached, optionally `--compile`. Weights are
random (timing does not depend on them; nothing is downloaded). The paper reports about 280 ms per
518x518 image on an RTX 4090; the target is at least 40 % MFU in the best batch (under 5 ms per
image on an H100/H200).

    python bench/bench_gpu.py                                  # CUDA, ViT-L-14-336 @ 518
    python bench/bench_gpu.py --batches 1,16,32,64 --compile
    python bench/bench_gpu.py --device cpu --config tiny --batches 1,4   # smoke run on a CPU

Without a CUDA device (and without `--device cpu`) it measures nothing and writes a result that
says so. Writes `bench/results/gpu.json` and `bench/results/gpu.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import add_out_argument, machine, table, write_results  # noqa: E402

from larp.config import LaRPConfig  # noqa: E402
from larp.model import LaRPCLIP, backbone_autocast  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s; the
# first name found in `torch.cuda.get_device_name()` wins, so the specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "RTX 4090": 165.2,
    "L4": 121.0,
    "A10": 125.0,
}

CONFIGS = {
    "vit-l-14-336@518": lambda: LaRPConfig(pretrained=None),
    "tiny": lambda: LaRPConfig.tiny_random(),
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def count_flops(run, *args) -> int:
    """FLOPs of one call of `run`. torch counts the CUDA attention kernels itself; the CPU one
    (`_scaled_dot_product_flash_attention_for_cpu`) is added here with the same formula, and
    `nn.MultiheadAttention`'s fused inference kernel (which the counter does not see: it counted
    ViT-L-14-336 @ 518 as 0.55 TFLOP, where it is 1.01) is switched off while counting."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            run(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(run, images: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    device = images.device
    for _ in range(warmup):
        run(images)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(images)
        _sync(device)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    batch = images.shape[0]
    out = {"ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def variants(config: LaRPConfig, device: torch.device, precision: str, compile_mode: bool):
    """name -> callable(images): LaRP, the AnomalyCLIP mode on the same backbone, the bare one."""
    larp = LaRPCLIP(config).to(device).eval()
    baseline = LaRPCLIP(config.anomalyclip(), backbone=larp.backbone).to(device).eval()
    if compile_mode:
        larp.backbone.compile_vision()
    clip = larp.backbone.clip

    @torch.inference_mode()
    def bare(images: torch.Tensor) -> torch.Tensor:
        with backbone_autocast(device.type, precision):
            return clip.encode_image(images)

    return {
        "bare backbone": bare,
        "LaRP": lambda images: larp.predict(images, precision=precision),
        "AnomalyCLIP mode": lambda images: baseline.predict(images, precision=precision),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    config = CONFIGS[args.config]()
    precision = args.precision
    peak = peak_tflops(device, args.peak_tflops)
    runs = variants(config, device, precision, args.compile)
    size = config.image_size
    one = torch.randn(1, 3, size, size, device=device)
    flops = {}
    for name, call in runs.items():
        call(one)  # text embeddings cached, compiled graph built: not counted
        flops[name] = count_flops(call, one)
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, size, size, device=device)
        for name, call in runs.items():
            try:
                timing = time_variant(call, images, args.warmup, args.repeats)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"variant": name, "batch": batch, "error": "out of memory"})
                continue
            achieved = flops[name] * timing["images_per_s"] / 1e12
            rows.append(
                {
                    "variant": name,
                    "batch": batch,
                    **timing,
                    "gflops_per_image": flops[name] / 1e9,
                    "achieved_tflops": achieved,
                    "mfu": achieved / peak if peak else None,
                }
            )
    best = {}
    for name in runs:
        ok = [r for r in rows if r["variant"] == name and "error" not in r]
        if ok:
            best[name] = max(ok, key=lambda r: r["images_per_s"])
    return {
        "config": args.config,
        "image_size": size,
        "precision": precision,
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak,
        "rows": rows,
        "best": best,
        "target": "LaRP >= 40 % MFU in the best batch (under 5 ms/image on H100/H200)",
    }


def markdown(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"GPU benchmark not run: {result['skipped']}"
    head = (
        f"{result['config']} at {result['image_size']}x{result['image_size']}, backbone "
        f"{result['precision']}, compile={result['compile']}, on {result['device']} "
        f"(dense bf16 peak: {result['peak_bf16_tflops'] or 'unknown'} TFLOP/s)\n\n"
    )
    body = []
    for r in result["rows"]:
        if "error" in r:
            body.append([r["variant"], r["batch"], r["error"], "", "", "", ""])
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "n/a"
        body.append(
            [
                r["variant"],
                r["batch"],
                f"{r['ms_per_image']:.2f}",
                f"{r['images_per_s']:.1f}",
                f"{r['gflops_per_image']:.4g}",
                mfu,
                memory,
            ]
        )
    header = ["variant", "batch", "ms/image", "images/s", "GFLOP/image", "MFU", "peak GiB"]
    return head + table(header, body) + f"\n\nTarget: {result['target']}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="vit-l-14-336@518")
    parser.add_argument("--batches", default="1,8,16,32,64",
                        help="comma-separated batch sizes")  # fmt: skip
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision pass")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, if unknown")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches must be >= 1")
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    described = machine()
    if args.device == "cuda" and not torch.cuda.is_available():
        result = {"skipped": "no CUDA device on this machine (smoke run: --device cpu)"}
    else:
        result = run(args)
    path = write_results("gpu", {"machine": described, **result}, markdown(result), args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
