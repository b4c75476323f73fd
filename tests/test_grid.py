"""`moleflow grid`: the product of --vary × seeds, one directory per run, resume, early config errors.

Most tests inject a fake `fit` that writes a results.json whose numbers encode the config it was given,
so the test can see which overrides each run really got. One test runs the real pipeline on tiny images.
"""
import json
from pathlib import Path

import pytest

from helpers import run_results, task_entry
from moleflow.results.rundir import DONE_MARKER, GRID_FILE, RunDir
from moleflow.results.schema import RunResults
from moleflow.config import Config, ConfigError, save_config
from moleflow.research.grid import parse_seeds, parse_vary, plan_grid, run_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class FakeFit:
    """Records each call; image AUROC = 0.5 + tail_weight / 10 + seed / 100 (so a run's config is readable back)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, cfg: Config, run_dir: Path, progress: bool = True, echo=print) -> RunResults:
        run_dir = Path(run_dir)
        self.calls.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if self.fail_on == run_dir.name:
            raise RuntimeError("training diverged")
        entry = task_entry(0, ["bottle"], 0.5 + cfg.loss.tail_weight / 10 + cfg.train.seed / 100)
        entry["pixel_ap"] = cfg.train.lr
        results = run_results([["bottle"]], [{"after_task": 0, "per_task": [entry]}])
        RunDir(run_dir).save_results(results)
        return results


def _base_config(tmp_path: Path, seed: int = 7) -> Path:
    p = tmp_path / "base.yaml"
    p.write_text(f"train:\n  epochs: 1\n  seed: {seed}\nloss:\n  tail_weight: 0.5\n")
    return p


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["final"]


def test_product_of_vary_and_seeds_with_overrides_applied(tmp_path):
    fake, lines = FakeFit(), []
    out = tmp_path / "grid"
    dirs = run_grid(_base_config(tmp_path), ["loss.tail_weight=0,0.7", "train.lr=1e-4,3e-4"], [0, 1], out,
                    progress=False, echo=lines.append, fit=fake)
    assert len(dirs) == 8 == len(fake.calls)
    assert dirs[0].name == "loss.tail_weight=0__train.lr=1e-4__train.seed=0"
    assert {d.name for d in dirs} == {f"loss.tail_weight={w}__train.lr={lr}__train.seed={s}"
                                       for w in ("0", "0.7") for lr in ("1e-4", "3e-4") for s in (0, 1)}
    for d in dirs:
        assert (d / DONE_MARKER).is_file()
        w = 0.7 if "tail_weight=0.7" in d.name else 0.0
        lr = 1e-4 if "lr=1e-4" in d.name else 3e-4
        seed = int(d.name[-1])
        f = _final(d)
        assert f["image_auroc"] == pytest.approx(0.5 + w / 10 + seed / 100)
        assert f["pixel_ap"] == pytest.approx(lr)
    listing = json.loads((out / GRID_FILE).read_text())
    assert [r["name"] for r in listing["runs"]] == [d.name for d in dirs]
    assert listing["runs"][0]["overrides"] == ["loss.tail_weight=0", "train.lr=1e-4", "train.seed=0"]
    assert all(r["status"] == "done" for r in listing["runs"])
    assert sum("started" in ln for ln in lines) == 8
    assert any("done" in ln and "image AUROC 0.5000" in ln for ln in lines)  # tail_weight 0, seed 0


def test_no_seeds_keeps_the_config_seed(tmp_path):
    fake = FakeFit()
    dirs = run_grid(_base_config(tmp_path, seed=7), ["loss.tail_weight=0.7"], [], tmp_path / "g", progress=False,
                    echo=lambda s: None, fit=fake)
    assert [d.name for d in dirs] == ["loss.tail_weight=0.7"]
    assert _final(dirs[0])["image_auroc"] == pytest.approx(0.5 + 0.07 + 0.07)


def test_resume_skips_done_runs_and_restarts_unfinished_ones(tmp_path):
    cfg, out = _base_config(tmp_path), tmp_path / "g"
    run_grid(cfg, ["loss.tail_weight=0,0.7"], [0, 1], out, progress=False, echo=lambda s: None, fit=FakeFit())
    unfinished = out / "loss.tail_weight=0.7__train.seed=1"
    (unfinished / DONE_MARKER).unlink()  # as if killed after results.json of an early task
    (unfinished / "stale.txt").write_text("left over")
    fake, lines = FakeFit(), []
    dirs = run_grid(cfg, ["loss.tail_weight=0,0.7"], [0, 1], out, progress=False, echo=lines.append, fit=fake)
    assert fake.calls == [unfinished.name]
    assert not (unfinished / "stale.txt").exists()  # started from scratch
    assert (unfinished / DONE_MARKER).is_file()
    assert sum("skipped" in ln for ln in lines) == 3
    assert len(dirs) == 4


def test_failed_run_stops_the_grid_and_is_rerun_later(tmp_path):
    cfg, out = _base_config(tmp_path), tmp_path / "g"
    with pytest.raises(RuntimeError, match="diverged"):
        run_grid(cfg, ["loss.tail_weight=0,0.3,0.7"], [], out, progress=False, echo=lambda s: None,
                 fit=FakeFit(fail_on="loss.tail_weight=0.3"))
    assert not (out / "loss.tail_weight=0.7").exists()
    assert json.loads((out / GRID_FILE).read_text())["runs"][1]["status"] == "pending"
    fake = FakeFit()
    run_grid(cfg, ["loss.tail_weight=0,0.3,0.7"], [], out, progress=False, echo=lambda s: None, fit=fake)
    assert fake.calls == ["loss.tail_weight=0.3", "loss.tail_weight=0.7"]


@pytest.mark.parametrize(
    "vary, message",
    [
        (["loss.tail_weight=0,0.7", "loss.tail_weigth=0,1"], "loss.tail_weigth"),  # typo in the key
        (["loss.tail_weight=0,2"], "loss.tail_weight"),  # value out of range, in the second combination
        (["train.epochs=1,two"], "train.epochs"),
        (["model.context_kernel=4"], "model.context_kernel"),
    ],
)
def test_bad_key_or_value_fails_before_any_run(tmp_path, vary, message):
    fake = FakeFit()
    with pytest.raises(ConfigError, match=message):
        run_grid(_base_config(tmp_path), vary, [0, 1], tmp_path / "g", progress=False, echo=lambda s: None, fit=fake)
    assert fake.calls == []
    assert not (tmp_path / "g").exists()


def test_vary_and_seed_parsing_errors():
    assert parse_vary("loss.tail_weight=0,0.7") == ("loss.tail_weight", ["0", "0.7"])
    assert parse_vary("scenario.tasks=[[bottle]],[[bottle],[grid]]") == ("scenario.tasks", ["[[bottle]]", "[[bottle],[grid]]"])
    for bad in ["loss.tail_weight", "=1,2", "loss.tail_weight=0,,1", "loss.tail_weight=0.7,0.70"]:
        with pytest.raises(ConfigError):
            parse_vary(bad)
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds("") == []
    with pytest.raises(ConfigError, match="not an integer"):
        parse_seeds("0,a")
    with pytest.raises(ConfigError, match="twice"):
        plan_grid(CONFIGS / "smoke.yaml", ["train.lr=1e-4", "train.lr=3e-4"], [])
    with pytest.raises(ConfigError, match="--seeds"):
        plan_grid(CONFIGS / "smoke.yaml", ["train.seed=1,2"], [0])


def test_names_are_filesystem_safe_and_readable(tmp_path):
    runs = plan_grid(CONFIGS / "smoke.yaml", ["scenario.tasks=[[bottle]],[[bottle],[grid]]", "data.root=/a b/c,/d"], [3])
    names = [r.name for r in runs]
    assert len(set(names)) == 4
    assert names[0] == "scenario.tasks=__bottle____data.root=_a_b_c__train.seed=3"
    assert all("/" not in n and " " not in n and "[" not in n for n in names)
    assert runs[2].cfg.scenario.tasks == [["bottle"], ["grid"]] and runs[2].cfg.data.root == "/a b/c"
    assert all(r.cfg.train.seed == 3 for r in runs)
    for n in names:  # each is a creatable directory
        (tmp_path / n).mkdir()


def test_finished_run_with_another_config_is_not_reused(tmp_path):
    cfg, out = _base_config(tmp_path), tmp_path / "g"
    run_grid(cfg, ["loss.tail_weight=0"], [], out, progress=False, echo=lambda s: None, fit=FakeFit())
    cfg.write_text("train:\n  epochs: 3\n")  # the YAML was edited after the run
    fake = FakeFit()
    with pytest.raises(ConfigError, match="train.epochs"):
        run_grid(cfg, ["loss.tail_weight=0"], [], out, progress=False, echo=lambda s: None, fit=fake)
    assert fake.calls == []


def test_real_tiny_grid(tiny_mvtec, tmp_path):
    """The real run_fit on 32 px images: two tail weights, one task, one epoch."""
    lines: list[str] = []
    out = tmp_path / "grid"
    dirs = run_grid(CONFIGS / "smoke.yaml", ["loss.tail_weight=0,0.7"], [], out, progress=False, echo=lines.append,
                    overrides=[f"data.root={tiny_mvtec}", "data.image_size=32", "scenario.tasks=[[bottle]]",
                               "output.save_model=false"])
    assert [d.name for d in dirs] == ["loss.tail_weight=0", "loss.tail_weight=0.7"]
    for d, w in zip(dirs, (0.0, 0.7)):
        assert (d / DONE_MARKER).is_file()
        saved = (d / "config.yaml").read_text()
        assert f"tail_weight: {w}" in saved and "image_size: 32" in saved
        f = _final(d)
        assert 0.0 <= f["image_auroc"] <= 1.0 and f["pixel_ap"] is not None
    assert any(ln.startswith("[2/2] loss.tail_weight=0.7: done") for ln in lines)
