"""Shared helpers for the benchmarks: the machine they ran on, `--out`, and result writing.

Every benchmark writes `<out>/<name>.json` (with the machine) and `<out>/<name>.md` (a table
under a one-line machine header) through `write_results`, so `run_all.py` can send a smoke run
(`--quick`) somewhere else than the published results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine(**extra: Any) -> dict[str, Any]:
    """What a figure depends on: CPU, memory, GPU, library versions, and how busy the host was."""
    import open_clip
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        # other jobs on a shared machine colour every figure: say how busy it was
        "load_average_at_start": (
            [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        ),
    }
    try:
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {**info, **extra}


def machine_line(m: dict[str, Any]) -> str:
    """The machine in one Markdown line, as every results table is headed."""
    line = (
        f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} CPUs"
        f"{', ' + str(m['memory_gib']) + ' GiB' if 'memory_gib' in m else ''}, "
        f"GPU: {m['cuda'] or 'none'}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), open_clip {m['open_clip']}"
        f"{', Ray ' + m['ray'] if m.get('ray') else ''}; load average at start "
        f"{m['load_average_at_start']}"
    )
    if m.get("load_average_at_end"):
        line += f", at end {m['load_average_at_end']}"
    return line + f"; {m['date']}."


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"folder for <name>.json and <name>.md (default: {RESULTS})",
    )


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        help="torch intra-op threads of this process (default: "
        + ("torch's own" if default is None else str(default))
        + "); `run_all.py` sets it for every benchmark",
    )


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads before any work, so the machine line says what ran."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def write_results(name: str, payload: dict[str, Any], markdown: str, out: Path = RESULTS) -> Path:
    """Write `<out>/<name>.json` and `.md`; the payload's own "machine" keys extend the common
    description (measured at the end if the payload has none, so call this right after the run
    or measure `machine()` at the start and pass it in)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    described = payload.get("machine")
    payload = {**payload, "machine": described if described else machine()}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    path = out / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n\n" + machine_line(payload["machine"]) + "\n")
    print(f"wrote {out / (name + '.json')} and {path}")
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
