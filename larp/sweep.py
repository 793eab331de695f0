"""The sweep behind `python tune/sweep.py`: Ray Tune over training variants (layer partitions,
Table 6; or the Table 4 ablations), each trial a Ray Train `TorchTrainer`, every (λ, top-k)
scored from the trial's stored evaluation outputs (Table 5) — never retrained — and logged to
MLflow; the best run becomes the champion checkpoint that `serve` loads.

Ray and MLflow are imported inside functions: `import larp` stays free of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from larp.config import TINY_TRAIN_DEFAULTS, LaRPConfig, dataclass_from_dict, load_yaml_mapping
from larp.data import DatasetError
from larp.errors import ConfigError, LaRPError

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
SEARCHES = ("grid", "random", "optuna")
MODES = ("partition", "ablation")
PRESETS = {"tiny": LaRPConfig.tiny, "tiny-random": LaRPConfig.tiny_random, "default": LaRPConfig}
# training defaults of a preset, under whatever `train` gives
PRESET_TRAIN = {"tiny": TINY_TRAIN_DEFAULTS, "tiny-random": TINY_TRAIN_DEFAULTS}
# Table 4, cumulative: the AnomalyCLIP baseline, then each LaRP component switched on in turn.
ABLATIONS = {
    "anomalyclip": dict(
        decouple_prompts=False, adaptive_fusion=False, refiner=False, prototype=False
    ),
    "+decouple": dict(decouple_prompts=True, adaptive_fusion=False, refiner=False, prototype=False),
    "+fusion": dict(decouple_prompts=True, adaptive_fusion=True, refiner=False, prototype=False),
    "+refiner": dict(decouple_prompts=True, adaptive_fusion=True, refiner=True, prototype=False),
    "larp": dict(decouple_prompts=True, adaptive_fusion=True, refiner=True, prototype=True),
}


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; from flags, a YAML file, or the embedded default."""

    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    mode: str = "partition"
    partitions: list | None = None
    lams: list = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    top_ks: list = field(default_factory=lambda: [1, 4, 8, 16, 32])
    search: str = "grid"
    num_samples: int = 1
    max_concurrent: int = 2
    metric: str = "pixel_auroc"
    name: str = "sweep"
    experiment: str = "larp"
    storage_path: str = "larp_runs"
    tracking_uri: str = "sqlite:///mlflow.db"
    ray_address: str | None = None
    shared_storage: bool = False  # a local storage_path is on a mount every node shares
    trial_cpus: float = 0.01
    resume: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        return dataclass_from_dict(cls, data, "sweep")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived, validated
    def base_model(self) -> LaRPConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        return PRESETS[self.preset](**self.model)

    def train_config(self):
        from larp.trainer import TrainConfig

        values = {**PRESET_TRAIN.get(self.preset, {}), **self.train}
        values.setdefault("progress", False)
        # the trial itself holds trial_cpus while it waits for its workers: leave them room
        values.setdefault("cpus_per_worker", 1.0 - self.trial_cpus)
        values.setdefault("storage_path", self.storage_path)
        return TrainConfig.from_dict(values)

    def variants(self) -> dict[str, dict[str, Any]]:
        """Training variant key -> LaRPConfig changes; each becomes one Tune trial."""
        base = self.base_model()
        if self.mode == "ablation":
            return {key: dict(changes) for key, changes in ABLATIONS.items()}
        partitions = self.partitions
        if partitions is None:
            layers = list(base.feature_layers)
            partitions = [layers[:i] for i in range(1, len(layers))]
        out = {}
        for shallow in partitions:
            shallow = [int(x) for x in shallow]
            out["shallow=" + "-".join(map(str, shallow))] = {"shallow_layers": shallow}
        return out

    def tracking_uri_absolute(self) -> str:
        """sqlite/file URIs made absolute: Ray runs trials in other working directories."""
        uri = self.tracking_uri
        for prefix in ("sqlite:///", "file://"):
            if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
                return prefix + str(Path(uri[len(prefix) :]).resolve())
        if "://" not in uri:
            return str(Path(uri).resolve())
        return uri

    def validate(self) -> None:
        """Every check that can fail, before Ray or any trial starts."""
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("num_samples and max_concurrent must be >= 1")
        if not self.lams or any(float(v) < 0 for v in self.lams):
            raise ConfigError(f"lams must be a non-empty list of values >= 0, got {self.lams}")
        if not self.top_ks or any(int(v) < 1 for v in self.top_ks):
            raise ConfigError(f"top_ks must be a non-empty list of values >= 1, got {self.top_ks}")
        if not self.trial_cpus > 0:
            raise ConfigError("trial_cpus must be > 0 (Ray needs a non-empty trial bundle)")
        base = self.base_model()
        for key, changes in self.variants().items():
            try:
                base.replace(**changes)
            except ConfigError as exc:
                raise ConfigError(f"variant {key}: {exc}") from exc
        train = self.train_config()
        from larp.train import check_data

        check_data(train)
        if train.eval_data is None:
            raise ConfigError("a sweep needs eval_data: it ranks runs by evaluation metrics")


# ---------------------------------------------------------------------- one trial
def run_trial(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: train one variant on Ray Train, evaluate it once, score every
    (λ, k) from the stored outputs, log all of it to MLflow."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from larp import tracking
    from larp.cache import FeatureCache
    from larp.checkpoint import load_checkpoint
    from larp.evaluate import evaluate
    from larp.train import build_trainer

    sweep = SweepConfig.from_dict(trial_config["sweep"])
    variant = trial_config["variant"]
    changes = sweep.variants()[variant]
    model_config = sweep.base_model().replace(**changes)
    uri, exp_id = trial_config["tracking_uri"], trial_config["experiment_id"]
    train_config = sweep.train_config().replace(
        name=f"{sweep.name}-{_slug(variant)}", storage_path=trial_config["storage"]
    )
    parent, _ = tracking.get_or_create_run(uri, exp_id, sweep.name, variant, "train", variant)
    try:
        tracking.log_params(
            uri,
            parent,
            {
                "variant": variant,
                **{f"model.{k}": v for k, v in model_config.to_dict().items()},
                **{f"train.{k}": v for k, v in train_config.to_dict().items()},
            },
        )
        trainer = build_trainer(
            model_config,
            train_config,
            callbacks=[TuneReportCallback()],
            tracking={"uri": uri, "run_id": parent},
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"training of {variant} failed: {result.error}")
        model = load_checkpoint(Path(result.checkpoint.path) / "model")
        cache = FeatureCache(model.backbone, train_config.cache_dir)
        report = evaluate(model, train_config.eval_data, cache=cache, progress=False)
        with tempfile.TemporaryDirectory() as folder:
            report.write(Path(folder) / "evaluation", overlays=4)
            tracking.log_artifacts(uri, parent, Path(folder) / "evaluation", "evaluation")
            tracking.log_artifacts(
                uri, parent, Path(result.checkpoint.path) / "model", "checkpoint"
            )
        best = _score_grid(sweep, variant, model_config, report.outputs, uri, exp_id, parent)
        tracking.end_run(uri, parent, "FINISHED")
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    tune.report({**best, "done": True})


def _score_grid(sweep, variant, model_config, outputs, uri, exp_id, parent) -> dict[str, Any]:
    """One MLflow child run per (λ, k), scored from stored outputs (no training, no forward)."""
    from larp import tracking
    from larp.evaluate import rescore
    from larp.metrics import format_table_markdown

    best: dict[str, Any] = {}
    for lam in sweep.lams:
        for top_k in sweep.top_ks:
            report = rescore(outputs, float(lam), int(top_k))
            metrics = report.mean_metrics()
            key = f"{variant}|lam={float(lam)}|k={int(top_k)}"
            run_id, finished = tracking.get_or_create_run(
                uri, exp_id, sweep.name, key, "score", key, parent_id=parent
            )
            if not finished:
                tracking.log_params(
                    uri,
                    run_id,
                    {
                        "variant": variant,
                        "shallow_layers": list(model_config.shallow_layers),
                        "lam": float(lam),
                        "top_k": int(top_k),
                        "trained": False,
                        "threshold": report.threshold,
                    },
                )
                tracking.log_metrics(uri, run_id, metrics)
                with tempfile.TemporaryDirectory() as folder:
                    table = Path(folder) / "per_class.md"
                    table.write_text(
                        format_table_markdown(report.rows, resolution=report.resolution)
                    )
                    (Path(folder) / "per_class.json").write_text(
                        json.dumps(_finite(report.rows), indent=1)
                    )
                    tracking.log_artifacts(uri, run_id, folder, "table")
                tracking.end_run(uri, run_id, "FINISHED")
            value = metrics.get(sweep.metric, math.nan)
            if not best or _better(value, best[sweep.metric]):
                best = {**metrics, "lam": float(lam), "top_k": int(top_k), "score_run": run_id}
    return best


def _better(a: float, b: float) -> bool:
    return not math.isnan(a) and (math.isnan(b) or a > b)


def _finite(rows: dict) -> dict:
    return {
        name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for name, row in rows.items()
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


# ---------------------------------------------------------------------- the sweep
def run_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """Validate, run the Tune experiment, close runs, pick and register the champion."""
    sweep.validate()
    from ray import tune

    from larp import tracking
    from larp.cluster import check_cluster, worker_needs
    from larp.train import ensure_ray, storage_uri

    uri = sweep.tracking_uri_absolute()
    storage = storage_uri(sweep.storage_path)
    experiment_dir = f"{storage.rstrip('/')}/{sweep.name}"
    local = "://" not in storage
    if local and Path(experiment_dir).exists() and not sweep.resume:
        raise ConfigError(
            f"sweep {sweep.name!r} already exists in {storage}; pass --resume to continue it "
            "or --name to start another"
        )
    ensure_ray(sweep.ray_address)
    # on a multi-node cluster: shared storage and a tracking store every node reaches
    check_cluster(
        storage, uri, shared=sweep.shared_storage, needs=worker_needs(sweep.train_config())
    )
    exp_id = tracking.experiment_id(uri, sweep.experiment)
    trainable = tune.with_resources(run_trial, {"cpu": sweep.trial_cpus})
    if sweep.resume and tune.Tuner.can_restore(experiment_dir):
        tuner = tune.Tuner.restore(experiment_dir, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep, uri, exp_id, storage),
            tune_config=_tune_config(sweep),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=1),
        )
    results = tuner.fit()
    tracking.close_dangling_runs(uri, exp_id, sweep.name)
    errors = [r.error for r in results if r.error is not None]
    summary = summarise(sweep, uri, exp_id)
    summary["failed_trials"] = len(errors)
    if summary.get("best"):
        summary["champion"] = crown_champion(sweep, uri, summary["best"])
    return summary


def _param_space(sweep: SweepConfig, uri: str, exp_id: str, storage: str) -> dict[str, Any]:
    from ray import tune

    keys = list(sweep.variants())
    choice = tune.grid_search(keys) if sweep.search == "grid" else tune.choice(keys)
    return {
        "variant": choice,
        "sweep": sweep.to_dict(),
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "storage": storage,
    }


def _tune_config(sweep: SweepConfig):
    from ray import tune

    search_alg = None
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.TuneConfig(
        metric=sweep.metric,
        mode="max",
        search_alg=search_alg,
        num_samples=sweep.num_samples,
        max_concurrent_trials=sweep.max_concurrent,
    )


def summarise(sweep: SweepConfig, uri: str, exp_id: str) -> dict[str, Any]:
    """All scored (variant, λ, k) of this sweep from MLflow, best first."""
    from larp import tracking

    runs = tracking.client(uri).search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.SWEEP_TAG}` = '{sweep.name}' and "
        f"tags.`{tracking.KIND_TAG}` = 'score' and attributes.status = 'FINISHED'",
        max_results=50000,
    )
    rows = []
    for run in runs:
        p, m = run.data.params, run.data.metrics
        rows.append(
            {
                "variant": p.get("variant"),
                "lam": float(p["lam"]),
                "top_k": int(p["top_k"]),
                "threshold": float(p.get("threshold", "nan")),
                "run_id": run.info.run_id,
                "parent_run_id": run.data.tags.get(tracking.PARENT_TAG),
                **{k: m.get(k, math.nan) for k in METRICS},
            }
        )
    rows.sort(key=lambda r: (-_nan_low(r[sweep.metric]), -_nan_low(r["image_auroc"])))
    return {"rows": rows, "best": rows[0] if rows else None}


def _nan_low(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def champion_root(sweep: SweepConfig) -> Path:
    """Where the champion checkpoint and its pointer go: the storage path when it is a local or
    mounted folder; `./larp_runs` when storage is a URI such as s3:// (the registered MLflow
    model version is then the shared copy)."""
    if "://" in sweep.storage_path:
        return Path("larp_runs").resolve()
    return Path(sweep.storage_path).expanduser().resolve()


def crown_champion(sweep: SweepConfig, uri: str, best: dict[str, Any]) -> dict[str, Any]:
    """Save the best weights with their best (λ, k) and threshold as the champion checkpoint,
    register it (alias `champion`) and write the pointer `serve` reads."""
    import mlflow

    from larp import tracking
    from larp.champion import write_champion
    from larp.checkpoint import load_checkpoint, save_checkpoint

    parent = best["parent_run_id"]
    source = tracking.client(uri).get_run(parent).info.artifact_uri
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/checkpoint", dst_path=folder, tracking_uri=uri
        )
        model = load_checkpoint(local)
    model.config = model.config.replace(lam=best["lam"], top_k=best["top_k"])
    root = champion_root(sweep)
    target = root / f"{sweep.name}-champion"
    if target.exists():
        shutil.rmtree(target)
    metrics = {k: best[k] for k in METRICS if isinstance(best.get(k), float)}
    save_checkpoint(
        model,
        target,
        training_data=model.manifest.get("training_data"),
        metrics=metrics,
        threshold=best["threshold"],
        extra={"sweep": sweep.name, "variant": best["variant"], "score_run": best["run_id"]},
    )
    tracking.log_artifacts(uri, best["run_id"], target, "champion")
    version = tracking.register_champion(uri, best["run_id"], "champion")
    pointer = root / "champion.json"
    write_champion(
        target,
        {"model_name": tracking.MODEL_NAME, "version": version, "tracking_uri": uri, **best},
        path=pointer,
    )
    return {"checkpoint": str(target), "version": version, "pointer": str(pointer)}


# ---------------------------------------------------------------------- output
def format_summary(sweep: SweepConfig, summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    if not rows:
        return "no run finished; see the errors above"
    shown = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
    lines = [f"## Best configurations (by {sweep.metric})", ""]
    lines += _table(["variant", "λ", "k", *shown], [_cells(r, shown) for r in rows[:5]])
    base = sweep.base_model()
    at_default = [r for r in rows if r["lam"] == base.lam and r["top_k"] == base.top_k]
    title = "Table 4 analogue (ablations)" if sweep.mode == "ablation" else "Table 6 analogue"
    if at_default:
        lines += ["", f"## {title}: variants at λ={base.lam}, k={base.top_k}", ""]
        ordered = sorted(at_default, key=lambda r: r["variant"])
        lines += _table(["variant", "λ", "k", *shown], [_cells(r, shown) for r in ordered])
    best = summary["best"]
    grid = [r for r in rows if r["variant"] == best["variant"]]
    lams = sorted({r["lam"] for r in grid})
    ks = sorted({r["top_k"] for r in grid})
    lookup = {(r["lam"], r["top_k"]): r["image_auroc"] for r in grid}
    lines += ["", f"## Table 5 analogue: image AUROC (%) of {best['variant']}, λ × top-k", ""]
    lines += _table(
        ["λ \\ k", *map(str, ks)],
        [[str(lam), *(_pct(lookup.get((lam, k), math.nan)) for k in ks)] for lam in lams],
    )
    champion = summary.get("champion")
    uri = sweep.tracking_uri_absolute()
    lines += ["", "## Next", "", f"- compare runs:  mlflow ui --backend-store-uri {uri}"]
    if champion:
        pointer = champion["pointer"]
        default_pointer = Path("larp_runs/champion.json").resolve()
        env = "" if Path(pointer) == default_pointer else f"LARP_CHAMPION_FILE={pointer} "
        lines += [
            f"- champion: {champion['checkpoint']} (registered as larp-detector "
            f"v{champion['version']}, alias champion)",
            f"- serve it:  {env}serve run serve.app:deployment",
        ]
    if summary.get("failed_trials"):
        lines.append(f"- {summary['failed_trials']} trial(s) failed; their MLflow runs are FAILED")
    return "\n".join(lines)


def _cells(row: dict, keys) -> list[str]:
    return [
        str(row["variant"]),
        f"{row['lam']:g}",
        str(row["top_k"]),
        *(_pct(row[k]) for k in keys),
    ]


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> SweepConfig:
    parser = argparse.ArgumentParser(
        prog="python tune/sweep.py",
        description="LaRP-CLIP sweep on Ray Tune with MLflow tracking. With no arguments: the "
        "embedded default (tiny backbone, synthetic:source -> synthetic:target, local Ray, "
        "MLflow in sqlite:///mlflow.db).",
    )
    parser.add_argument("--config", help="YAML file with SweepConfig keys (flags override it)")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--backbone", help="open_clip model name")
    parser.add_argument("--pretrained", help="open_clip tag or local weights file")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-data")
    parser.add_argument("--eval-data")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--partitions", help="shallow-layer sets, e.g. '6;6,12;6,12,18'")
    parser.add_argument("--lams", help="comma-separated λ values")
    parser.add_argument("--top-ks", help="comma-separated top-k values")
    parser.add_argument("--search", choices=SEARCHES)
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--workers-per-trial", type=int)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--metric", choices=METRICS)
    parser.add_argument("--name")
    parser.add_argument("--experiment")
    parser.add_argument("--storage-path")
    parser.add_argument(
        "--shared-storage",
        action="store_true",
        help="a local --storage-path is on a mount every Ray node shares (NFS/EFS)",
    )
    parser.add_argument("--tracking-uri")
    parser.add_argument("--ray-address")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    data: dict[str, Any] = {}
    if args.config:
        data = load_yaml_mapping(args.config, "sweep config")
    model = dict(data.get("model") or {})
    train = dict(data.get("train") or {})
    for flag, key in (("backbone", "backbone"), ("pretrained", "pretrained")):
        if getattr(args, flag) is not None:
            model[key] = getattr(args, flag)
    if args.image_size is not None:
        model["image_size"] = args.image_size
    for flag, key in (
        ("train_data", "train_data"),
        ("eval_data", "eval_data"),
        ("epochs", "epochs"),
    ):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    if args.workers_per_trial is not None:
        train["num_workers"] = args.workers_per_trial
    if args.use_gpu:
        train["use_gpu"] = True
    data["model"], data["train"] = model, train
    simple = (
        "preset", "mode", "search", "num_samples", "max_concurrent", "metric", "name",
        "experiment", "storage_path", "tracking_uri", "ray_address",
    )  # fmt: skip
    for key in simple:
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.resume:
        data["resume"] = True
    if args.shared_storage:
        data["shared_storage"] = True
    try:
        if args.partitions:
            data["partitions"] = [
                [int(x) for x in part.split(",") if x.strip()]
                for part in args.partitions.split(";")
            ]
        if args.lams:
            data["lams"] = [float(x) for x in args.lams.split(",")]
        if args.top_ks:
            data["top_ks"] = [int(x) for x in args.top_ks.split(",")]
    except ValueError as exc:
        raise ConfigError(f"bad list flag: {exc}") from exc
    return SweepConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    try:
        sweep = parse_args(argv)
        summary = run_sweep(sweep)
    except (LaRPError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(sweep, summary))
    return 0 if summary.get("best") else 1
