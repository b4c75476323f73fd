"""`moleflow export`: ONNX files that route and score as the PyTorch model does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from moleflow import Detector  # noqa: E402
from moleflow.cli import main  # noqa: E402
from moleflow.continual.jobs import run_add_task  # noqa: E402


def _images(root: Path) -> list[Path]:
    return sorted(p for cls in ("bottle", "grid", "screw") for p in (root / cls / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["--quiet", "export", str(trained_model), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_scores_equal_pytorchs_for_every_task(trained_model, exported, striped_root, runtime):
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[runtime])
    torch_det, onnx_det = Detector.load(trained_model), Detector.load(trained_model, runtime=runtime, export_dir=exported)
    paths = _images(striped_root)
    ref, got = torch_det.predict(paths), onnx_det.predict(paths)
    assert {p.task for p in ref} >= {0, 1}  # both tasks are exercised
    for a, b in zip(ref, got):
        assert (a.task, a.anomalous) == (b.task, b.anomalous)  # routing and verdict identical
        if a.task is None:
            continue
        assert b.score == pytest.approx(a.score, rel=1e-4)
        scale = max(1.0, float(np.abs(a.anomaly_map).max()))  # float32 maps: the tolerance follows their scale
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3 * scale


def test_export_after_add_task_writes_only_the_new_task(trained_model, striped_root, tmp_path):
    model = tmp_path / "run" / "model"
    shutil.copytree(trained_model, model)
    out = tmp_path / "onnx"
    assert main(["--quiet", "export", str(model), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.onnx")}
    run_add_task(model, [["mvtec:screw"]], {"mvtec": str(striped_root)}, tmp_path / "add", progress=False, echo=lambda _: None)
    with pytest.raises(Exception, match=r"lacks the tasks \[2\] of the model; export this model again"):
        Detector.load(model, runtime="onnx", export_dir=out)
    assert main(["--quiet", "export", str(model), "--out", str(out)]) == 0
    after = {p.name: p.read_bytes() for p in out.glob("*.onnx")}
    assert set(after) - set(before) == {"task_002.onnx"}
    assert all(after[name] == data for name, data in before.items())  # earlier files byte-identical
    manifest = json.loads((out / "export.json").read_text())
    assert [t["classes"] for t in manifest["tasks"]] == [["bottle"], ["grid"], ["screw"]]
    screw = sorted((striped_root / "screw" / "test" / "good").glob("*.png"))[0]
    assert Detector.load(model, runtime="onnx", export_dir=out).predict(screw).classes == ("screw",)


def test_predict_cli_with_the_onnx_runtime(trained_model, exported, striped_root, tmp_path):
    imgs = [str(p) for p in _images(striped_root)[:4]]
    assert main(["--quiet", "predict", str(trained_model), *imgs, "--out", str(tmp_path / "t")]) == 0
    assert main(["--quiet", "predict", str(trained_model), *imgs, "--out", str(tmp_path / "o"), "--runtime", "onnx",
                 "--export", str(exported)]) == 0
    rows = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in ("t", "o")]
    for a, b in zip(*rows):
        assert (a["task"], a["anomalous"]) == (b["task"], b["anomalous"])
        assert b["image_score"] == pytest.approx(a["image_score"], rel=1e-4)


def test_openvino_format_writes_ir_that_scores_alone(trained_model, striped_root, tmp_path):
    pytest.importorskip("openvino")
    model = tmp_path / "run" / "model"
    shutil.copytree(trained_model, model)
    out = tmp_path / "ov"
    assert main(["--quiet", "export", str(model), "--out", str(out), "--format", "openvino"]) == 0
    assert {p.name for p in out.glob("*.xml")} == {"backbone.xml", "task_000.xml", "task_001.xml"}
    paths = _images(striped_root)
    ref = Detector.load(model).predict(paths)
    for p in out.glob("*.onnx"):
        p.rename(p.with_suffix(".onnx.away"))  # the OpenVINO runtime must use the IR, not the ONNX files
    got = Detector.load(model, runtime="openvino", export_dir=out).predict(paths)
    for a, b in zip(ref, got):
        assert (a.task, a.anomalous) == (b.task, b.anomalous)
        if a.task is not None:
            assert b.score == pytest.approx(a.score, rel=1e-4)
    for p in out.glob("*.onnx.away"):
        p.rename(p.with_suffix(""))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".onnx", ".xml", ".bin")}
    run_add_task(model, [["mvtec:screw"]], {"mvtec": str(striped_root)}, tmp_path / "add", progress=False, echo=lambda _: None)
    assert main(["--quiet", "export", str(model), "--out", str(out), "--format", "openvino"]) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".onnx", ".xml", ".bin")}
    assert set(after) - set(before) == {"task_002.onnx", "task_002.xml", "task_002.bin"}
    assert all(after[name] == data for name, data in before.items())  # earlier files byte-identical
