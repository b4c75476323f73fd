"""Damaged, swapped, foreign or hand-edited files of a model and of its exports are refused with one line.

Every case damages a copy (flip a byte, truncate, swap two files, put another model's file or export in,
edit the manifest) and runs `moleflow predict` on it: exit code 2, one line naming the file, no traceback.
A clean copy predicts exactly as the original.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import CONFIGS
from moleflow import Detector
from moleflow.cli import main
from moleflow.integrity import sealed_json

pytestmark = pytest.mark.slow


def _images(root: Path) -> list[str]:
    return [str(sorted((root / cls / "test" / "hole").glob("*.png"))[0]) for cls in ("bottle", "grid")]


@pytest.fixture(scope="module")
def foreign_model(striped_root, tmp_path_factory) -> Path:
    """Another model of the same products (another seed): its files are well-formed, but not ours."""
    out = tmp_path_factory.mktemp("foreign") / "run"
    Detector.fit(CONFIGS / "smoke.yaml", out, [f"data.root={striped_root}", "scenario.tasks=[[bottle],[grid]]", "train.seed=7"])
    return out / "model"


@pytest.fixture(scope="module")
def exports(trained_model, foreign_model, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("exports")
    for name, model, fmt in (("onnx", trained_model, "onnx"), ("openvino", trained_model, "openvino"),
                             ("foreign", foreign_model, "onnx")):
        assert main(["--quiet", "export", str(model), "--out", str(base / name), "--format", fmt]) == 0
    return {name: base / name for name in ("onnx", "openvino", "foreign")}


def _predict(capsys, model: Path, images: list[str], out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["--quiet", "predict", str(model), *images, "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def _refused(rc: int, err: str, *names: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("moleflow predict: error: ")
    assert any(n in lines[0] for n in names), lines[0]


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)


def _edit_manifest(model: Path, change: Callable[[dict], None], reseal: bool = False) -> None:
    """Change manifest.json by hand: sealed again only with `reseal` (a writer's bug, not an edit)."""
    m = json.loads((model / "manifest.json").read_text())
    change(m)
    text = sealed_json({k: v for k, v in m.items() if k != "digest"}) if reseal else json.dumps(m, indent=2)
    (model / "manifest.json").write_text(text)


def _unsealed(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """A manifest written before manifests carried a digest, with `change`: the values are still checked."""
    def edit(m: dict) -> None:
        m.pop("digest")
        change(m)
    return edit


def _set_task(key: str, value) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        m["tasks"][0][key] = value
    return change


MODEL_CASES = {
    "flip shared": (lambda m, f: _flip(m / "shared.safetensors"), "shared.safetensors"),
    "flip task": (lambda m, f: _flip(m / "task_001.safetensors", 0.9), "task_001.safetensors"),
    "truncate task": (lambda m, f: _truncate(m / "task_000.safetensors"), "task_000.safetensors"),
    "swap tasks": (lambda m, f: _swap(m / "task_000.safetensors", m / "task_001.safetensors"), "task_00"),
    "foreign task": (lambda m, f: shutil.copy(f / "task_001.safetensors", m / "task_001.safetensors"), "task_001.safetensors"),
    "foreign shared": (lambda m, f: shutil.copy(f / "shared.safetensors", m / "shared.safetensors"), "shared.safetensors"),
    "edit threshold": (lambda m, f: _edit_manifest(m, _set_task("threshold", 9.19)), "manifest.json"),
    "flip manifest": (lambda m, f: _flip(m / "manifest.json", 0.3), "manifest.json"),
    "legacy NaN threshold": (lambda m, f: _edit_manifest(m, _unsealed(_set_task("threshold", float("nan")))), "threshold"),
    "legacy null threshold": (lambda m, f: _edit_manifest(m, _unsealed(_set_task("threshold", None))), "threshold"),
    "legacy text threshold": (lambda m, f: _edit_manifest(m, _unsealed(_set_task("threshold", "abc"))), "threshold"),
    "legacy absolute file": (lambda m, f: _edit_manifest(m, _unsealed(_set_task("file", "/etc/passwd"))), "/etc/passwd"),
    "legacy parent file": (lambda m, f: _edit_manifest(m, _unsealed(_set_task("file", "../x.safetensors"))), "../x"),
    "resealed swapped indices": (lambda m, f: _edit_manifest(m, lambda d: d["tasks"].reverse(), reseal=True), "index"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_damaged_model_is_refused_with_one_line(case, trained_model, foreign_model, striped_root, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    damage, name = MODEL_CASES[case]
    damage(model, foreign_model)
    _refused(*_predict(capsys, model, _images(striped_root), tmp_path / "out"), name)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


EXPORT_CASES = {
    "onnx flip backbone": ("onnx", lambda e, f: _flip(e / "backbone.onnx"), "backbone.onnx"),
    "onnx flip task": ("onnx", lambda e, f: _flip(e / "task_000.onnx", 0.8), "task_000.onnx"),
    "onnx truncate backbone": ("onnx", lambda e, f: _truncate(e / "backbone.onnx"), "backbone.onnx"),
    "onnx swap tasks": ("onnx", lambda e, f: _swap(e / "task_000.onnx", e / "task_001.onnx"), "task_00"),
    "onnx foreign task": ("onnx", lambda e, f: shutil.copy(f / "task_001.onnx", e / "task_001.onnx"), "task_001.onnx"),
    "onnx edit manifest": ("onnx", lambda e, f: _edit_json(e / "export.json", lambda d: d.update(image_size=32)), "export.json"),
    "onnx legacy manifest": ("onnx", lambda e, f: _edit_json(e / "export.json", lambda d: d.pop("digest")), "export.json"),
    "onnx another model's export": ("onnx", lambda e, f: _replace_dir(e, f), "another model"),
    "openvino flip backbone weights": ("openvino", lambda e, f: _flip(e / "backbone.bin"), "backbone.bin"),
    "openvino flip task xml": ("openvino", lambda e, f: _flip(e / "task_001.xml", 0.7), "task_001.xml"),
    "openvino swap task weights": ("openvino", lambda e, f: _swap(e / "task_000.bin", e / "task_001.bin"), "task_00"),
}


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))


def _replace_dir(dst: Path, src: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_a_damaged_export_is_refused_with_one_line(case, trained_model, exports, striped_root, tmp_path, capsys):
    kind, damage, name = EXPORT_CASES[case]
    export = tmp_path / "export"
    shutil.copytree(exports[kind], export)
    damage(export, exports["foreign"])
    out = tmp_path / "out"
    _refused(*_predict(capsys, trained_model, _images(striped_root), out, "--runtime", kind, "--export", str(export)), name)


@pytest.mark.parametrize("kind", ["torch", "onnx", "openvino"])
def test_a_clean_copy_predicts_exactly_as_the_original(kind, trained_model, exports, striped_root, tmp_path, capsys):
    model, export = tmp_path / "model", tmp_path / "export"
    shutil.copytree(trained_model, model)
    extra = [] if kind == "torch" else ["--runtime", kind, "--export", str(export)]
    if kind != "torch":
        shutil.copytree(exports[kind], export)
    images = _images(striped_root)
    original = [] if kind == "torch" else ["--runtime", kind, "--export", str(exports[kind])]
    assert _predict(capsys, trained_model, images, tmp_path / "a", *original)[0] == 0
    assert _predict(capsys, model, images, tmp_path / "b", *extra)[0] == 0
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()


def test_exporting_into_a_damaged_export_is_refused_not_completed(trained_model, exports, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(exports["onnx"], export)
    _edit_json(export / "export.json", lambda d: d.update(opset=11))
    capsys.readouterr()
    assert main(["--quiet", "export", str(trained_model), "--out", str(export)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be completed" in err and "export into an empty folder" in err, err
