"""One entry point for every benchmark of the project.

    python bench/run_all.py [--only model,metrics,train,sweep,serve,demo,gpu] [--quick]

Runs each benchmark script in its own process (so one's threads and memory don't colour the
next), then joins their `<name>.md` tables into `SUMMARY.md` and their JSON into
`summary.json`, each with the machine it ran on. A full run writes into `bench/results/` (the
published figures); `--quick` writes into `bench/results/quick/`, so a smoke run never
overwrites them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from common import RESULTS  # noqa: E402

QUICK_RESULTS = RESULTS / "quick"

# name -> (script, full args, quick args)
BENCHES = {
    "model": ("bench_model.py", [], ["--configs", "tiny", "--repeats", "3"]),
    "metrics": ("bench_metrics.py", [], ["--n-maps", "100", "--size", "256", "--naive-maps", "20"]),
    "train": ("bench_train.py", [], ["--epochs", "5", "--skip-ray", "--backbones", "tiny"]),
    "sweep": ("bench_sweep.py", ["--with-ray"], ["--epochs", "3"]),
    "serve": (
        "bench_serve.py",
        [],
        ["--requests", "60", "--duration", "3", "--warmup", "8", "--replicas", "1"],
    ),
    "demo": ("bench_demo.py", [], ["--seeds", "0", "--epochs", "3", "--eval-n", "24"]),
    # without CUDA the full run only records that there was no GPU; --quick smoke-runs it on CPU
    "gpu": ("bench_gpu.py", [], ["--device", "cpu", "--config", "tiny", "--batches", "1,4"]),
}


# the benchmarks whose own process does the measured torch work (Ray workers and Serve replicas
# get their threads from Ray; bench_serve sets its in-process share itself)
THREADED = ("model", "train", "sweep", "demo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each benchmark process (default 1, as the published CPU figures "
        "were taken, so a rerun compares like with like)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results folder (default: {RESULTS}, or {QUICK_RESULTS} with --quick)",
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {sorted(BENCHES)}")
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    status = {}
    for name in names:
        script, full, quick = BENCHES[name]
        extra = quick if args.quick else full
        command = [sys.executable, str(HERE / script), *extra, "--out", str(out)]
        if name in THREADED:
            command += ["--threads", str(args.threads)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        status[name] = {"exit": code, "seconds": round(time.perf_counter() - start, 1)}
    sections, payload = [], {"runs": status}
    # the summary joins every benchmark's latest results in `out`, not only this run's, so
    # `--only` refreshes some tables without dropping the others
    for name in BENCHES:
        md, js = out / f"{name}.md", out / f"{name}.json"
        if md.is_file():
            sections.append(f"# {name}\n\n{md.read_text().strip()}\n")
        if js.is_file():
            payload[name] = json.loads(js.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "SUMMARY.md").write_text("\n".join(sections))
    (out / "summary.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out / 'SUMMARY.md'} and {out / 'summary.json'}")
    print(json.dumps(status, indent=2))
    return 0 if all(s["exit"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
