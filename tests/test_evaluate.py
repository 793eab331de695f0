"""Evaluation: stored outputs re-score any (λ, k) exactly as a fresh run does; reports, tables
and overlays are written; the CLI reports user errors in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from larp import LaRPCLIP, LaRPConfig, save_checkpoint
from larp.cache import FeatureCache
from larp.cli import main
from larp.evaluate import StoredOutputs, evaluate, rescore

DATA = "synthetic:target?n=2&n_train=1"


@pytest.fixture(scope="module")
def model() -> LaRPCLIP:
    torch.manual_seed(3)
    net = LaRPCLIP(LaRPConfig.tiny_random())
    with torch.no_grad():  # make the head non-trivial so λ and k matter
        net.refiner.conv2.weight.normal_(0, 0.1)
        net.fusion.alpha.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3]))
    return net.eval()


@pytest.fixture(scope="module")
def report(model):
    return evaluate(model, DATA, progress=False)


@pytest.mark.parametrize(("lam", "top_k"), [(0.0, 1), (2.0, 3), (4.0, 50)])
def test_rescoring_matches_a_fresh_run(model, report, lam, top_k):
    fresh = evaluate(model, DATA, lam=lam, top_k=top_k, progress=False)
    again = rescore(report.outputs, lam, top_k)
    for name, row in fresh.rows.items():
        for key, value in row.items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(again.rows[name][key])
            else:
                assert again.rows[name][key] == pytest.approx(value, abs=1e-9), (name, key)
    assert again.threshold == pytest.approx(fresh.threshold, abs=1e-9)


def test_lam_and_k_change_image_scores_not_pixel_metrics(report):
    a, b = rescore(report.outputs, 0.0, 1), rescore(report.outputs, 4.0, 8)
    assert not torch.equal(report.outputs.scores(0.0, 1), report.outputs.scores(4.0, 8))
    assert a.rows["mean"]["pixel_auroc"] == b.rows["mean"]["pixel_auroc"]


def test_cached_evaluation_agrees(model, report, tmp_path):
    cached = evaluate(model, DATA, cache=FeatureCache(model.backbone, tmp_path), progress=False)
    for key, value in report.mean_metrics().items():
        assert cached.mean_metrics()[key] == pytest.approx(value, abs=0.02), key


def test_report_files_round_trip(report, tmp_path):
    report.write(tmp_path, overlays=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resolution"] == "112x112"
    assert set(metrics["per_class"]) == set(report.rows)
    assert (tmp_path / "per_class.md").read_text().count("\n") >= len(report.rows) + 2
    overlays = list((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == len(report.rows) - 1  # one per class
    stored = StoredOutputs.load(tmp_path / "outputs")
    torch.testing.assert_close(stored.scores(1.0, 4), report.outputs.scores(1.0, 4))
    assert stored.paths == report.outputs.paths


def test_cli_eval_rescore_predict(model, tmp_path, capsys):
    ckpt = save_checkpoint(model, tmp_path / "ckpt", threshold=0.5)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", DATA, "--out",
                 str(tmp_path / "ev"), "--quiet", "--overlays", "0", "--no-cache"]) == 0  # fmt: skip
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert main(["rescore", "--outputs", str(tmp_path / "ev" / "outputs"), "--lam", "2",
                 "--top-k", "3"]) == 0  # fmt: skip
    assert "λ=2.0 top-k=3" in capsys.readouterr().out
    image = StoredOutputs.load(tmp_path / "ev" / "outputs").paths[0]
    assert main(["predict", "--checkpoint", str(ckpt), image, image, "--out",
                 str(tmp_path / "pr")]) == 0  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and lines[0]["score"] == pytest.approx(lines[1]["score"])
    assert lines[0]["label"] == ("anomalous" if lines[0]["score"] >= 0.5 else "normal")
    assert len(list((tmp_path / "pr").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--checkpoint", "/no/such/ckpt", "--data", DATA], "checkpoint not found"),
        (["eval", "--checkpoint", "x", "--data", "mvtec:/no/such"], "does not exist"),
        (["eval", "--checkpoint", "x", "--data", "nope:/x"], "valid kinds"),
        (["predict", "--checkpoint", "x", "/no/image.png"], "image not found"),
        (["rescore", "--outputs", "/no/outputs", "--lam", "1", "--top-k", "2"], "no stored"),
        (["train", "--config", "/no/config.yaml"], "config file not found"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_cli_rejects_bad_numbers():
    with pytest.raises(SystemExit):
        main(["rescore", "--outputs", "x", "--lam", "-1", "--top-k", "2"])
