"""Typed results (moleflow.results.schema): the results.json layout, its version rule, skipped tasks,
and the metric registry as the one source of metric names."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import real_results, real_results_text, run_results, skipped_entry, task_entry

import moleflow.metrics
from moleflow.results.schema import (
    FORMAT_KEY,
    FORMAT_VERSION,
    METRIC_KEYS,
    METRICS,
    ROUTING,
    Metrics,
    ResultsFormatError,
    RunResults,
    TaskEval,
    get_metric,
    summarize,
)
from moleflow.results.tables import final_table, memory_weight_line, metric_table, results_markdown, step_table

REAL = ("fit", "eval", "ogp")
SRC = Path(moleflow.metrics.__file__).parent


@pytest.mark.parametrize("name", REAL)
def test_real_files_round_trip(name):
    typed = RunResults.from_json(real_results(name))
    assert RunResults.from_json(typed.to_json()) == typed
    assert RunResults.from_json(json.loads(json.dumps(typed.to_json()))) == typed


@pytest.mark.parametrize("name", REAL)
def test_written_layout_is_todays_plus_the_version_first(name):
    out = RunResults.from_json(real_results(name)).to_json()
    assert next(iter(out)) == FORMAT_KEY and out.pop(FORMAT_KEY) == FORMAT_VERSION
    assert json.dumps(out, indent=2) == real_results_text(name)  # same keys, order and values, byte for byte


@pytest.mark.parametrize("name", REAL)
def test_final_block_is_the_summary_of_the_steps(name):
    typed = RunResults.from_json(real_results(name))
    assert summarize(typed.steps) == typed.final


def test_a_file_without_version_is_version_1_and_an_unknown_version_is_refused():
    old = real_results("eval")
    assert FORMAT_KEY not in old
    assert RunResults.from_json(old) == RunResults.from_json({FORMAT_KEY: 1, **old})
    with pytest.raises(ResultsFormatError, match=r"format_version 5 cannot be read.*reads format_version 1, 2, 3 and 4.*newer moleflow"):
        RunResults.from_json({**old, FORMAT_KEY: 5})
    for bad in ("1", 1.0, None, True, 0):
        with pytest.raises(ValueError, match="format_version"):
            RunResults.from_json({**old, FORMAT_KEY: bad})


def test_unknown_or_missing_keys_are_refused_naming_the_place():
    data = real_results("fit")
    data["steps"][1]["per_task"][0]["surprise"] = 1
    with pytest.raises(ResultsFormatError, match=r"steps\[1\]\.per_task\[0\]: unknown key\(s\) surprise"):
        RunResults.from_json(data)
    data = real_results("fit")
    del data["final"]["oracle"]["aupro"]
    with pytest.raises(ResultsFormatError, match=r"final\.oracle: missing key\(s\) aupro"):
        RunResults.from_json(data)


def _with_skipped_task() -> tuple[list[dict], RunResults]:
    steps = [{"after_task": 0, "per_task": [task_entry(0, ["bottle"], 0.9, 0.8)], "train": {"epoch_loss": [1.0], "seconds": 2.0}},
             {"after_task": 1, "per_task": [skipped_entry(0, ["bottle"]), task_entry(1, ["grid"], 0.7, 0.6, routing=0.5)],
              "train": {"epoch_loss": [0.5], "seconds": 1.0, "steps": 3, "n_train": 4, "grad_norms": [{"block0": 0.1}]}}]
    skipped_files = [{"path": "grid/train/good/999.png", "reason": "cannot be read"}]
    return steps, run_results([["bottle"], ["grid"]], steps, skipped_files=skipped_files)


def test_skipped_entries_are_typed_as_skipped():
    steps, typed = _with_skipped_task()
    gone, kept = typed.steps[1].per_task
    assert not gone.evaluated and gone.skipped == "test data not available"
    assert gone.routed is gone.oracle is gone.per_class is gone.n_test is None
    assert all(gone.value(k) is None and gone.value(k, oracle=True) is None for k in METRIC_KEYS)
    assert kept.evaluated and kept.skipped is None and kept.value("image_auroc") == 0.7
    assert typed.to_json()["steps"][1]["per_task"][0] == skipped_entry(0, ["bottle"])  # written as before
    assert RunResults.from_json(typed.to_json()) == typed
    assert typed.skipped_files[0].reason == "cannot be read"
    # the skipped task drops out of the means and leaves a hole in the matrices
    assert typed.final.routed.get("image_auroc") == kept.value("image_auroc")
    assert typed.final.matrices["image_auroc"][1][0] is None
    rows = final_table(typed).rows
    assert rows[0][:2] == ["0", "bottle"] and set(rows[0][2:]) == {"-"}
    with pytest.raises(ValueError, match="no metrics"):
        TaskEval(0, ("bottle",), skipped="gone", routed=Metrics())
    with pytest.raises(ValueError, match="needs"):
        TaskEval(0, ("bottle",))


def test_train_log_keeps_exactly_the_keys_it_was_given():
    steps, typed = _with_skipped_task()
    assert [s["train"] for s in typed.to_json()["steps"]] == [s["train"] for s in steps]
    evaluated_only = {"tasks": [["bottle"]], "steps": [{"after_task": 0, "per_task": steps[0]["per_task"]}]}
    assert RunResults.from_json(evaluated_only).steps[0].train is None  # an `evaluate` run: no train key
    assert "train" not in RunResults.from_json(evaluated_only).to_json()["steps"][0]


def test_registry_is_what_the_metrics_code_writes():
    assert METRIC_KEYS == moleflow.metrics.METRIC_KEYS
    assert [m.key for m in METRICS] == list(METRIC_KEYS)
    assert get_metric("aupro").label == "AUPRO@0.3" and get_metric(ROUTING.key) is ROUTING
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        get_metric("nope")
    with pytest.raises(KeyError, match="unknown metric"):
        Metrics().get("routing_accuracy")


def test_table_headers_come_from_the_registry():
    typed = RunResults.from_json(real_results("fit"))
    header = final_table(typed).header
    assert header[2:2 + len(METRICS)] == [m.label for m in METRICS] and ROUTING.label in header
    md = results_markdown(typed)
    assert [ln[3:-len(" per step")] for ln in md.splitlines() if ln.endswith(" per step")] == [m.label for m in METRICS]
    assert "Forgetting" in md and all(f"{m.label} 0.0000" in md for m in METRICS)
    for m in METRICS:
        assert step_table(typed, m.key).startswith(m.label)
        assert len(metric_table(typed, m.key).rows) == len(typed.steps)
    # the run comparison's columns: see test_compare.py


def test_no_metric_name_is_spelled_outside_the_registry():
    files = [*sorted((SRC / "results").glob("*.py")), SRC / "research" / "compare.py", SRC / "research" / "runs.py"]
    names = {s for m in (*METRICS, ROUTING) for s in (m.label, m.title, m.short)}
    for f in files:
        if f.name == "schema.py":
            continue
        text = f.read_text()
        spelled = [n for n in names if re.search(rf"""["']{re.escape(n)}["']""", text)]
        assert not spelled, f"{f.name} spells {spelled}; take them from moleflow.results.schema"


def test_each_tasks_chosen_memory_weight_is_shown_by_name():
    steps, _ = _with_skipped_task()
    assert memory_weight_line(RunResults.from_json({"tasks": [["bottle"]], "steps": steps[:1]})) is None  # none chosen
    chosen = [dict(s, train=dict(s["train"], memory_weight=w)) for s, w in zip(steps, (1.0, 0.8))]
    typed = RunResults.from_json({"tasks": [["bottle"], ["grid", "tile"]], "steps": chosen})
    line = memory_weight_line(typed)
    assert line.endswith("training images: bottle 1, grid+tile 0.8") and line in results_markdown(typed)
    evaluated_only = {"tasks": [["bottle"]], "steps": [{"after_task": 0, "per_task": steps[0]["per_task"]}]}
    assert memory_weight_line(RunResults.from_json(evaluated_only)) is None
