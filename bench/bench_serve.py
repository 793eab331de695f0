"""Benchmark: the detection endpoint under load, with and without dynamic batching, on 1 and 2
replicas, side by side in one run (loopback only, bounded in requests and time).

For each configuration (max_batch_size 1 or 8) x (1 or 2 replicas) the app is (re)deployed on
one local Ray Serve, warmed up, then ``--concurrency`` clients (default 16) post the same image
back to back until ``--requests`` answers or ``--duration`` seconds, whichever comes first.
Reported: throughput (answers/s), p50/p90/p99 latency, status counts and the mean batch size the
replicas actually ran (from /info). The tiny random model (LaRPConfig.tiny_random(), 112 px) is used
unless ``--checkpoint`` is given. Results go to bench/results/serve.{json,md} with the machine.

    python bench/bench_serve.py                      # ~3 min on 2 CPUs
    python bench/bench_serve.py --requests 200 --duration 10 --out /tmp/serve_bench
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from common import add_out_argument, machine, write_results  # noqa: E402
from PIL import Image  # noqa: E402

CONFIGS = [  # (max_batch_size, replicas)
    (1, 1),
    (8, 1),
    (1, 2),
    (8, 2),
]


def _configs(replicas: str) -> list[tuple[int, int]]:
    """The (max_batch_size, replicas) rows to run; a smoke run keeps only one replica count."""
    wanted = {r.strip() for r in replicas.split(",")}
    chosen = [c for c in CONFIGS if str(c[1]) in wanted]
    if not chosen or len(chosen) != 2 * len(wanted):
        raise ValueError(f"--replicas {replicas!r}: choose from 1, 2 or 1,2")
    return chosen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _payload(size: int, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


async def _load(url: str, body: bytes, concurrency: int, n: int, duration: float) -> dict:
    """`concurrency` closed-loop clients until `n` answers or `duration` seconds."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            nonlocal sent
            while sent < n and time.perf_counter() < stop_at:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                t1 = time.perf_counter()
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "answered_200": len(latencies),
        "elapsed_s": elapsed,
        "throughput_rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


async def _get_load(url: str, concurrency: int, n: int) -> float:
    """GETs/s of `url` with `concurrency` closed-loop clients (the HTTP path's own ceiling)."""
    sent = 0
    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < n:
                sent += 1
                await client.get(url)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


def _replica_stats(base: str, replicas: int) -> dict:
    """Batch statistics of every replica (each /info answer comes from one replica)."""
    seen: dict[str, dict] = {}
    for _ in range(30 * replicas):
        stats = httpx.get(base + "/info", timeout=10).json()["replica_stats"]
        seen[stats["replica"]] = stats
        if len(seen) >= replicas:
            break
    batches = sum(s["batches"] for s in seen.values())
    images = sum(s["images"] for s in seen.values())
    return {
        "replicas_seen": len(seen),
        "batches": batches,
        "images": images,
        "mean_batch_size": images / batches if batches else None,
        "images_per_replica": sorted(s["images"] for s in seen.values()),
    }


def _ceiling(checkpoint: str, body: bytes, threads: int, seconds: float = 3.0) -> dict:
    """In-process costs of one request, without HTTP: decode + preprocessing of the payload,
    and the model's images/s at batch 1 and 8 on `threads` torch threads (a replica's share).
    The model speed-up from batching bounds what batching can gain end to end."""
    import torch

    from larp import load_checkpoint
    from serve.http import Limits, decode_request_image

    torch.set_num_threads(max(1, int(threads)))
    model = load_checkpoint(checkpoint)
    size = model.config.image_size

    def timed(fn, min_runs: int = 5) -> float:
        fn()
        runs, start = 0, time.perf_counter()
        while runs < min_runs or time.perf_counter() - start < seconds:
            fn()
            runs += 1
        return (time.perf_counter() - start) / runs

    decode_s = timed(lambda: decode_request_image(body, Limits(), size))
    out = {"torch_threads": torch.get_num_threads(), "decode_ms": decode_s * 1000}
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size)
        per_call = timed(lambda x=x: model.predict(x))
        out[f"model_images_per_s_batch{batch}"] = batch / per_call
    out["model_batching_speedup"] = (
        out["model_images_per_s_batch8"] / out["model_images_per_s_batch1"]
    )
    return out


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from larp import LaRPCLIP, LaRPConfig, save_checkpoint
    from serve.app import build

    work = Path(tempfile.mkdtemp(prefix="larp-bench-"))
    try:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(save_checkpoint(LaRPCLIP(LaRPConfig.tiny_random()), work / "ckpt"))
        body = _payload(args.image_size, args.format)
        ceiling = _ceiling(checkpoint, body, args.replica_cpus)
        print(f"in-process: {ceiling}", flush=True)
        port = _free_port()
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
            logging_level="warning",
            log_to_driver=False,
        )
        described = machine(ray=ray.__version__)
        rows = []
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            for batch, replicas in args.configs:
                app = build(
                    {
                        "checkpoint": checkpoint,
                        "num_replicas": replicas,
                        "max_batch_size": batch,
                        "batch_wait_timeout_s": args.batch_wait_timeout_s,
                        "max_ongoing_requests": args.concurrency,
                        "max_queued_requests": -1,
                        "num_cpus": args.replica_cpus,
                    }
                )
                t0 = time.perf_counter()
                serve.run(app, name="bench", route_prefix="/", blocking=False)
                _wait_ready(base + "/healthz")
                deploy_s = time.perf_counter() - t0
                asyncio.run(_load(base + "/detect", body, args.concurrency, args.warmup, 30))
                result = asyncio.run(
                    _load(base + "/detect", body, args.concurrency, args.requests, args.duration)
                )
                stats = _replica_stats(base, replicas)
                stats["healthz_rps"] = asyncio.run(
                    _get_load(base + "/healthz", args.concurrency, 300)
                )
                row = {
                    "max_batch_size": batch,
                    "replicas": replicas,
                    "concurrency": args.concurrency,
                    "deploy_s": deploy_s,
                    **result,
                    **stats,
                }
                rows.append(row)
                print(_row_line(row), flush=True)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        described["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speedups = {}
    for replicas in sorted({r for _, r in args.configs}):
        by_batch = {row["max_batch_size"]: row for row in rows if row["replicas"] == replicas}
        if by_batch.get(1, {}).get("throughput_rps"):
            speedups[str(replicas)] = by_batch[8]["throughput_rps"] / by_batch[1]["throughput_rps"]
    # issue #9: the endpoint under load against the model's own offline throughput, on the same
    # CPU share (one replica, batching on, vs the in-process model at batch 8)
    batched_one = [r for r in rows if r["replicas"] == 1 and r["max_batch_size"] == 8]
    offline = ceiling["model_images_per_s_batch8"]
    kept = batched_one[0]["throughput_rps"] / offline if batched_one and offline else None
    return {
        "benchmark": "serve",
        "model": "LaRPConfig.tiny_random() random weights"
        if args.checkpoint is None
        else args.checkpoint,
        "payload": {"format": args.format, "size": args.image_size, "bytes": len(body)},
        "settings": {
            k: getattr(args, k)
            for k in (
                "concurrency",
                "requests",
                "duration",
                "warmup",
                "batch_wait_timeout_s",
                "num_cpus",
                "replica_cpus",
                "replicas",
            )
        },
        "machine": described,
        "in_process": ceiling,
        "rows": rows,
        "batching_speedup_by_replicas": speedups,
        "target": "batching (max_batch_size 8) at least doubles throughput at concurrency 16",
        "target_met": bool(speedups) and all(v >= 2.0 for v in speedups.values()),
        "endpoint_vs_offline": kept,
        "endpoint_target": "one replica keeps at least 80 % of the model's offline throughput",
        "endpoint_target_met": kept is not None and kept >= 0.8,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row_line(row: dict) -> str:
    return (
        f"batch {row['max_batch_size']:>2} replicas {row['replicas']}: "
        f"{row['throughput_rps']:.1f} req/s, p50 {_fmt(row['p50_ms'])} ms, "
        f"p99 {_fmt(row['p99_ms'])} ms, mean batch {_fmt(row['mean_batch_size'], 2)}, "
        f"statuses {row['statuses']}"
    )


def markdown(report: dict) -> str:
    lines = [
        "# Serving benchmark (`bench/bench_serve.py`)",
        "",
        f"Model: {report['model']}; payload: {report['payload']['size']} px "
        f"{report['payload']['format']} ({report['payload']['bytes']} bytes); "
        f"concurrency {report['settings']['concurrency']}, up to "
        f"{report['settings']['requests']} requests or {report['settings']['duration']} s per "
        f"row; batch_wait_timeout_s {report['settings']['batch_wait_timeout_s']}.",
        "",
        f"Ray given {report['settings']['num_cpus']} CPUs, {report['settings']['replica_cpus']} "
        "per replica.",
        "",
        "| max_batch_size | replicas | throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) "
        "| mean batch run | answered | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['max_batch_size']} | {row['replicas']} | {row['throughput_rps']:.1f} "
            f"| {_fmt(row['p50_ms'])} | {_fmt(row['p90_ms'])} | {_fmt(row['p99_ms'])} "
            f"| {_fmt(row['mean_batch_size'], 2)} | {row['answered_200']} "
            f"| {row['statuses']} |"
        )
    lines.append("")
    for replicas, speedup in report["batching_speedup_by_replicas"].items():
        lines.append(f"- batching speed-up with {replicas} replica(s): x{speedup:.2f}")
    c = report["in_process"]
    lines.append(
        f"- in-process, no HTTP ({c['torch_threads']} torch thread, a replica's share): decode "
        f"+ preprocessing {c['decode_ms']:.1f} ms per request; model "
        f"{c['model_images_per_s_batch1']:.0f} img/s at batch 1, "
        f"{c['model_images_per_s_batch8']:.0f} img/s at batch 8 (x{c['model_batching_speedup']:.2f}"
        ", the most batching can gain end to end here)"
    )
    lines.append(
        "- healthz (req/s): the HTTP path alone (proxy + replica, no decode, no model) at the "
        "same concurrency: " + ", ".join(f"{r['healthz_rps']:.0f}" for r in report["rows"])
    )
    lines.append(f"- target ({report['target']}): {'met' if report['target_met'] else 'NOT met'}")
    if report.get("endpoint_vs_offline") is not None:
        lines.append(
            f"- endpoint vs offline: {report['endpoint_vs_offline']:.0%} of the in-process model's "
            f"batch-8 throughput (target: {report['endpoint_target']}): "
            f"{'met' if report['endpoint_target_met'] else 'NOT met'}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: a tiny random checkpoint")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=600, help="answers per row (at most)")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds per row (at most)")
    parser.add_argument("--warmup", type=int, default=48)
    parser.add_argument("--replicas", default="1,2", help="replica counts to run (1, 2 or 1,2)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--format", default="PNG", choices=["PNG", "JPEG", "BMP", "TIFF"])
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.duration <= 0 or args.concurrency < 1:
        parser.error("--requests, --duration and --concurrency must be positive")
    try:  # checked before Ray starts, and parsed once
        args.configs = _configs(args.replicas)
    except ValueError as err:
        parser.error(str(err))
    report = run(args)
    table = markdown(report)
    print(table)
    write_results("serve", report, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
