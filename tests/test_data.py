"""Readers, validation, transforms and the dataset, on small trees built per test."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from larp.data import (
    AnomalyDataset,
    DatasetError,
    ImageRecord,
    denormalize,
    load_dataset,
    load_image,
    load_mask,
    parse_spec,
    pil_to_tensor,
    read_records,
)
from larp.data.errors import DatasetWarning

# Written out by hand (not imported) so the tests check the constants too.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(rgb[c] / 255.0 - MEAN[c]) / STD[c] for c in range(3)])


def save(path: Path, arr: np.ndarray | None = None, size=(8, 8), colour=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        img = Image.new("RGB", size, colour)
    else:
        img = Image.fromarray(arr)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
    img.save(path, format=fmt.get(path.suffix.lower(), "PNG"))
    return path


def save_mask(path: Path, size=(8, 8), box=(2, 2, 5, 5), high=255) -> Path:
    w, h = size
    arr = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = high
    return save(path, arr)


def mvtec_tree(root: Path) -> Path:
    """Two classes; mixed extensions; masks whose sort order differs from the images'."""
    cls = root / "bottle"
    save(cls / "train" / "good" / "000.png")
    save(cls / "test" / "good" / "000.png")
    save(cls / "test" / "good" / "001.jpg")
    # "10" sorts before "9" as text: pairing by position would give 9.png the 10 mask.
    save(cls / "test" / "crack" / "9.png", size=(8, 8))
    save(cls / "test" / "crack" / "10.bmp", size=(12, 10))
    save_mask(cls / "ground_truth" / "crack" / "10_mask.png", size=(12, 10))
    save_mask(cls / "ground_truth" / "crack" / "9_mask.png", size=(8, 8))
    cable = root / "cable"
    save(cable / "test" / "good" / "a.tiff")
    save(cable / "test" / "cut" / "x.jpeg", size=(6, 6))
    save_mask(cable / "ground_truth" / "cut" / "x_mask.png", size=(6, 6))
    return root


# -- specs ----------------------------------------------------------------------------------


def test_parse_spec_kinds_and_errors():
    assert parse_spec("mvtec:/data/mvtec") == ("mvtec", "/data/mvtec")
    assert parse_spec("META:/x/meta.json") == ("meta", "/x/meta.json")
    assert parse_spec("synthetic:source?seed=3") == ("synthetic", "source?seed=3")
    with pytest.raises(DatasetError, match="valid kinds: mvtec:.*visa:.*synthetic:"):
        parse_spec("imagenet:/x")
    with pytest.raises(DatasetError, match="valid kinds"):
        parse_spec("/just/a/path")
    with pytest.raises(DatasetError, match="empty path"):
        parse_spec("mvtec:")


def test_missing_path_lists_kinds(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="valid kinds") as e:
        read_records(f"mvtec:{missing}")
    assert str(missing) in str(e.value)


# -- MVTec layout ---------------------------------------------------------------------------


def test_mvtec_reader_pairs_masks_by_stem(tmp_path):
    recs = read_records(f"mvtec:{mvtec_tree(tmp_path)}")
    by_name = {(r.class_name, r.image_path.name): r for r in recs}
    assert set(by_name) == {
        ("bottle", "000.png"),
        ("bottle", "001.jpg"),
        ("bottle", "9.png"),
        ("bottle", "10.bmp"),
        ("cable", "a.tiff"),
        ("cable", "x.jpeg"),
    }
    assert all(isinstance(r, ImageRecord) for r in recs)
    r9, r10 = by_name[("bottle", "9.png")], by_name[("bottle", "10.bmp")]
    assert r9.mask_path.name == "9_mask.png" and r10.mask_path.name == "10_mask.png"
    assert (r9.label, r9.defect) == (1, "crack")
    normal = by_name[("bottle", "000.png")]
    assert (normal.label, normal.defect, normal.mask_path) == (0, "good", None)
    # train/ is not read: the zero-shot protocol uses the test split
    assert not any("train" in r.image_path.parts for r in recs)


@pytest.mark.parametrize("kind", ["mpdd", "folder"])
def test_layout_kinds_share_the_reader(tmp_path, kind):
    assert len(read_records(f"{kind}:{mvtec_tree(tmp_path)}")) == 6


def test_single_class_folder(tmp_path):
    mvtec_tree(tmp_path)
    recs = read_records(f"folder:{tmp_path / 'cable'}")
    assert {r.class_name for r in recs} == {"cable"} and len(recs) == 2


def test_btad_same_stem_masks_and_ok_ko(tmp_path):
    cls = tmp_path / "01"
    save(cls / "test" / "ok" / "0000.bmp")
    save(cls / "test" / "ko" / "0001.bmp")
    save(cls / "test" / "ko" / "0002.png")
    save_mask(cls / "ground_truth" / "ko" / "0001.bmp")
    save_mask(cls / "ground_truth" / "ko" / "0002.png")
    recs = {r.image_path.name: r for r in read_records(f"btad:{tmp_path}")}
    assert recs["0000.bmp"].label == 0 and recs["0000.bmp"].defect == "good"
    assert recs["0001.bmp"].mask_path.name == "0001.bmp"
    assert recs["0002.png"].mask_path.name == "0002.png"
    # under mvtec: "ok" is just a defect folder without masks -> error
    with pytest.raises(DatasetError, match="0000.bmp"):
        read_records(f"mvtec:{tmp_path}")


def test_missing_mask_names_file_and_skip_bad_warns(tmp_path):
    root = mvtec_tree(tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "9_mask.png").unlink()
    with pytest.raises(DatasetError, match="no mask") as e:
        read_records(f"mvtec:{root}")
    assert "9.png" in str(e.value)
    with pytest.warns(DatasetWarning, match=r"skipped 1 bad item.*9\.png"):
        recs = read_records(f"mvtec:{root}", skip_bad=True)
    assert len(recs) == 5 and "9.png" not in {r.image_path.name for r in recs}


def test_size_mismatch_names_both_files(tmp_path):
    root = mvtec_tree(tmp_path)
    save_mask(root / "cable" / "ground_truth" / "cut" / "x_mask.png", size=(7, 6))
    with pytest.raises(DatasetError, match=r"7x6.*6x6") as e:
        read_records(f"mvtec:{root}")
    assert "x_mask.png" in str(e.value) and "x.jpeg" in str(e.value)


def test_empty_class_is_an_error(tmp_path):
    root = mvtec_tree(tmp_path)
    (root / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="'empty' has no test images") as e:
        read_records(f"folder:{root}")
    assert str(root / "empty") in str(e.value)
    with pytest.warns(DatasetWarning, match="skipped 1"):
        assert len(read_records(f"folder:{root}", skip_bad=True)) == 6


def test_corrupt_png_names_file_and_is_skipped(tmp_path):
    root = mvtec_tree(tmp_path)
    bad = root / "bottle" / "test" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    bad_mask = root / "bottle" / "ground_truth" / "crack" / "9_mask.png"
    bad_mask.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="corrupt") as e:
        read_records(f"mvtec:{root}")
    assert "002.png" in str(e.value) and "9_mask.png" in str(e.value)
    assert "1 more problem" in str(e.value)
    with pytest.warns(DatasetWarning, match=r"skipped 2 bad item") as w:
        recs = read_records(f"mvtec:{root}", skip_bad=True)
    assert len(w) == 1
    names = {r.image_path.name for r in recs}
    assert "002.png" not in names and "9.png" not in names and len(recs) == 5


def test_no_classes_at_all(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="no classes found"):
        read_records(f"mvtec:{tmp_path}")


# -- VisA -------------------------------------------------------------------------------------


def visa_tree(root: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa_reader(tmp_path):
    img = "candle/Data/Images/{}/{}.JPG"
    msk = "candle/Data/Masks/Anomaly/{}.png"
    save(tmp_path / img.format("Normal", "0000"))
    save(tmp_path / img.format("Normal", "0001"))
    save(tmp_path / img.format("Anomaly", "000"))
    save_mask(tmp_path / msk.format("000"), high=1)  # VisA-style 0/1 mask
    save(tmp_path / "pcb1/Data/Images/Normal/0002.JPG")
    visa_tree(
        tmp_path,
        [
            ("candle", "train", "normal", img.format("Normal", "0001"), ""),
            ("candle", "test", "normal", img.format("Normal", "0000"), ""),
            ("candle", "test", "anomaly", img.format("Anomaly", "000"), msk.format("000")),
            ("pcb1", "test", "normal", "pcb1/Data/Images/Normal/0002.JPG", ""),
        ],
    )
    recs = read_records(f"visa:{tmp_path}")
    assert [(r.class_name, r.label, r.defect) for r in recs] == [
        ("candle", 0, "good"),
        ("candle", 1, "anomaly"),
        ("pcb1", 0, "good"),
    ]
    assert recs[1].mask_path == tmp_path / msk.format("000")
    ds = AnomalyDataset(recs, 8)
    assert ds.classes == ["candle", "pcb1"]
    assert ds[1]["mask"].sum() == 9  # the 3x3 box of the 0/1 mask


def test_visa_errors(tmp_path):
    with pytest.raises(DatasetError, match="1cls.csv"):
        read_records(f"visa:{tmp_path}")
    save(tmp_path / "c/a.JPG")
    visa_tree(tmp_path, [("c", "test", "anomaly", "c/a.JPG", "")])
    with pytest.raises(DatasetError, match=r"no mask.*a\.JPG"):
        read_records(f"visa:{tmp_path}")


def test_visa_missing_image_names_file(tmp_path):
    visa_tree(tmp_path, [("c", "test", "normal", "c/gone.JPG", "")])
    with pytest.raises(DatasetError, match=r"not found.*gone\.JPG"):
        read_records(f"visa:{tmp_path}")


# -- meta.json ------------------------------------------------------------------------------


def test_meta_reader(tmp_path):
    save(tmp_path / "brain/test/good/n.png")
    save(tmp_path / "brain/test/tumor/t.png")
    save_mask(tmp_path / "brain/ground_truth/tumor/t.png")
    meta = {
        "train": {"brain": []},
        "test": {
            "brain": [
                {
                    "img_path": "brain/test/good/n.png",
                    "mask_path": "",
                    "cls_name": "brain",
                    "specie_name": "good",
                    "anomaly": 0,
                },
                {
                    "img_path": "brain/test/tumor/t.png",
                    "mask_path": "brain/ground_truth/tumor/t.png",
                    "cls_name": "brain",
                    "specie_name": "tumor",
                    "anomaly": 1,
                },
            ]
        },
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    recs = read_records(f"meta:{tmp_path / 'meta.json'}")
    assert [(r.class_name, r.label, r.defect) for r in recs] == [
        ("brain", 0, "good"),
        ("brain", 1, "tumor"),
    ]
    assert recs[1].mask_path == tmp_path / "brain/ground_truth/tumor/t.png"
    # an empty class is an error too
    meta["test"]["liver"] = []
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'liver' has no test images"):
        read_records(f"meta:{tmp_path / 'meta.json'}")


def test_meta_without_test_part(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(DatasetError, match="'test'"):
        read_records(f"meta:{tmp_path / 'meta.json'}")


# -- transforms -----------------------------------------------------------------------------


def test_grayscale_pixel_by_hand(tmp_path):
    p = save(tmp_path / "g.png", np.full((5, 7), 128, dtype=np.uint8))
    t = load_image(p, 4)
    assert t.shape == (3, 4, 4) and t.dtype == torch.float32
    # (128/255 - 0.48145466) / 0.26862954 = 0.0205061 / 0.26862954 = 0.076336
    assert t[0, 0, 0].item() == pytest.approx(0.076336, abs=1e-5)
    assert torch.allclose(t[:, 2, 3], expected((128, 128, 128)), atol=1e-5)


def test_rgba_drops_alpha_like_open_clip(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[...] = (200, 100, 50, 0)
    t = load_image(save(tmp_path / "a.png", arr), 4)
    assert torch.allclose(t[:, 1, 1], expected((200, 100, 50)), atol=1e-5)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[128 * 257, 65535], [0, 128 * 257]], dtype=np.uint16)
    p = save(tmp_path / "d.png", arr)
    assert Image.open(p).mode.startswith("I;16")
    t = load_image(p, 2)
    assert torch.allclose(t[:, 0, 0], expected((128, 128, 128)), atol=1e-5)
    assert torch.allclose(t[:, 0, 1], expected((255, 255, 255)), atol=1e-5)
    assert torch.allclose(t[:, 1, 0], expected((0, 0, 0)), atol=1e-5)


def test_palette_image(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    img.save(tmp_path / "p.png")
    t = load_image(tmp_path / "p.png", 4)
    assert torch.allclose(t[:, 3, 3], expected((10, 200, 30)), atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high
    arr[:, :4] = (255, 0, 0)  # left half red
    arr[:, 4:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left becomes displayed top
    Image.fromarray(arr).save(tmp_path / "e.png", exif=exif)
    t = load_image(tmp_path / "e.png", 8)
    assert torch.allclose(t[:, 0, 4], expected((255, 0, 0)), atol=1e-4)
    assert torch.allclose(t[:, 7, 4], expected((0, 0, 255)), atol=1e-4)


def test_squash_resize_keeps_whole_image(tmp_path):
    arr = np.zeros((10, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255
    t = load_image(save(tmp_path / "w.png", arr), 16)
    assert t.shape == (3, 16, 16)
    assert (t[:, :, :6] > 1.5).all() and (t[:, :, 10:] < -1.4).all()


def test_pil_to_tensor_matches_load_image(tmp_path):
    rng = np.random.default_rng(0)
    p = save(tmp_path / "r.png", rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    with Image.open(p) as img:
        assert torch.equal(pil_to_tensor(img, 7), load_image(p, 7))
    with pytest.raises(ValueError):
        pil_to_tensor(Image.new("RGB", (2, 2)), 0)


def test_denormalize_inverts(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    t = load_image(save(tmp_path / "r.png", arr), 6)
    back = denormalize(t)
    assert torch.allclose(back, torch.from_numpy(arr).permute(2, 0, 1) / 255.0, atol=1e-5)
    assert denormalize(t.unsqueeze(0)).shape == (1, 3, 6, 6)
    with pytest.raises(ValueError):
        denormalize(torch.zeros(4, 6, 6))


def test_corrupt_and_truncated_image_errors_name_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nonsense")
    with pytest.raises(DatasetError, match="bad.png"):
        load_image(bad, 4)
    good = save(
        tmp_path / "full.png",
        np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8),
    )
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:300])
    with Image.open(trunc) as im:  # the header is fine, so readers accept it...
        assert im.size == (64, 64)
    with pytest.raises(DatasetError, match="trunc.png"):  # ...and decoding names it
        load_image(trunc, 4)
    with pytest.raises(DatasetError, match="missing.png"):
        load_mask(tmp_path / "missing.png", 4)


def test_mask_binarised_at_half_of_max_level(tmp_path):
    arr = np.zeros((4, 4), dtype=np.uint8)
    arr[:, :2] = 1  # a 0/1 mask
    m01 = load_mask(save(tmp_path / "m01.png", arr), 4)
    m255 = load_mask(save(tmp_path / "m255.png", arr * 255), 4)
    assert m01.shape == (1, 4, 4) and m01.dtype == torch.float32
    assert torch.equal(m01, m255)
    assert m01[0, :, :2].eq(1).all() and m01[0, :, 2:].eq(0).all()
    up = load_mask(tmp_path / "m255.png", 8)  # bilinear up-scaling keeps the edge in place
    assert up[0, :, :4].eq(1).all() and up[0, :, 4:].eq(0).all()
    levels = np.array([[0, 99], [101, 200]], dtype=np.uint8)  # max 200 -> threshold 100
    m = load_mask(save(tmp_path / "lv.png", levels), 2)
    assert m[0].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    empty = load_mask(save(tmp_path / "z.png", np.zeros((3, 3), np.uint8)), 5)
    assert empty.sum() == 0 and empty.shape == (1, 5, 5)


def test_mask_downscale_thresholds_coverage(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[0:2, 0:2] = 255  # one full 2x2 cell -> one output pixel
    arr[6, 6] = 255  # a quarter of a cell -> below 0.5
    m = load_mask(save(tmp_path / "d.png", arr), 4)
    assert m[0, 0, 0] == 1 and m.sum() == 1


# -- dataset --------------------------------------------------------------------------------


def test_anomaly_dataset_items(tmp_path):
    root = mvtec_tree(tmp_path)
    ds = load_dataset(f"mvtec:{root}", image_size=16)
    assert len(ds) == 6 and ds.classes == ["bottle", "cable"]
    assert ds.records == read_records(f"mvtec:{root}")
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "mask", "label", "class_name", "path"}
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["path"] == str(ds.records[i].image_path)
        assert (item["mask"].sum() > 0) == (item["label"] == 1)
        labels.append(item["label"])
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    batch = torch.utils.data.default_collate([ds[0], ds[3]])
    assert batch["image"].shape == (2, 3, 16, 16)


def test_dataset_rejects_bad_size(tmp_path):
    with pytest.raises(ValueError):
        AnomalyDataset([], 0)


def test_import_does_not_pull_ray_or_mlflow():
    code = (
        "import sys, larp.data; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
