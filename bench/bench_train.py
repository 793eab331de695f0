"""Training cost with and without the frozen-feature cache, and 1 vs 2 Ray Train workers.

    python bench/bench_train.py [--epochs 15] [--backbones tiny,vitb16] [--skip-ray]

Target (issue 4): with the cache, epochs after the first cost under 10% of an uncached epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_out_argument,
    add_threads_argument,
    machine,
    set_threads,
    table,
    write_results,
)

from larp import LaRPConfig  # noqa: E402
from larp.trainer import TrainConfig, Trainer  # noqa: E402

BACKBONES = {
    "tiny": (LaRPConfig.tiny, "synthetic:source"),
    "vitb16": (
        lambda: LaRPConfig(
            backbone="ViT-B-16",
            pretrained=None,
            image_size=224,
            feature_layers=(3, 6, 9, 12),
            shallow_layers=(3, 6),
            vv_from_layer=3,
        ),
        "synthetic:source?n=4",
    ),
}


def epoch_times(model_config, data: str, epochs: int, use_cache: bool, cache_dir: str) -> list:
    config = TrainConfig(
        train_data=data,
        eval_data=None,
        epochs=epochs,
        use_cache=use_cache,
        cache_dir=cache_dir,
        progress=False,
    )
    trainer = Trainer(model_config, config)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        times.append(time.perf_counter() - start)
    return times


def ray_scaling(epochs: int, cache_dir: str) -> list[dict]:
    from larp.train import launch

    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for workers in (1, 2):
            config = TrainConfig(
                eval_data=None,
                epochs=epochs,
                num_workers=workers,
                storage_path=storage,
                name=f"scale-{workers}",
                cache_dir=cache_dir,
                progress=False,
            )
            start = time.perf_counter()
            result = launch(LaRPConfig.tiny_random(), config)
            wall = time.perf_counter() - start
            folder = Path(storage) / f"scale-{workers}"
            seconds = [
                json.loads(p.read_text())["metrics"]["epoch_seconds"]
                for p in folder.glob("checkpoint_*/model/manifest.json")
            ]
            rows.append(
                {
                    "workers": workers,
                    "wall_s": wall,
                    "epoch_s_median": statistics.median(seconds),
                    "error": str(result.error) if result.error else None,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--backbones", default="tiny,vitb16")
    parser.add_argument("--vitb16-epochs", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    add_out_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    results = {"machine": machine(), "cache": {}, "ray": None}
    rows = []
    for name in args.backbones.split(","):
        build, data = BACKBONES[name]
        epochs = args.epochs if name == "tiny" else args.vitb16_epochs
        with tempfile.TemporaryDirectory() as cache_dir:
            cached = epoch_times(build(), data, epochs, True, cache_dir)
            plain = epoch_times(build(), data, epochs, False, cache_dir)
        later = statistics.mean(cached[1:])
        uncached = statistics.mean(plain)
        results["cache"][name] = {"cached": cached, "uncached": plain, "ratio": later / uncached}
        rows.append(
            [
                name,
                epochs,
                f"{sum(plain):.1f}",
                f"{sum(cached):.1f}",
                f"{uncached:.3f}",
                f"{cached[0]:.3f}",
                f"{later:.3f}",
                f"{100 * later / uncached:.1f}%",
            ]
        )
        print(rows[-1], flush=True)
    md = "## Training with and without the frozen-feature cache\n\n" + table(
        [
            "backbone",
            "epochs",
            "uncached total s",
            "cached total s",
            "uncached s/epoch",
            "cached 1st epoch s (fills)",
            "cached later s/epoch",
            "later / uncached",
        ],
        rows,
    )
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as cache_dir:
            results["ray"] = ray_scaling(args.epochs, cache_dir)
        md += "\n\n## Ray Train scaling (tiny, cached, CPU)\n\n" + table(
            ["workers", "wall s (incl. Ray start-up)", "median s/epoch"],
            [
                [r["workers"], f"{r['wall_s']:.1f}", f"{r['epoch_s_median']:.3f}"]
                for r in results["ray"]
            ],
        )
    path = write_results("train", results, md, args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
