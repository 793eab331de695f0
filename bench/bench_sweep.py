"""Cost of the full default grid (3 partitions x 5 λ x 5 top-k = 75 configurations) against one
plain training run without the feature cache, side by side in one run.

    python bench/bench_sweep.py [--epochs 15] [--with-ray]

The grid trains once per partition from the shared cache, evaluates once per partition, and
scores the 25 (λ, k) of each partition from stored outputs; the naive way retrains and
re-evaluates per configuration (75 plain runs). Target (issue 6): grid <= 2x one plain run.
`--with-ray` adds the wall time of the real `run_sweep` (Ray Tune + Ray Train + MLflow).
"""

from __future__ import annotations

import argparse
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

from larp.evaluate import evaluate, rescore  # noqa: E402
from larp.sweep import SweepConfig  # noqa: E402
from larp.trainer import TrainConfig, Trainer  # noqa: E402


def train_and_eval(model_config, epochs: int, use_cache: bool, cache_dir: str):
    config = TrainConfig(
        eval_data=None, epochs=epochs, use_cache=use_cache, cache_dir=cache_dir, progress=False
    )
    trainer = Trainer(model_config, config)
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    return evaluate(trainer.model, "synthetic:target", cache=trainer.cache, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--with-ray", action="store_true")
    add_out_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    described = machine()
    sweep = SweepConfig()
    base = sweep.base_model()
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        train_and_eval(base, args.epochs, False, cache_dir)
        plain = time.perf_counter() - start
        print(f"plain run (no cache): {plain:.1f}s", flush=True)

        start = time.perf_counter()
        scored = 0
        rescore_time = 0.0
        for changes in sweep.variants().values():
            report = train_and_eval(base.replace(**changes), args.epochs, True, cache_dir)
            t0 = time.perf_counter()
            for lam in sweep.lams:
                for top_k in sweep.top_ks:
                    rescore(report.outputs, lam, top_k)
                    scored += 1
            rescore_time += time.perf_counter() - t0
        grid = time.perf_counter() - start
        print(f"grid ({scored} configurations): {grid:.1f}s", flush=True)
    rows = [
        ["one plain training + evaluation (no cache)", 1, f"{plain:.1f}", "1.00"],
        [f"full grid, LaRP way ({len(sweep.variants())} trainings)", scored, f"{grid:.1f}",
         f"{grid / plain:.2f}"],
        ["  of which 75 re-scorings from stored outputs", scored, f"{rescore_time:.2f}",
         f"{rescore_time / plain:.3f}"],
        ["full grid, naive (retrain per configuration, estimated)", scored,
         f"{scored * plain:.0f}", f"{scored:.0f}"],
    ]  # fmt: skip
    results = {
        "machine": described,
        "epochs": args.epochs,
        "plain_s": plain,
        "grid_s": grid,
        "rescore_s": rescore_time,
    }
    if args.with_ray:
        from larp.sweep import run_sweep

        with tempfile.TemporaryDirectory() as folder:
            real = SweepConfig(
                storage_path=f"{folder}/runs",
                tracking_uri=f"sqlite:///{folder}/mlflow.db",
                train={"epochs": args.epochs, "cache_dir": f"{folder}/cache"},
            )
            start = time.perf_counter()
            run_sweep(real)
            wall = time.perf_counter() - start
        results["run_sweep_s"] = wall
        rows.append(
            ["`run_sweep` (Ray Tune + Train + MLflow, cold cache)", scored, f"{wall:.1f}",
             f"{wall / plain:.2f}"]
        )  # fmt: skip
    md = "## Sweep cost: 75 configurations vs one plain training run\n\n" + table(
        ["what", "configurations", "seconds", "x one plain run"], rows
    )
    path = write_results("sweep", results, md, args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
