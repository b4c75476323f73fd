"""Figures and report.html of a run, on synthetic data: 2 tasks of 10 32x32 PNGs, one with masks, one without."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from helpers import run_results, task_entry

from moleflow.results.html import html_table, write_report_html
from moleflow.results.panels import MAP_CMAP, colorize, overlay, panel_columns, panel_rows, save_prediction_pngs
from moleflow.results.plots import TaskView, write_run_plots
from moleflow.results.schema import METRICS, RunResults
from moleflow.results.tables import Table, final_table, markdown_table, metric_table

S = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _view(root: Path, task: int, name: str, with_masks: bool, seed: int) -> TaskView:
    """10 test images: 5 good, 5 defective with a bright square that the map and the mask mark."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    n = 10
    labels = np.array([0] * 5 + [1] * 5)
    maps = rng.normal(0.0, 0.3, size=(n, S, S)).astype(np.float32)  # (N, S, S)
    masks = np.zeros((n, S, S), bool)
    paths = []
    for i in range(n):
        img = rng.integers(0, 120, size=(S, S, 3), dtype=np.uint8)  # (H, W, 3)
        if labels[i]:
            y, x = 4 + i, 6 + i
            img[y : y + 8, x : x + 8] = 240
            masks[i, y : y + 8, x : x + 8] = True
            maps[i, y : y + 8, x : x + 8] += 3.0
        p = folder / f"{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    scores = maps.reshape(n, -1).max(1) + rng.normal(0, 0.2, n)
    routed = np.full(n, task)
    routed[0] = 1 - task  # one misrouted image
    return TaskView(task=task, name=name, labels=labels, scores=scores, threshold=float(np.median(scores)), paths=paths,
                    maps=maps, masks=masks if with_masks else None, routed=routed)


def _results(with_train: bool = True, with_pixels: bool = True) -> RunResults:
    pix = 0.95 if with_pixels else None
    steps = [
        {"after_task": 0, "per_task": [task_entry(0, ["bottle"], 0.99, pix, routing=0.9)]},
        {"after_task": 1, "per_task": [task_entry(0, ["bottle"], 0.97, pix, routing=0.9), task_entry(1, ["mono"], 0.81, None, routing=0.9)]},
    ]
    if not with_train:  # an `evaluate` run: no training, no timings
        return run_results([["bottle"], ["mono"]], steps)
    steps[0]["train"] = {"epoch_loss": [3.0, 1.5, 0.2, -0.5], "seconds": 12.0}
    steps[1]["train"] = {"epoch_loss": [2.5, 1.0, 0.1, -0.3], "seconds": 10.0}
    return run_results([["bottle"], ["mono"]], steps, timings={"features_s": 3.0, "train_s_per_task": [12.0, 10.0], "eval_s": 2.0})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, RunResults, list[TaskView], list[Path]]:
    root = tmp_path_factory.mktemp("plots")
    views = [_view(root / "data", 0, "bottle", with_masks=True, seed=0), _view(root / "data", 1, "mono", with_masks=False, seed=1)]
    results = _results()
    run_dir = root / "run"
    files = write_run_plots(run_dir, results, views, image_size=S, panels_per_task=3)
    return run_dir, results, views, files


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        size = im.size
        # not a blank canvas: a readable figure has many distinct colours
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)  # (H, W, 3)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        assert len(np.unique(packed)) > 20, path.name
    assert min(size) >= 250, f"{path.name} is too small to read: {size}"
    return size


def test_every_promised_file_is_a_valid_png(run) -> None:
    run_dir, _, _, files = run
    expected = {"heatmap_image_auroc.png", "heatmap_pixel_ap.png", "loss_curves.png", "roc_all.png"}
    for stem in ("0_bottle", "1_mono"):
        expected |= {f"roc_{stem}.png", f"hist_{stem}.png", f"panels_{stem}.png"}
    assert {f.name for f in files} == expected
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == expected  # and nothing else (no temp files)
    for f in files:
        assert f.parent == run_dir / "plots"
        _check_png(f)


def test_mask_column_only_when_masks_exist(run) -> None:
    run_dir, _, _, _ = run
    assert panel_columns(True) == ["image", "anomaly map", "overlay", "ground truth"]
    assert panel_columns(False) == ["image", "anomaly map", "overlay"]
    w_mask, h_mask = _check_png(run_dir / "plots" / "panels_0_bottle.png")
    w_none, h_none = _check_png(run_dir / "plots" / "panels_1_mono.png")
    assert h_mask == h_none  # same number of rows (3 most + 3 least anomalous)
    # one column less: about 3/4 of the width (the figure width is proportional to the columns)
    assert w_none < w_mask * 0.85


def test_panel_rows_pick_extremes_without_repeats() -> None:
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.0, 1.0])
    assert panel_rows(scores, 2) == [("most anomalous #1", 1), ("most anomalous #2", 3),
                                     ("least anomalous #1", 2), ("least anomalous #2", 4)]
    rows = panel_rows(scores[:3], 2)  # fewer than 2k images: each shown once
    assert sorted(i for _, i in rows) == [0, 1, 2]


def test_optional_figures_are_left_out(tmp_path: Path, run) -> None:
    _, _, views, _ = run
    files = write_run_plots(tmp_path, _results(with_train=False, with_pixels=False), views[1:], image_size=S, panels_per_task=0)
    names = {f.name for f in files}
    assert "heatmap_pixel_ap.png" not in names  # no pixel AP anywhere (no masks)
    assert "loss_curves.png" not in names  # no training losses (an `evaluate` run)
    assert not any(n.startswith("panels_") for n in names)
    assert {"heatmap_image_auroc.png", "roc_all.png", "roc_1_mono.png", "hist_1_mono.png"} <= names


def test_report_html_is_self_contained(run) -> None:
    run_dir, results, _, files = run
    (run_dir / "config.yaml").write_text("data:\n  image_size: 32\n")
    path = write_report_html(run_dir, results)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("<table>") >= 3  # tasks, final, per-step tables
    assert "<th>Img AUROC</th>" in page and "<strong>" in page  # header cells; the bold mean row
    assert "bottle" in page and "mono" in page
    for f in files:  # every PNG embedded as a data URI, byte for byte
        assert f'src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}"' in page, f.name
    assert page.count("data:image/png;base64,") == len(files)
    assert re.search(r"https?://", page) is None
    assert "<script" not in page and "<link" not in page
    assert re.findall(r'src="(?!data:)', page) == []
    assert "feature extraction: 3.0 s" in page and "image_size: 32" in page
    # the page shows the same tables as results.md, rendered from the same data
    assert html_table(final_table(results)) in page
    for m in METRICS:
        if results.has_values(m.key):
            assert html_table(metric_table(results, m.key)) in page


def test_one_table_two_renderings() -> None:
    table = Table(["a", "b<c"], [["1", "2"]], footer=["Mean", ""])
    md = markdown_table(table)
    assert md.splitlines() == ["| a | b<c |", "|:---:|:---:|", "| 1 | 2 |", "| **Mean** |  |"]
    out = html_table(table)
    assert "<tr><th>a</th><th>b&lt;c</th></tr>" in out  # escaped once, in HTML only
    assert "<tr><td>1</td><td>2</td></tr>" in out
    assert "<tr><td><strong>Mean</strong></td><td></td></tr>" in out  # the footer in bold, empty cells stay empty


def test_colorize_and_overlay() -> None:
    amap = np.linspace(-1.0, 2.0, S * S, dtype=np.float32).reshape(S, S)
    rgb = colorize(amap, 0.0, 1.0)
    assert rgb.shape == (S, S, 3) and rgb.dtype == np.uint8
    cmap = colormaps[MAP_CMAP]
    low, high = np.array(cmap(0.0, bytes=True)[:3]), np.array(cmap(1.0, bytes=True)[:3])
    assert (rgb[0, 0] == low).all() and (rgb[-1, -1] == high).all()  # clipped below vmin / above vmax
    assert (colorize(np.zeros((4, 4)), 1.0, 1.0) == low).all()  # a flat scale does not divide by zero

    image = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    for alpha in (0.0, 0.5, 1.0):
        out = overlay(image, rgb, alpha)
        assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert (overlay(image, rgb, 0.0) == image).all() and (overlay(image, rgb, 1.0) == rgb).all()
    half = overlay(image, rgb, 0.5).astype(int)
    assert np.abs(half - (image.astype(int) + rgb.astype(int)) / 2).max() <= 0.5
    # a (3, S, S) float image in [0, 1], as data/ gives it, is accepted too
    assert (overlay(torch.from_numpy(image).permute(2, 0, 1).float() / 255, rgb, 0.0) == image).all()
    with pytest.raises(ValueError, match="differ in shape"):
        overlay(image[:16], rgb)


def test_save_prediction_pngs(tmp_path: Path) -> None:
    image = torch.rand(3, S, S)
    amap = np.random.default_rng(0).normal(size=(S, S)).astype(np.float32)
    m, o = tmp_path / "out" / "x_map.png", tmp_path / "out" / "x_overlay.png"
    save_prediction_pngs(image, amap, -1.0, 1.0, m, o)
    for p in (m, o):
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(p) as im:
            assert im.size == (S, S) and im.mode == "RGB"
    assert (np.asarray(Image.open(m)) == colorize(amap, -1.0, 1.0)).all()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_map.png", "x_overlay.png"]  # no temp files left


def test_task_view_checks_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task 3"):
        TaskView(task=3, name="x", labels=np.zeros(4), scores=np.zeros(3), threshold=0.0, paths=["a"] * 4,
                 maps=np.zeros((4, S, S)), masks=None, routed=np.zeros(4))
