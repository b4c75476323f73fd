"""The demo's path on real ELPV cells (package data), shrunk: 64 px, 6 training images, 1 epoch."""
import json

from moleflow.cli import main

from helpers import write_striped_class


def test_demo_runs_with_an_added_mvtec_class(tmp_path, capsys):
    write_striped_class(tmp_path / "data", "bottle", (200, 60, 40), seed=1)
    out = tmp_path / "run"
    code = main(["--quiet", "demo", "--out", str(out), "--add", str(tmp_path / "data" / "bottle"),
                 "data.image_size=64", "data.max_train_images=6", "train.epochs=1", "model.coupling_blocks=2",
                 "model.lora_rank=4", "model.dia_blocks=1", "model.context_kernel=3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Img AUROC per task after each step" in printed and "run directory" in printed and "demo took" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["tasks"] == [["mono"], ["poly"], ["bottle"]]
    last = r["steps"][-1]["per_task"]
    assert last[0]["pixel_ap"] is None and last[1]["pixel_ap"] is None  # ELPV has no masks: no faked pixel metrics
    assert last[2]["pixel_ap"] is not None
    for name in ("report.html", "plots/heatmap_image_auroc.png", "plots/heatmap_pixel_ap.png", "plots/roc_all.png",
                 "plots/hist_0_mono.png", "plots/panels_2_bottle.png", "model/task_002.safetensors"):
        assert (out / name).is_file(), name


def test_demo_add_must_be_an_mvtec_class_folder(tmp_path, capsys):
    assert main(["--quiet", "demo", "--out", str(tmp_path / "r"), "--add", str(tmp_path)]) == 2
    assert "not an MVTec-layout class folder" in capsys.readouterr().err
