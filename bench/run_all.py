"""One entry point for every benchmark of the project.

    python bench/run_all.py [--only model,metrics,train,sweep,serve,demo,gpu] [--quick]

Runs each benchmark script in its own process (so one's threads and memory don't colour the
next), then joins their `bench/results/<name>.md` tables into `bench/results/SUMMARY.md` and
their JSON into `bench/results/summary.json`, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# name -> (script, full args, quick args)
BENCHES = {
    "model": ("bench_model.py", [], ["--repeats", "3"]),
    "metrics": ("bench_metrics.py", [], ["--n-maps", "200", "--size", "256"]),
    "train": ("bench_train.py", [], ["--epochs", "5", "--skip-ray", "--backbones", "tiny"]),
    "sweep": ("bench_sweep.py", [], ["--epochs", "3"]),
    "serve": ("bench_serve.py", [], []),
    "demo": ("bench_demo.py", [], ["--seeds", "0", "--epochs", "3", "--eval-n", "24"]),
    # without CUDA the full run only records that there was no GPU; --quick smoke-runs it on CPU
    "gpu": ("bench_gpu.py", [], ["--device", "cpu", "--config", "tiny", "--batches", "1,4"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {sorted(BENCHES)}")
    status = {}
    for name in names:
        script, full, quick = BENCHES[name]
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        status[name] = {"exit": code, "seconds": round(time.perf_counter() - start, 1)}
    sections, payload = [], {"runs": status}
    for name in names:
        md, js = RESULTS / f"{name}.md", RESULTS / f"{name}.json"
        if md.is_file():
            sections.append(f"# {name}\n\n{md.read_text().strip()}\n")
        if js.is_file():
            payload[name] = json.loads(js.read_text())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "SUMMARY.md").write_text("\n".join(sections))
    (RESULTS / "summary.json").write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps(status, indent=2))
    return 0 if all(s["exit"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
