"""Dataset specs (``kind:PATH``) -> validated `ImageRecord` lists.

The zero-shot protocol trains on one data set's test split and evaluates on another's, so
every reader returns the TEST split (it is the split with masks). All problems are found
here, from file headers only, so a bad file fails the run before any training starts.

Spec forms::

    mvtec:PATH  mpdd:PATH  btad:PATH  folder:PATH   MVTec layout (see `read_mvtec_layout`)
    visa:PATH                                      PATH/split_csv/1cls.csv
    meta:PATH/meta.json                            AnomalyCLIP meta file ("test" part)
    synthetic:NAME[?seed=S&n=N&n_normal=N&n_defect=N&n_train=N&size=PX]
                                                   generated set (see `larp.data.synthetic`)
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from PIL import Image

from .errors import DatasetError, DatasetWarning
from .records import ImageRecord

KINDS: tuple[str, ...] = ("mvtec", "mpdd", "btad", "folder", "visa", "meta", "synthetic")
_LAYOUT_KINDS = ("mvtec", "mpdd", "btad", "folder")
IMAGE_EXTS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Preference when one stem has several mask files (MVTec uses .png, BTAD .png or .bmp).
_MASK_EXT_ORDER = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
_SHOW_NAMES = 3


def _kinds_hint() -> str:
    return "valid kinds: " + ", ".join(f"{k}:" for k in KINDS)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``kind:rest`` and check the kind; the rest is a path (or a synthetic set name)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DatasetError(f"dataset spec {spec!r} is not of the form kind:PATH; {_kinds_hint()}")
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r} in {spec!r}; {_kinds_hint()}")
    if not rest.strip():
        raise DatasetError(f"dataset spec {spec!r} has an empty path; {_kinds_hint()}")
    return kind, rest.strip()


@dataclass
class _Problems:
    """Bad items found while reading; raised together or skipped with one warning."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: Path | str, message: str) -> None:
        self.items.append((str(name), message))

    def settle(self, spec: str, skip_bad: bool) -> None:
        if not self.items:
            return
        names = ", ".join(n for n, _ in self.items[:_SHOW_NAMES])
        more = "" if len(self.items) <= _SHOW_NAMES else ", ..."
        if not skip_bad:
            extra = ""
            if len(self.items) > 1:
                others = ", ".join(n for n, _ in self.items[1 : 1 + _SHOW_NAMES])
                more = ", ..." if len(self.items) > 1 + _SHOW_NAMES else ""
                extra = f" (and {len(self.items) - 1} more problem(s): {others}{more})"
            raise DatasetError(f"{self.items[0][1]}{extra} [dataset {spec}]")
        warnings.warn(
            f"skipped {len(self.items)} bad item(s) in dataset {spec}: {names}{more}",
            DatasetWarning,
            stacklevel=3,
        )


def _header_size(path: Path, what: str, problems: _Problems) -> tuple[int, int] | None:
    """Image size from the file header (no pixel decode), or None after recording why not."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        problems.add(path, f"{what} file not found: {path}")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.add(path, f"corrupt {what} {path}: {e}")
    return None


def _validate(records: Iterable[ImageRecord], problems: _Problems) -> list[ImageRecord]:
    """Keep the records whose image (and mask) open and agree in size."""
    good: list[ImageRecord] = []
    for rec in records:
        img_size = _header_size(rec.image_path, "image", problems)
        if img_size is None:
            continue
        if rec.mask_path is None:
            if rec.label == 1:
                problems.add(rec.image_path, f"anomalous image has no mask: {rec.image_path}")
                continue
        else:
            mask_size = _header_size(rec.mask_path, "mask", problems)
            if mask_size is None:
                continue
            if mask_size != img_size:
                problems.add(
                    rec.image_path,
                    f"mask {rec.mask_path} is {mask_size[0]}x{mask_size[1]} but image "
                    f"{rec.image_path} is {img_size[0]}x{img_size[1]}",
                )
                continue
        good.append(rec)
    return good


def _visible_children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible_children(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTS]


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """Stem -> mask file for one ground-truth folder: pairing by stem survives any sort order."""
    index: dict[str, Path] = {}
    if not gt_dir.is_dir():
        return index
    files = _image_files(gt_dir)
    files.sort(key=lambda p: _MASK_EXT_ORDER.index(p.suffix.lower()))
    for p in files:
        index.setdefault(p.stem, p)
    return index


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """MVTec names masks ``<stem>_mask``, BTAD/MPDD variants reuse ``<stem>``."""
    return index.get(f"{stem}_mask") or index.get(stem)


def read_mvtec_layout(root: Path, problems: _Problems, kind: str = "folder") -> list[ImageRecord]:
    """Read ``cls/test/<defect>/<img>`` with masks in ``cls/ground_truth/<defect>/``.

    ``root`` may also be a single class folder (it holds ``test/`` itself). BTAD names its
    normal folder ``ok`` (and anomalies ``ko``), so for ``btad:`` both count as normal names.
    """
    normal_names = {"good", "ok"} if kind == "btad" else {"good"}
    if (root / "test").is_dir():
        class_dirs = [root]
    else:
        class_dirs = [p for p in _visible_children(root) if (p / "test").is_dir()]
    if not class_dirs:
        raise DatasetError(
            f"no classes found under {root}: expected <class>/test/<defect>/<image> "
            f"(MVTec layout) for {kind}:"
        )
    records: list[ImageRecord] = []
    for cls_dir in class_dirs:
        cls_records: list[ImageRecord] = []
        n_found = 0
        for defect_dir in _visible_children(cls_dir / "test"):
            if not defect_dir.is_dir():
                continue
            normal = defect_dir.name in normal_names
            masks = {} if normal else _mask_index(cls_dir / "ground_truth" / defect_dir.name)
            for img in _image_files(defect_dir):
                n_found += 1
                mask = None if normal else _find_mask(masks, img.stem)
                if not normal and mask is None:
                    gt = cls_dir / "ground_truth" / defect_dir.name
                    problems.add(
                        img,
                        f"anomalous image has no mask: {img} (looked for {gt}/{img.stem}_mask.*"
                        f" and {gt}/{img.stem}.*)",
                    )
                    continue
                cls_records.append(
                    ImageRecord(
                        image_path=img,
                        mask_path=mask,
                        label=0 if normal else 1,
                        class_name=cls_dir.name,
                        defect="good" if normal else defect_dir.name,
                    )
                )
        if n_found == 0:
            problems.add(cls_dir, f"class {cls_dir.name!r} has no test images: {cls_dir / 'test'}")
        records.extend(cls_records)
    return records


def _csv_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in ("normal", "good", "0"):
        return 0
    if v in ("anomaly", "abnormal", "anomalous", "1"):
        return 1
    raise DatasetError(f"unknown label {value!r} at {where} (expected 'normal' or 'anomaly')")


def read_visa(root: Path) -> list[ImageRecord]:
    """VisA's ``split_csv/1cls.csv`` (object,split,label,image,mask; paths relative to root)."""
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # Excel adds a BOM
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not need <= {c.strip() for c in reader.fieldnames}:
            raise DatasetError(
                f"{csv_path} must have columns {sorted(need)}, found {reader.fieldnames}"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    records = []
    for line, row in enumerate(rows, start=2):
        if row["split"].lower() != "test":
            continue
        label = _csv_label(row["label"], f"{csv_path} line {line}")
        records.append(
            ImageRecord(
                image_path=root / row["image"],
                mask_path=(root / row["mask"]) if row["mask"] else None,
                label=label,
                class_name=row["object"],
                defect="good" if label == 0 else "anomaly",
            )
        )
    if not records:
        raise DatasetError(f"{csv_path} has no rows with split == 'test'")
    return records


def read_meta(path: Path, problems: _Problems) -> list[ImageRecord]:
    """AnomalyCLIP ``meta.json``: ``{"test": {cls: [{img_path, mask_path, ...}]}}``."""
    if path.is_dir():
        path = path / "meta.json"
    if not path.is_file():
        raise DatasetError(f"meta file not found: {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot parse meta file {path}: {e}") from e
    test = meta.get("test") if isinstance(meta, dict) else None
    if not isinstance(test, dict):
        raise DatasetError(f"meta file {path} has no 'test' object mapping class -> items")
    base = path.parent
    records = []
    for cls_name in sorted(test):
        items = test[cls_name]
        if not items:
            problems.add(f"{path}:{cls_name}", f"class {cls_name!r} has no test images in {path}")
            continue
        for i, item in enumerate(items):
            try:
                label = int(item["anomaly"])
                img_rel = item["img_path"]
                mask_rel = item.get("mask_path") or ""
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"bad item {i} of class {cls_name!r} in {path}: {e}") from e
            defect = item.get("specie_name") or ("good" if label == 0 else "anomaly")
            records.append(
                ImageRecord(
                    image_path=base / img_rel,
                    mask_path=(base / mask_rel) if mask_rel else None,
                    label=1 if label else 0,
                    class_name=str(cls_name),
                    defect="good" if label == 0 else str(defect),
                )
            )
    return records


_SYNTH_KEYS = {"seed", "n", "n_normal", "n_defect", "n_train", "size"}


def synthetic_root(rest: str) -> Path:
    """Generate (or reuse) the set named by ``NAME?key=value&...`` and return its folder."""
    from .synthetic import generate_set  # numpy-only, but keep plain readers light to import

    name, _, query = rest.partition("?")
    kwargs: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _SYNTH_KEYS:
            raise DatasetError(
                f"unknown synthetic option {key!r} in {rest!r}; allowed: {sorted(_SYNTH_KEYS)}"
            )
        try:
            kwargs[key] = int(value)
        except ValueError as e:
            raise DatasetError(f"synthetic option {key}={value!r} is not an integer") from e
    if "n" in kwargs:
        n = kwargs.pop("n")
        kwargs.setdefault("n_normal", n)
        kwargs.setdefault("n_defect", n)
    return generate_set(name.strip(), **kwargs)


def read_records(spec: str, skip_bad: bool = False) -> list[ImageRecord]:
    """Read and validate a data set's test split; bad items raise, or are skipped with a warning."""
    kind, rest = parse_spec(spec)
    problems = _Problems()
    if kind == "synthetic":
        try:
            root = synthetic_root(rest)
        except (KeyError, ValueError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"cannot build synthetic set {rest!r}: {e}") from e
        records = read_mvtec_layout(root, problems, kind="folder")
    else:
        path = Path(rest).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset path does not exist: {path} (spec {spec!r}; {_kinds_hint()})"
            )
        if kind in _LAYOUT_KINDS:
            records = read_mvtec_layout(path, problems, kind=kind)
        elif kind == "visa":
            records = read_visa(path)
        else:
            records = read_meta(path, problems)
    records = _validate(records, problems)
    problems.settle(spec, skip_bad)
    if not records:
        raise DatasetError(f"dataset {spec} has no usable images")
    return records
