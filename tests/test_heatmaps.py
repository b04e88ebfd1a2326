"""Heatmaps in the runtime: the API's arrays, the overlay geometry, and ``scan --heatmaps DIR``
(one PNG per classified image, unique names, nothing written outside DIR)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime import Classifier
from cxr.runtime.cli import cli
from cxr.runtime.heatmap import map_on_image, normalize_map, overlay, render_heatmap
from cxr.runtime.preprocess import Preprocessing
from synthetic import write_bad_files
from tiny_cam_model import build_tiny_cam_model


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory) -> Path:
    return build_tiny_cam_model(tmp_path_factory.mktemp("cam") / "cam.onnx", size=32, grid=4)


def _patch_image(w: int, h: int, base: int, patch: int) -> np.ndarray:
    """``base`` everywhere except the top-left quarter-by-quarter cell at ``patch``."""
    a = np.full((h, w), base, np.uint8)
    a[: h // 4, : w // 4] = patch
    return a


def test_explain_returns_maps_whose_mean_is_the_logit(cam_model):
    clf = Classifier.load(cam_model)
    assert clf.has_heatmaps
    pred, maps = clf.explain(_patch_image(64, 64, 10, 240))  # dark film, one bright cell
    assert pred.label == "COVID" and maps.shape == (3, 4, 4) and maps.dtype == np.float32
    logits = maps.mean(axis=(1, 2))
    p = np.exp(logits - logits.max())
    np.testing.assert_allclose(p / p.sum(), [pred.probabilities[c] for c in clf.classes], atol=1e-5)
    covid = maps[0]
    # darkness is the evidence for this class: weakest exactly at the bright cell
    assert np.unravel_index(covid.argmin(), covid.shape) == (0, 0)
    assert clf.classify(_patch_image(64, 64, 10, 240)) == pred


def test_explain_without_cam_output_is_a_clear_error(tiny_model_path):
    clf = Classifier.load(tiny_model_path)
    assert not clf.has_heatmaps
    with pytest.raises(ValueError, match="no class-activation map output"):
        clf.explain(np.zeros((32, 32), np.uint8))


def test_scan_api_fills_heatmaps_only_when_asked(cam_model, tmp_path):
    Image.fromarray(_patch_image(40, 40, 240, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    clf = Classifier.load(cam_model)
    plain = list(clf.scan(tmp_path))
    assert all(r.heatmap is None for r in plain)
    rich = list(clf.scan(tmp_path, heatmaps=True))
    assert [r.path for r in rich] == [r.path for r in plain]
    assert rich[0].heatmap.shape == (3, 4, 4) and rich[0].prediction == plain[0].prediction
    assert rich[1].error and rich[1].heatmap is None


def test_map_geometry_follows_the_resize_policy():
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0  # hot top-left cell of the model's input
    heat, seen = map_on_image(cam, (200, 100), Preprocessing(size=32, resize="squash"))
    assert heat.shape == (100, 200) and seen.all()
    assert heat[:10, :20].mean() > 0.8 and heat[60:, 120:].max() == 0  # stretched over the whole film
    heat, seen = map_on_image(cam, (200, 100), Preprocessing(size=32, resize="center_crop"))
    assert seen[:, 50:150].all() and not seen[:, :50].any() and not seen[:, 150:].any()
    assert heat[:, :50].max() == 0 and heat[:10, 50:60].mean() > 0.8  # the map sits on the central square
    heat, seen = map_on_image(cam, (200, 100), Preprocessing(size=32, resize="pad"))
    # letterbox: the square is 200 wide, the film fills its middle rows 50..150; the hot cell
    # (rows 0..50 of the square) is padding, so the film's top edge gets only its falloff
    assert heat.shape == (100, 200) and heat[:5, :20].mean() < 0.5
    assert normalize_map(np.full((3, 3), 7.0)).max() == 0  # a flat map is no evidence anywhere


def test_overlay_tints_only_where_the_evidence_is():
    film = Image.fromarray(np.full((80, 120), 128, np.uint8))
    cam = np.zeros((4, 4), np.float32)
    cam[3, 3] = 5.0
    rgb = np.asarray(overlay(film, cam, Preprocessing(size=32)), dtype=int)
    assert rgb.shape == (80, 120, 3)
    cold, hot = rgb[5, 5], rgb[78, 118]
    assert cold[0] == cold[1] == cold[2] == 128  # untouched film
    assert hot[0] - hot[2] > 40  # red end of the scale
    fig = render_heatmap(film, cam, Preprocessing(size=32), "COVID", 0.91)
    assert fig.width > fig.height  # film 512 x 341 plus the scale beside it
    assert fig.getpixel((530, 60)) != fig.getpixel((530, fig.height - 3))  # the colour bar, high to low


def _png_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir())


def test_scan_heatmaps_one_png_per_classified_image(cam_model, tmp_path):
    src = tmp_path / "in"
    (src / "x").mkdir(parents=True)
    Image.fromarray(_patch_image(300, 200, 240, 10)).save(src / "a b.png")
    Image.fromarray(_patch_image(300, 200, 240, 10)).save(src / "a_b.png")  # same slug as "a b"
    Image.fromarray(_patch_image(64, 128, 10, 240)).save(src / "x" / "a b.png")  # same base name
    write_bad_files(src / "bad")
    out = tmp_path / "heat"
    base = ["scan", str(src), "--model", str(cam_model), "--format", "csv"]
    plain = CliRunner().invoke(cli, base)
    res = CliRunner().invoke(cli, base + ["--heatmaps", str(out)])
    assert res.exit_code == plain.exit_code == 1  # bad files are still error rows
    assert res.stdout == plain.stdout  # same rows, same order
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    ok = [r for r in rows if r["status"] == "ok"]
    files = _png_files(out)
    assert len(ok) == 3 and len(files) == 3 and all(f.suffix == ".png" and f.is_file() for f in files)
    assert len({f.name for f in files}) == 3
    assert f"heatmaps: 3 PNG files in {out}" in res.stderr
    wide = Image.open(next(f for f in files if f.name.startswith("a_b-")))
    tall = Image.open(next(f for f in files if f.name.startswith("x_a_b-")))
    band = 46
    assert wide.height - band == round(512 * 200 / 300)  # film at the input's aspect ratio
    assert tall.height - band == 512


def test_heatmap_names_stay_inside_the_folder(cam_model, tmp_path):
    """'..', absolute paths, a symlink to a file elsewhere, non-UTF-8 bytes, and a symlink
    planted in the output folder: every PNG lands as a plain file directly inside DIR."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    img = Image.fromarray(_patch_image(40, 40, 240, 10))
    img.save(outside / "elsewhere.png")
    img.save(src / "sub" / "..png", format="PNG")
    img.save(os.path.join(os.fsencode(src), b"caf\xe9-\xff.png"), format="PNG")  # not UTF-8
    os.symlink(outside / "elsewhere.png", src / "link.png")
    img.save(src / "victim.png")
    out = tmp_path / "heat"
    out.mkdir()
    from cxr.runtime.safepaths import output_name_for
    from cxr.runtime.scan_outputs import scan_root

    inputs = [str(src), str(src / "sub" / ".." / "sub" / "..png"), os.path.abspath(outside / "elsewhere.png")]
    planted = output_name_for(str(src / "victim.png"), scan_root(inputs), ".heatmap.png")
    os.symlink(outside / "target.png", out / planted)  # someone expects us to write through it
    before = sorted(os.listdir(outside))
    res = CliRunner().invoke(cli, ["scan", *inputs, "--model", str(cam_model), "--format", "csv",
                                   "--heatmaps", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(outside)) == before  # nothing written outside, symlink not followed
    assert not (outside / "target.png").exists()
    assert "1 images could not be written" in res.stderr and "outside" in res.stderr
    made = [n for n in os.listdir(out) if not os.path.islink(os.path.join(out, n))]
    n_ok = sum(1 for r in csv.DictReader(io.StringIO(res.stdout)) if r["status"] == "ok")
    # caf\xe9, link, victim from the folder (sub/..png is a hidden file there), the two given
    # files; the link and elsewhere.png are one file, scanned once
    assert n_ok == 4 and len(made) == n_ok - 1  # all but the planted one
    for n in made:
        p = out / n
        assert p.is_file() and not p.is_symlink() and os.path.dirname(os.path.realpath(p)) == os.path.realpath(out)
        assert n.isascii() and "/" not in n and not n.startswith(".")


def test_heatmaps_need_a_model_with_maps(tiny_model_path, tmp_path):
    Image.new("L", (32, 32), 128).save(tmp_path / "a.png")
    res = CliRunner().invoke(cli, ["scan", str(tmp_path), "--model", str(tiny_model_path),
                                   "--heatmaps", str(tmp_path / "h")])
    assert res.exit_code == 2
    assert "no class-activation map output" in res.stderr and "re-export" in res.stderr


def test_a_model_claiming_maps_it_lacks_is_refused(tmp_path):
    from cxr.runtime.session import ModelLoadError, load_model
    from tiny_model import build_tiny_model

    liar = build_tiny_model(tmp_path / "liar.onnx", extra={"cam": {"available": True, "output": "cam"}})
    with pytest.raises(ModelLoadError, match="cxr.cam names output 'cam'"):
        load_model(liar)
    honest = build_tiny_model(tmp_path / "no.onnx", extra={"cam": {"available": False, "reason": "x"}})
    assert not load_model(honest).has_cam
