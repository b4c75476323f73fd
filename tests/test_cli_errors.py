"""Every user mistake or numerical fault ends in one line that says what is wrong and how to fix it,
exit code 2, no traceback (issue 8, the command line)."""

import json
import shutil
from pathlib import Path

import pytest

from moleflow.features.backbone import FeatureExtractor
from moleflow.cli import main

from helpers import CONFIGS, write_striped_class

SMOKE = str(CONFIGS / "smoke.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = base / "data"
    write_striped_class(root, "bottle", (200, 60, 40), seed=1)
    (base / "junk.png").write_bytes(b"not an image")
    (base / "bad.yaml").write_text("train:\n  epochs: [1\n")
    (base / "empty").mkdir()
    assert main(["--quiet", "fit", SMOKE, f"data.root={root}", "scenario.tasks=[[bottle]]", "output.plots=false",
                 "--out", str(base / "run")]) == 0
    return base


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(["--quiet", *argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("moleflow ") and "error:" in err and "\n" not in err and "Traceback" not in err, err
    return err


# (arguments with {base} for the fixture folder, text the message must hold: the fault and the fix)
CASES = {
    "unknown key": (["fit", SMOKE, "train.lrr=1"], ["unknown config key 'train.lrr'", "known keys of train"]),
    "wrong type": (["fit", SMOKE, "train.epochs=abc"], ["'train.epochs' must be an integer", "'abc'"]),
    "out of range": (["fit", SMOKE, "train.lr=-1"], ["train.lr must be > 0"]),
    "missing config": (["fit", "{base}/nosuch.yaml"], ["does not exist", "examples in configs/"]),
    "invalid yaml": (["fit", "{base}/bad.yaml"], ["not valid YAML at line 3", "fix the syntax"]),
    "unknown dataset": (["fit", SMOKE, "data.dataset=foo", "scenario.tasks=[[bottle]]"], ["unknown dataset 'foo'", "known datasets"]),
    "unknown class": (["fit", SMOKE, "scenario.tasks=[[nosuch]]", "data.root={base}/data", "--out", "{base}/r1"],
                      ["unknown mvtec class 'nosuch'", "known classes"]),
    "missing root": (["fit", SMOKE, "scenario.tasks=[[bottle]]", "data.root={base}/nowhere", "--out", "{base}/r2"],
                     ["(data.root) does not exist"]),
    "no CUDA": (["fit", SMOKE, "train.device=cuda:0", "scenario.tasks=[[bottle]]", "data.root={base}/data", "--out", "{base}/r3"],
                ["no CUDA device", "use device 'cpu' or 'auto'"]),
    "unknown backbone": (["fit", SMOKE, "backbone.name=resnet999", "scenario.tasks=[[bottle]]", "data.root={base}/data", "--out", "{base}/r4"],
                         ["not a timm model", "timm.list_models()"]),
    "resume other config": (["fit", SMOKE, "scenario.tasks=[[bottle]]", "data.root={base}/data", "output.plots=false",
                             "train.lr=0.5", "--out", "{base}/run", "--resume"], ["another config", "use a new --out"]),
    "not a model dir": (["evaluate", "{base}"], ["not a model directory", "give the 'model' folder"]),
    "class already learned": (["add-task", "{base}/run/model", "--dataset", "mvtec", "--root", "{base}/data", "--classes", "bottle"],
                              ["already a task", "classes the model has not learned"]),
    "predict missing file": (["predict", "{base}/run/model", "{base}/nosuch.png", "--out", "{base}/p1"], ["nosuch.png does not exist"]),
    "predict junk file": (["predict", "{base}/run/model", "{base}/junk.png", "--out", "{base}/p2"],
                          ["cannot read image", "junk.png", "--skip-bad"]),
    "predict export without manifest": (["predict", "{base}/run/model", "{base}/data/bottle/test/good", "--out", "{base}/p4",
                                         "--runtime", "onnx", "--export", "{base}/empty"],
                                        ["not a moleflow export", "export.json is missing", "moleflow export MODEL"]),
    "export of no model": (["export", "{base}/empty", "--out", "{base}/e1"], ["not a model directory"]),
    "threshold of no model": (["threshold", "{base}/empty", "--task", "0", "--value", "1"], ["not a model directory"]),
    "predict empty folder": (["predict", "{base}/run/model", "{base}/empty", "--out", "{base}/p3"], ["holds no image files"]),
    "grid bad vary": (["grid", SMOKE, "--vary", "train.lr", "--out", "{base}/g"], ["must look like key=v1,v2"]),
    "report nothing": (["report", "{base}/nowhere"], ["no finished run", "moleflow fit"]),
    "analyze not a run": (["analyze", "tail", "{base}", "{base}/run"], ["not a finished run directory", "moleflow fit"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_with_a_fix(case, setup, capsys):
    argv, expected = CASES[case]
    err = _one_line_error(capsys, [a.replace("{base}", str(setup)) for a in argv])
    for text in expected:
        assert text in err, (case, err)


def test_unreadable_training_image_suggests_skip_bad(setup, tmp_path, capsys):
    root = tmp_path / "data"
    write_striped_class(root, "bottle", (200, 60, 40), seed=1)
    (root / "bottle/train/good/999.png").write_bytes(b"\x89PNG junk")
    err = _one_line_error(capsys, ["fit", SMOKE, f"data.root={root}", "scenario.tasks=[[bottle]]", "--out", str(tmp_path / "r")])
    assert "999.png" in err and "--skip-bad" in err


def _scaled_backbone(monkeypatch, factor: float) -> None:
    forward = FeatureExtractor.forward

    def scaled(self, images):
        patches, desc = forward(self, images)
        return patches * factor, desc

    monkeypatch.setattr(FeatureExtractor, "forward", scaled)


def test_float16_cache_overflow_through_the_cli(setup, tmp_path, capsys, monkeypatch):
    """Features beyond float16's range are refused with the image named, not cached as inf."""
    _scaled_backbone(monkeypatch, 1e6)
    cache = tmp_path / "cache"
    err = _one_line_error(capsys, ["fit", SMOKE, f"data.root={setup / 'data'}", "scenario.tasks=[[bottle]]",
                                   f"backbone.cache_dir={cache}", "--out", str(tmp_path / "r")])
    assert "beyond float16" in err and ".png" in err and "backbone.cache_dir" in err
    assert not list(cache.rglob("*.safetensors"))


def test_non_finite_features_in_predict_name_the_file(setup, tmp_path, capsys, monkeypatch):
    _scaled_backbone(monkeypatch, float("nan"))
    image = next((setup / "data/bottle/test/good").glob("*.png"))
    err = _one_line_error(capsys, ["predict", str(setup / "run/model"), str(image), "--out", str(tmp_path / "p")])
    assert "non-finite backbone features" in err and image.name in err
    assert not (tmp_path / "p/predictions.jsonl").exists()


def test_failed_fit_leaves_no_run_directory_behind(setup, tmp_path, capsys):
    out = tmp_path / "new-run"
    _one_line_error(capsys, ["fit", SMOKE, f"data.root={setup}/empty", "scenario.tasks=[[bottle]]", "--out", str(out)])
    assert not out.exists()  # created for the run (config.yaml), removed with the error
    kept = tmp_path / "existing"
    kept.mkdir()
    _one_line_error(capsys, ["fit", SMOKE, f"data.root={setup}/empty", "scenario.tasks=[[bottle]]", "--out", str(kept)])
    assert kept.is_dir()  # a folder the user had is never removed


def test_predict_skip_bad_leaves_junk_out_and_lists_it(setup, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(setup / "data/bottle/test/good", images)
    (images / "zz_junk.png").write_bytes(b"not an image")
    (images / "zz_truncated.png").write_bytes((images / "000.png").read_bytes()[:200])
    out = tmp_path / "p"
    assert main(["--quiet", "predict", str(setup / "run/model"), str(images), "--out", str(out), "--skip-bad"]) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(not x["path"].endswith(("zz_junk.png", "zz_truncated.png")) for x in lines)
    assert sorted(Path(x["path"]).name for x in skipped) == ["zz_junk.png", "zz_truncated.png"]
    assert all("cannot read" in x["reason"] for x in skipped)
    assert "2 unreadable file(s) left out" in capsys.readouterr().out
