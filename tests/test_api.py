"""The Python API: Detector.fit / load / predict / add_task, on every kind of image input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow import Detector, Prediction
from moleflow.config import ConfigError
from moleflow.data import DatasetError


@pytest.fixture(scope="module")
def detector(trained_model) -> Detector:
    return Detector.load(trained_model)


def _test_images(root: Path, cls: str) -> list[Path]:
    return sorted((root / cls / "test").rglob("*.png"))


def test_every_input_kind_gives_the_same_answer(detector, striped_root):
    path = _test_images(striped_root, "grid")[0]
    by_path = detector.predict(path)
    assert isinstance(by_path, Prediction) and by_path.source == str(path)
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    tensor = detector.to_tensor(path)
    for other in (detector.predict(pil), detector.predict(arr), detector.predict(tensor), detector.predict(str(path))):
        assert (other.task, other.classes, other.threshold, other.anomalous) == (by_path.task, by_path.classes, by_path.threshold, by_path.anomalous)
        assert other.score == pytest.approx(by_path.score, rel=1e-5)
        np.testing.assert_allclose(other.anomaly_map, by_path.anomaly_map, rtol=1e-5, atol=1e-5)
    assert by_path.anomaly_map.shape == (detector.image_size, detector.image_size)


def test_a_batch_is_routed_per_image_without_a_task_id(detector, striped_root):
    paths = _test_images(striped_root, "bottle")[:3] + _test_images(striped_root, "grid")[:3]
    preds = detector.predict(paths)
    assert [p.classes for p in preds] == [("bottle",)] * 3 + [("grid",)] * 3
    batch = torch.stack([detector.to_tensor(p) for p in paths])  # (6, 3, S, S)
    assert [p.task for p in detector.predict(batch)] == [p.task for p in preds]
    for p in preds:
        assert p.anomalous == (p.score > p.threshold) and p.threshold == detector.tasks[p.task].threshold
        assert p.map_range[0] < p.map_range[1]


def test_defects_score_above_good_images(detector, striped_root):
    preds = detector.predict(_test_images(striped_root, "bottle"))
    good = [p.score for p in preds if "/good/" in p.source]
    bad = [p.score for p in preds if "/hole/" in p.source]
    assert min(bad) > max(good)


def test_bad_inputs_name_the_problem(detector, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        detector.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        detector.predict(torch.zeros(3, 10, 10))
    with pytest.raises(TypeError, match="cannot read an image from int"):
        detector.predict(3)
    with pytest.raises(ValueError, match=r"empty \(0 x 0 pixels\)"):
        detector.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*1e\+06"):
        detector.predict(torch.full((3, 64, 64), 1e6))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        detector.predict(torch.full((3, 64, 64), float("nan")))
    with pytest.raises(DatasetError, match="is a folder, not an image file"):
        detector.predict(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        detector.predict(broken)


def test_add_task_learns_a_product_from_its_images_only(trained_model, striped_root, tmp_path):
    model = tmp_path / "run" / "model"
    shutil.copytree(trained_model, model)
    det = Detector.load(model)
    before = [(r.file, r.sha256) for r in det.tasks]
    det.add_task(["screw"], dataset="mvtec", root=striped_root)
    assert [r.classes for r in det.tasks] == [["bottle"], ["grid"], ["screw"]]
    assert [(r.file, r.sha256) for r in Detector.load(model).tasks][:2] == before  # old task files untouched
    assert det.predict(_test_images(striped_root, "screw")[0]).classes == ("screw",)


def test_fit_needs_a_saved_model(tmp_path, striped_root):
    with pytest.raises(ConfigError, match="save_model"):
        Detector.fit(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml", tmp_path / "r",
                     [f"data.root={striped_root}", "output.save_model=false"])


def test_reported_error_rates_are_the_verdicts_the_detector_gives(trained_model, striped_root):
    """results.json's false-alarm and miss rates are what predict says about the same test images."""
    import json

    results = json.loads((trained_model.parent / "results.json").read_text())
    det = Detector.load(trained_model)
    train = results["steps"][-1]
    for entry in train["per_task"]:
        preds = det.predict(_test_images(striped_root, entry["classes"][0]))
        good = [p.anomalous for p in preds if "/good/" in p.source]
        bad = [p.anomalous for p in preds if "/good/" not in p.source]
        assert entry["false_alarm_rate"] == pytest.approx(sum(good) / len(good))
        assert entry["miss_rate"] == pytest.approx(1 - sum(bad) / len(bad))
    # the shipped task trains on all 10 training images; 2 calibration shares of 3, each scored by a fold model
    assert all(s["train"]["n_calibration"] == 6 and s["train"]["calibration_folds"] == 2 for s in results["steps"])
    assert all(s["train"]["n_train"] == 10 for s in results["steps"])


def test_a_model_saved_before_local_avg_at_existed_loads_with_its_own_features(striped_root, tmp_path):
    """Models saved before `backbone.local_avg_at` averaged on the merged grid; their manifest lacks the
    key and names the descriptor "mean+log_rms". They must load with those features, not today's default."""
    import json

    from helpers import CONFIGS

    Detector.fit(CONFIGS / "smoke.yaml", tmp_path / "run",
                 [f"data.root={striped_root}", "scenario.tasks=[[bottle],[grid]]", "backbone.local_avg_at=merged"])
    model = tmp_path / "run" / "model"
    images = _test_images(striped_root, "bottle")[:2] + _test_images(striped_root, "grid")[:2]
    expected = Detector.load(model).predict(images)
    path = model / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["backbone"]["local_avg_at"], manifest["config"]["backbone"]["local_avg_at"]
    manifest["backbone"]["descriptor"] = "mean+log_rms"
    del manifest["digest"]  # manifests of that time carried no digest
    path.write_text(json.dumps(manifest))
    old = Detector.load(model)
    assert old.system.cfg.backbone.local_avg_at == "merged"
    for got, want in zip(old.predict(images), expected):
        assert (got.task, got.anomalous) == (want.task, want.anomalous) and got.score == pytest.approx(want.score, rel=1e-6)
