"""`larp train | eval | rescore | predict`: the pieces of the sweep, one at a time.

Every user mistake (bad flag, config, dataset, checkpoint, image) ends in one line `error: ...`
and exit status 2, before any expensive work (Ray, model loading) starts where possible.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from larp.config import PRECISION_CHOICES, TINY_TRAIN_DEFAULTS, LaRPConfig, load_yaml_mapping
from larp.data import DatasetError
from larp.errors import ConfigError, LaRPError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


PRECISION_HELP = "backbone precision (auto: bf16 on CUDA, fp32 on CPU; the head stays fp32)"
COMPILE_HELP = "torch.compile the vision pass (GPU; the first batch of each size compiles)"


def _load_for_inference(args: argparse.Namespace):
    """The checkpoint's model, with the vision pass compiled when asked."""
    from larp.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    if args.compile:
        model.backbone.compile_vision()
    return model


def load_run_config(path: str | None) -> tuple[LaRPConfig, dict[str, Any]]:
    """A YAML file with optional `model:` (LaRPConfig keys) and `train:` (TrainConfig keys)
    sections; with neither section the whole file is the model config."""
    if path is None:
        return LaRPConfig.tiny(), dict(TINY_TRAIN_DEFAULTS)
    data = load_yaml_mapping(path)
    if "model" in data or "train" in data:
        extra = sorted(set(data) - {"model", "train"})
        if extra:
            raise ConfigError(f"{path}: unknown sections {extra}; use 'model' and 'train'")
        train = dict(data.get("train") or {})
        if data.get("model"):
            return LaRPConfig.from_dict(data["model"]), train
        return LaRPConfig.tiny(), {**TINY_TRAIN_DEFAULTS, **train}
    return LaRPConfig.from_dict(data), {}


# ---------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from larp.trainer import TrainConfig

    model_config, train_overrides = load_run_config(args.config)
    flags = {
        "train_data": args.train_data,
        "eval_data": None if args.eval_data == "none" else args.eval_data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "num_workers": args.num_workers,
        "use_gpu": args.use_gpu or None,
        "storage_path": args.storage_path,
        "name": args.name,
        "max_failures": args.max_failures,
        "use_cache": False if args.no_cache else None,
        "cache_dir": args.cache_dir,
        "progress": False if args.quiet else None,
    }
    values = dict(train_overrides)
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.eval_data == "none":
        values["eval_data"] = None
    train_config = TrainConfig.from_dict(values)
    from larp.train import launch

    result = launch(
        model_config,
        train_config,
        ray_address=args.ray_address,
        shared_storage=args.shared_storage,
    )
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = str(Path(result.checkpoint.path) / "model")
    print(json.dumps({"metrics": summary, "checkpoint": checkpoint}, indent=2))
    return 0


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from larp.cache import FeatureCache
    from larp.data import read_records
    from larp.evaluate import evaluate

    records = read_records(args.data, skip_bad=args.skip_bad)
    model = _load_for_inference(args)
    cache = None if args.no_cache else FeatureCache(model.backbone, args.cache_dir)
    report = evaluate(
        model,
        records,
        lam=args.lam,
        top_k=args.top_k,
        cache=cache,
        batch_size=args.batch_size,
        progress=not args.quiet,
        precision=args.precision,
        loader_workers=args.loader_workers,
    )
    _print_report(report)
    if args.out:
        report.write(args.out, overlays=args.overlays)
        print(f"wrote {args.out}/metrics.json, per_class.csv/.md, outputs/, overlays/")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from larp.evaluate import StoredOutputs, rescore

    outputs = StoredOutputs.load(Path(args.outputs))
    report = rescore(outputs, args.lam, args.top_k)
    _print_report(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "metrics.json").write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _print_report(report) -> None:
    from larp.metrics import format_table_markdown

    print(format_table_markdown(report.rows, resolution=report.resolution))
    print(f"λ={report.lam} top-k={report.top_k} decision threshold={report.threshold:.4f}")


# ---------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from larp.data import denormalize, load_image
    from larp.visualize import overlay_panel

    for image in args.images:
        if not Path(image).is_file():
            raise ConfigError(f"image not found: {image}")
    model = _load_for_inference(args)
    threshold = model.manifest.get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    size = model.config.image_size
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.images:
        tensor = load_image(path, size)
        result = model.predict(
            tensor.unsqueeze(0), lam=args.lam, top_k=args.top_k, precision=args.precision
        )
        score = float(result.score[0])
        row = {
            "image": path,
            "score": score,
            "label": "anomalous" if score >= threshold else "normal",
            "threshold": threshold,
            "text_score": float(result.text_score[0]),
            "map_score": float(result.map_score[0]),
        }
        if out:
            rgb = denormalize(tensor).permute(1, 2, 0).clamp(0, 1).numpy()
            panel = overlay_panel((rgb * 255).round().astype(np.uint8), result.anomaly_map[0])
            original = Image.open(path)
            target = out / f"{len(rows):03d}_{Path(path).stem}_heatmap.png"
            panel.save(target)
            row["heatmap"] = str(target)
            row["width"], row["height"] = original.size
        rows.append(row)
        print(json.dumps(row))
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="larp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train LaRP-CLIP on Ray Train")
    train.add_argument("--train-data", default=None, help="dataset spec (default synthetic:source)")
    train.add_argument(
        "--eval-data", default=None, help="dataset spec or 'none' (default synthetic:target)"
    )
    train.add_argument("--config", help="YAML with 'model:' and/or 'train:' sections")
    train.add_argument("--epochs", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--num-workers", type=_positive_int)
    train.add_argument("--use-gpu", action="store_true")
    train.add_argument("--storage-path", help="local, NFS or s3:// path for checkpoints")
    train.add_argument(
        "--shared-storage",
        action="store_true",
        help="a local --storage-path is on a mount every Ray node shares (NFS/EFS)",
    )
    train.add_argument("--name", help="run name; re-running a name continues it")
    train.add_argument("--max-failures", type=int)
    train.add_argument("--no-cache", action="store_true", help="skip the frozen-feature cache")
    train.add_argument("--cache-dir")
    train.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a dataset")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="dataset spec, e.g. mvtec:/data/mvtec")
    ev.add_argument("--lam", type=_non_negative_float)
    ev.add_argument("--top-k", type=_positive_int)
    ev.add_argument("--out", help="folder for metrics, tables, outputs and overlays")
    ev.add_argument("--overlays", type=int, default=8, help="heat-map PNGs per class")
    ev.add_argument("--batch-size", type=_positive_int, default=8)
    ev.add_argument("--no-cache", action="store_true")
    ev.add_argument("--cache-dir")
    ev.add_argument("--skip-bad", action="store_true", help="skip unreadable files (warns)")
    ev.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)
    ev.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ev.add_argument("--loader-workers", type=int, default=0, help="parallel image decoding")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    rs = sub.add_parser("rescore", help="score stored eval outputs at another λ / top-k")
    rs.add_argument("--outputs", required=True, help="the outputs/ folder written by larp eval")
    rs.add_argument("--lam", type=_non_negative_float, required=True)
    rs.add_argument("--top-k", type=_positive_int, required=True)
    rs.add_argument("--out")
    rs.set_defaults(func=cmd_rescore)

    pr = sub.add_parser("predict", help="score images and write heat maps")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", help="folder for heat-map PNGs")
    pr.add_argument("--lam", type=_non_negative_float)
    pr.add_argument("--top-k", type=_positive_int)
    pr.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)
    pr.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    pr.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LaRPError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
