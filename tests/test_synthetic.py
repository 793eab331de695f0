"""The synthetic generator: determinism, exact masks, disjoint families, on-disk layout."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from larp.data import DatasetError, load_dataset, read_records
from larp.data.synthetic import (
    DEFECT_KINDS,
    DOMAINS,
    FAMILIES,
    HARD_DEFECTS,
    SETS,
    SOURCE_FAMILIES,
    TARGET_FAMILIES,
    describe,
    generate_set,
    make_domain,
    render_sample,
)
from larp.data.synthetic.palette import COLOURS

SMALL = {"n_normal": 2, "n_defect": 7, "n_train": 1, "size": 64}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    return generate_set("source", root=tmp_path_factory.mktemp("synth"), seed=0, **SMALL)


# -- families and sets ----------------------------------------------------------------------


def test_source_and_target_families_are_disjoint():
    assert not set(SOURCE_FAMILIES) & set(TARGET_FAMILIES)
    src = {DOMAINS[d].family for d in SETS["source"]}
    tgt = {DOMAINS[d].family for d in SETS["target"]}
    assert src <= set(SOURCE_FAMILIES) and tgt <= set(TARGET_FAMILIES)
    assert not src & tgt
    for fams in (src, tgt):  # both kinds of picture on each side
        assert {FAMILIES[f] for f in fams} == {"texture", "object"}
    assert len(SETS["source"]) >= 3 and len(SETS["target"]) >= 3


# -- exact masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_defect_changes_only_masked_pixels(domain):
    dom = DOMAINS[domain]
    for seed in (0, 1):
        clean, clean_mask, info = render_sample(dom, None, np.random.default_rng(seed), 64)
        assert clean.dtype == np.uint8 and clean.shape == (64, 64, 3)
        assert not clean_mask.any() and info["defect"] == "good"
        for kind in dom.defect_kinds:
            img, mask, info = render_sample(dom, kind, np.random.default_rng(seed), 64)
            assert mask.dtype == bool and mask.shape == (64, 64)
            diff = (img != clean).any(axis=-1)
            assert mask.any(), (domain, kind)
            assert not (diff & ~mask).any(), f"{domain}/{kind}: pixels changed outside the mask"
            # the mask is the painted region, and most of it visibly changed
            assert diff.sum() >= 0.2 * mask.sum(), (domain, kind, diff.sum(), mask.sum())
            assert info["defect"] == kind and info["area"] == int(mask.sum())
            x0, y0, x1, y1 = info["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_rendering_is_deterministic_and_seed_dependent():
    a = render_sample("stripes_navy", "scratch", np.random.default_rng(5), 48)
    b = render_sample("stripes_navy", "scratch", np.random.default_rng(5), 48)
    c = render_sample("stripes_navy", "scratch", np.random.default_rng(6), 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_hard_defects_use_only_the_domains_colours():
    """A same-colour scratch is painted in one of the domain's own colours (no colour cue)."""
    assert {"scratch", "texture_change", "missing_part", "misplaced_part", "warp"} <= set(
        HARD_DEFECTS
    )
    for name in ("stripes_navy", "dots_teal", "card_pcb"):
        dom = DOMAINS[name]
        for seed in range(3):
            _, _, info = render_sample(dom, "scratch", np.random.default_rng(seed), 64)
            assert info["detail"]["colour"] in dom.colour_names()
            _, _, info = render_sample(dom, "color_scratch", np.random.default_rng(seed), 64)
            assert info["detail"]["colour"] not in dom.colour_names()


def test_defect_kind_must_fit_the_domain():
    with pytest.raises(ValueError, match="does not apply"):
        render_sample("washer_steel", "texture_change", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="does not apply"):
        render_sample("grain_oak", "missing_part", np.random.default_rng(0), 64)
    with pytest.raises(KeyError, match="unknown synthetic domain"):
        render_sample("nope", None, np.random.default_rng(0), 64)


def test_random_domains_of_every_family_render():
    rng = np.random.default_rng(3)
    for family in sorted(FAMILIES):
        dom = make_domain(family, rng)
        assert dom.family == family and all(c in COLOURS for c in dom.colour_names())
        kind = dom.defect_kinds[int(rng.integers(len(dom.defect_kinds)))]
        img, mask, info = render_sample(dom, kind, rng, 48)
        assert img.shape == (48, 48, 3) and mask.any() and info["family"] == family


def test_captions_describe_the_sample():
    _, _, good = render_sample("washer_steel", None, np.random.default_rng(0), 64)
    assert good["caption"] == "a photo of a flawless steel washer on a charcoal background."
    _, mask, info = render_sample("stripes_navy", "stain", np.random.default_rng(0), 64)
    cap = describe(info)
    assert cap == info["caption"]
    assert cap.startswith("a photo of a navy and cream striped texture with a ")
    assert f"{info['detail']['colour']} stain at the {info['location']}." in cap
    # the location follows the mask centroid
    ys, xs = np.nonzero(mask)
    row = ["top", "", "bottom"][min(int(3 * ys.mean() / 64), 2)]
    col = ["left", "center", "right"][min(int(3 * xs.mean() / 64), 2)]
    want = {("", "center"): "center", ("top", "center"): "top", ("bottom", "center"): "bottom"}
    assert info["location"] == want.get((row, col), f"{row} {col}".strip())
    _, _, miss = render_sample("plug_white", "missing_part", np.random.default_rng(0), 64)
    assert "with a missing " in miss["caption"] and miss["detail"]["part"] in miss["caption"]


# -- sets on disk -----------------------------------------------------------------------------


def test_set_layout_reads_with_the_folder_reader(small_source):
    recs = read_records(f"folder:{small_source}")
    assert sorted({r.class_name for r in recs}) == sorted(SETS["source"])
    per_class = len(recs) // len(SETS["source"])
    assert per_class == SMALL["n_normal"] + SMALL["n_defect"]
    meta = json.loads((small_source / "metadata.json").read_text())
    assert set(meta["source_families"]) == set(SOURCE_FAMILIES)
    for r in recs:
        rel = str(r.image_path.relative_to(small_source))
        entry = meta["images"][rel]
        assert entry["domain"] == r.class_name and entry["defect"] == r.defect
        assert entry["family"] == DOMAINS[r.class_name].family and entry["caption"]
        if r.label:
            mask = np.asarray(Image.open(r.mask_path))
            assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == entry["area"]
            assert entry["mask"] == str(r.mask_path.relative_to(small_source))
    train = list(small_source.glob("*/train/good/*.png"))
    assert len(train) == SMALL["n_train"] * len(SETS["source"])


def test_same_seed_gives_identical_bytes(tmp_path, small_source):
    again = generate_set("source", root=tmp_path / "a", seed=0, **SMALL)
    assert again != small_source
    assert tree_bytes(again) == tree_bytes(small_source)
    other = generate_set("source", root=tmp_path / "b", seed=1, **SMALL)
    a, b = tree_bytes(again), tree_bytes(other)
    assert a.keys() == b.keys()
    pngs = [k for k in a if k.endswith(".png") and "/test/" in k]
    assert sum(a[k] != b[k] for k in pngs) == len(pngs)


def test_set_is_reused_and_written_atomically(tmp_path):
    kwargs = dict(root=tmp_path, seed=4, n_normal=1, n_defect=1, n_train=0, size=32)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(generate_set("target", **kwargs)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    final = results[0]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temp folders left
    assert "target" in final.name and "seed4" in final.name and "32px" in final.name
    marker = final / "metadata.json"
    stamp = marker.stat().st_mtime_ns
    assert generate_set("target", **kwargs) == final and marker.stat().st_mtime_ns == stamp


def test_every_defect_kind_occurs_in_the_default_sets(tmp_path, capsys):
    start = time.perf_counter()
    roots = [generate_set(name, root=tmp_path) for name in ("source", "target")]
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[synthetic] default source+target sets generated in {elapsed:.2f} s")
    kinds = set()
    for root in roots:
        recs = read_records(f"folder:{root}")
        kinds |= {r.defect for r in recs if r.label}
        assert sum(r.label == 0 for r in recs) == 12 * 5 and sum(r.label for r in recs) == 12 * 5
    assert kinds == set(DEFECT_KINDS)


# -- the synthetic: spec ----------------------------------------------------------------------


def test_synthetic_spec_with_options(tmp_path, monkeypatch):
    monkeypatch.setenv("LARP_DATA_DIR", str(tmp_path))
    ds = load_dataset("synthetic:target?seed=3&n=2&size=32", image_size=24)
    assert len(ds) == 4 * len(SETS["target"]) and ds.classes == sorted(SETS["target"])
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 24, 24) and item["label"] == 1 and item["mask"].sum() > 0
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("target-") and "seed3" in folder.name
    with Image.open(next(folder.rglob("*.png"))) as im:
        assert im.size == (32, 32)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:nowhere", "unknown synthetic set"),
        ("synthetic:source?colour=red", "unknown synthetic option"),
        ("synthetic:source?seed=x", "not an integer"),
        ("synthetic:source?n=0", "n_normal >= 1"),
    ],
)
def test_synthetic_spec_errors(tmp_path, monkeypatch, spec, message):
    monkeypatch.setenv("LARP_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=message):
        read_records(spec)
