"""`moleflow report`: ranking, mean ± std over seeds, groups kept apart, baseline deltas, skipped runs."""
import json
import statistics
from pathlib import Path

import pytest

from moleflow.research.compare import compare_runs
from moleflow.results.rundir import DONE_MARKER, GRID_FILE
from moleflow.config import ConfigError, load_config, save_config

def make_run(path: Path, overrides: list[str], image_auroc: float | None, pixel_ap: float | None = 0.5,
             tasks: int = 1, steps: int = 1) -> Path:
    """A run directory as run_fit leaves it: config.yaml (every key) and results.json."""
    path.mkdir(parents=True)
    save_config(load_config(None, overrides), path / "config.yaml")
    final = {"image_auroc": image_auroc, "pixel_auroc": 0.9, "pixel_ap": pixel_ap, "aupro": None,
             "routing_accuracy": 1.0, "forgetting": {}}
    results = {"tasks": [[f"c{i}"] for i in range(tasks)],
               "steps": [{"after_task": i, "per_task": []} for i in range(steps)], "final": final}
    (path / "results.json").write_text(json.dumps(results))
    return path


def table_after(md: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table after the line starting with `heading`."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(heading))
    rows = []
    for ln in lines[start + 1 :]:
        if ln.startswith("|"):
            rows.append([c.strip() for c in ln.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and alignment rows dropped


def test_ranked_by_image_auroc_with_varying_key_as_label(tmp_path):
    runs = [make_run(tmp_path / f"tw{w}", [f"loss.tail_weight={w}"], auc) for w, auc in ((0, 0.90), (0.5, 0.95), (0.7, 0.80))]
    md = compare_runs(runs, [], None)
    rows = table_after(md, "## Group 1")
    assert [r[1] for r in rows] == ["loss.tail_weight=0.5", "loss.tail_weight=0.0", "loss.tail_weight=0.7"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][2:] == ["0.9500", "0.9000", "0.5000", "-", "1.0000", "1"]


def test_seeds_are_one_setting_with_mean_and_sample_std(tmp_path):
    aucs = [0.90, 0.92, 0.97]
    runs = [make_run(tmp_path / f"a_s{s}", ["loss.tail_weight=0.7", f"train.seed={s}", f"output.plots={s == 0}",
                                            f"backbone.cache_dir=/cache{s}"], auc, pixel_ap=0.4 + s / 10)
            for s, auc in enumerate(aucs)]
    runs.append(make_run(tmp_path / "b", ["loss.tail_weight=0"], 0.91))
    rows = table_after(compare_runs(runs, [], None), "## Group 1")
    assert len(rows) == 2
    mean, std = statistics.mean(aucs), statistics.stdev(aucs)  # ddof=1
    assert rows[0][1] == "loss.tail_weight=0.7"
    assert rows[0][2] == f"{mean:.4f} ± {std:.4f}"
    assert rows[0][4] == f"{statistics.mean([0.4, 0.5, 0.6]):.4f} ± {statistics.stdev([0.4, 0.5, 0.6]):.4f}"
    assert rows[0][-1] == "3"
    assert rows[1][2] == "0.9100" and rows[1][-1] == "1"  # one seed: no ±


def test_groups_are_kept_apart_and_baseline_only_in_its_group(tmp_path):
    g1 = [make_run(tmp_path / n, ["train.lr=2e-4", "loss.lambda_logdet=1e-5", f"model.dia_blocks={d}"], auc, ap)
          for n, d, auc, ap in (("base", 4, 0.9793, 0.4735), ("dia6", 6, 0.9820, 0.4606), ("dia7", 7, 0.9830, 0.4580))]
    g2 = [make_run(tmp_path / n, ["train.lr=3e-4", "loss.lambda_logdet=1e-4", f"model.dia_blocks={d}"], auc)
          for n, d, auc in (("main", 4, 0.9829), ("main_dia5", 5, 0.9836))]
    md = compare_runs(g1 + g2, ["train.lr", "loss.lambda_logdet"], "base")
    assert "Grouped by: train.lr, loss.lambda_logdet" in md
    overview = table_after(md, "Grouped by")
    assert overview == [["1", "0.0002", "1e-05", "3", "3"], ["2", "0.0003", "0.0001", "2", "2"]]
    group1 = table_after(md, "## Group 1: train.lr=0.0002, loss.lambda_logdet=1e-05")
    group2 = table_after(md, "## Group 2: train.lr=0.0003, loss.lambda_logdet=0.0001")
    assert [r[1] for r in group1] == ["model.dia_blocks=7", "model.dia_blocks=6", "model.dia_blocks=4"]
    assert [r[1] for r in group2] == ["model.dia_blocks=5", "model.dia_blocks=4"]
    deltas = table_after(md, "### Δ against model.dia_blocks=4")
    assert deltas[0] == ["model.dia_blocks=4 (baseline)", "0.9793", "0.4735", "-", "-"]
    # The notes' section 3.2: DIA 6 is +0.27 / -1.29, DIA 7 is +0.37 / -1.55 percentage points.
    assert deltas[1:] == [["model.dia_blocks=7", "0.9830", "0.4580", "+0.37", "-1.55"],
                          ["model.dia_blocks=6", "0.9820", "0.4606", "+0.27", "-1.29"]]
    assert md.count("### Δ against") == 1  # group 2 has no baseline and is never compared with it
    assert "No delta table" in md.split("## Group 2")[1]


def test_baseline_by_setting_label_gives_each_group_its_own(tmp_path):
    runs = [make_run(tmp_path / f"lr{lr}_tw{w}", [f"train.lr={lr}", f"loss.tail_weight={w}"], auc)
            for lr, w, auc in (("1e-4", 0, 0.90), ("1e-4", 0.7, 0.92), ("3e-4", 0, 0.80), ("3e-4", 0.7, 0.85))]
    md = compare_runs(runs, ["train.lr"], "loss.tail_weight=0")
    assert md.count("### Δ against loss.tail_weight=0.0") == 2
    g1, g2 = md.split("## Group 2")
    assert table_after(g1, "### Δ")[1][-2] == "+2.00"
    assert table_after(g2, "### Δ")[1][-2] == "+5.00"


def test_nulls_are_dashes_also_in_deltas(tmp_path):
    runs = [make_run(tmp_path / "a", ["loss.tail_weight=0"], 0.9, pixel_ap=None),
            make_run(tmp_path / "b", ["loss.tail_weight=0.7"], None, pixel_ap=None)]
    md = compare_runs(runs, [], "a")
    rows = table_after(md, "## Group 1")
    assert rows[0][1] == "loss.tail_weight=0.0" and rows[1][1] == "loss.tail_weight=0.7"  # null AUROC ranks last
    assert rows[1][2] == "-" and rows[0][4] == "-" and rows[0][5] == "-"
    assert table_after(md, "### Δ")[1] == ["loss.tail_weight=0.7", "-", "-", "-", "-"]


def test_missing_and_unfinished_runs_are_listed_as_skipped(tmp_path):
    good = make_run(tmp_path / "good", [], 0.9)
    partial = make_run(tmp_path / "partial", [], 0.8, tasks=3, steps=1)  # killed after the first of 3 tasks
    (tmp_path / "empty").mkdir()
    md = compare_runs([good, partial, tmp_path / "empty", tmp_path / "nowhere"], [], None)
    rows = table_after(md, "## Group 1")
    assert len(rows) == 1 and rows[0][1] == "good"
    skipped = md.split("## Skipped")[1]
    assert "partial`: unfinished" in skipped
    assert "empty`: " in skipped and "results.json is missing" in skipped
    assert "nowhere`: no such directory" in skipped


def test_grid_folder_expands_to_its_finished_runs(tmp_path):
    grid = tmp_path / "grid"
    names = ["loss.tail_weight=0__train.seed=0", "loss.tail_weight=0__train.seed=1", "loss.tail_weight=0.7__train.seed=0"]
    for i, n in enumerate(names):
        w, s = n.split("__")
        make_run(grid / n, [w, s], 0.8 + i / 10)
        (grid / n / DONE_MARKER).write_text("")
    make_run(grid / "loss.tail_weight=0.7__train.seed=1", ["loss.tail_weight=0.7", "train.seed=1"], 0.99)  # no DONE
    listing = {"runs": [{"name": n, "overrides": n.split("__")} for n in names + ["loss.tail_weight=0.7__train.seed=1"]]}
    (grid / GRID_FILE).write_text(json.dumps(listing))
    md = compare_runs([grid], [], "loss.tail_weight=0__train.seed=1")
    rows = table_after(md, "## Group 1")
    assert [(r[1], r[-1]) for r in rows] == [("loss.tail_weight=0.7", "1"), ("loss.tail_weight=0.0", "2")]
    assert rows[1][2].startswith("0.8500 ± ")
    assert "no DONE marker" in md.split("## Skipped")[1]
    assert table_after(md, "### Δ against loss.tail_weight=0.0")[1][-2] == "+15.00"
    alone = compare_runs([grid / "loss.tail_weight=0.7__train.seed=1"], [], None)  # the same run given directly
    assert "No finished runs" in alone and "no DONE marker" in alone


def test_same_run_name_in_two_folders_is_kept_apart(tmp_path):
    a = make_run(tmp_path / "g1" / "x", ["loss.tail_weight=0"], 0.9)
    b = make_run(tmp_path / "g2" / "x", ["loss.tail_weight=0.7"], 0.8)
    md = compare_runs([a, b], [], "g2/x")
    assert "g1/x" in md and "g2/x" in md
    assert "### Δ against loss.tail_weight=0.7" in md


def test_user_errors_name_the_problem(tmp_path):
    runs = [make_run(tmp_path / "a", [], 0.9)]
    with pytest.raises(ConfigError, match="train.lrr.*did you mean train.lr"):
        compare_runs(runs, ["train.lrr"], None)
    with pytest.raises(ConfigError, match="baseline 'nope' matches no run"):
        compare_runs(runs, [], "nope")
    with pytest.raises(ConfigError, match="train.seed"):
        compare_runs(runs, ["train.seed"], None)
    pairs = [make_run(tmp_path / f"p{w}{k}", [f"loss.tail_weight={w}", f"model.context_kernel={k}"], 0.9)
             for w in (0, 0.7) for k in (3, 5)]
    with pytest.raises(ConfigError, match="ambiguous.*2 settings"):
        compare_runs(pairs, [], "loss.tail_weight=0")
    assert "### Δ against loss.tail_weight=0.0, model.context_kernel=5" in compare_runs(pairs, [], "loss.tail_weight=0,model.context_kernel=5")


def test_group_by_a_list_valued_key(tmp_path):
    run = make_run(tmp_path / "r", ["model.context_kernel=3"], 0.9)
    md = compare_runs([run], ["model.context_kernel", "scenario.tasks"], None)
    assert "## Group 1: model.context_kernel=3, scenario.tasks=[]" in md


def test_results_of_an_unknown_format_version_are_skipped_with_the_reason(tmp_path):
    good = make_run(tmp_path / "good", [], 0.9)
    future = make_run(tmp_path / "future", [], 0.8)
    data = json.loads((future / "results.json").read_text())
    (future / "results.json").write_text(json.dumps({"format_version": 99, **data}))
    md = compare_runs([good, future], [], None)
    assert [r[1] for r in table_after(md, "## Group 1")] == ["good"]
    assert "future`: results.json: format_version 99 cannot be read" in md.split("## Skipped")[1]


def test_ranking_columns_are_the_registry_metrics_and_routing(tmp_path):
    from moleflow.results.schema import METRICS, ROUTING

    md = compare_runs([make_run(tmp_path / "a", [], 0.9)], [], None)
    header = next(ln for ln in md.splitlines() if ln.startswith("| Rank"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Rank", "Setting", *[m.short for m in (*METRICS, ROUTING)], "n seeds"]
