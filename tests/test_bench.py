"""The benchmark entry point: every benchmark runs, writes its figures with the machine, and a
smoke run never touches the published results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402


def test_write_results_keeps_the_payload_machine_and_heads_the_table(tmp_path: Path) -> None:
    described = common.machine(ray="9.9", load_average_at_end=[1.0, 2.0, 3.0])
    path = common.write_results("x", {"machine": described, "figure": 3}, "| a |\n", tmp_path)
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["figure"] == 3 and data["machine"]["ray"] == "9.9"
    text = path.read_text()
    assert text.startswith("| a |\n\nMachine: ")
    assert "Ray 9.9" in text and "at end [1.0, 2.0, 3.0]" in text
    assert f"{described['cpu_count']} CPUs" in text


def test_write_results_describes_the_machine_when_the_payload_does_not(tmp_path: Path) -> None:
    common.write_results("y", {"figure": 1}, "t", tmp_path)
    data = json.loads((tmp_path / "y.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1


def test_run_all_names_unknown_benchmarks() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "model,nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~6 min on an idle 2-core host; CI hosts have run 40 % slower
def test_quick_run_of_every_benchmark(tmp_path: Path) -> None:
    published = {p: p.stat().st_mtime_ns for p in common.RESULTS.glob("*.*")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "SUMMARY.md").read_text()
    payload = json.loads((tmp_path / "summary.json").read_text())
    for name in run_all.BENCHES:
        assert payload["runs"][name]["exit"] == 0
        assert payload[name]["machine"]["cpu_count"] >= 1, name
        assert f"# {name}\n" in summary
        assert "Machine: " in (tmp_path / f"{name}.md").read_text(), name
    # the published figures are left as they were
    assert {p: p.stat().st_mtime_ns for p in common.RESULTS.glob("*.*")} == published
