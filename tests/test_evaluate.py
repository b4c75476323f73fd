import pytest
from helpers import task_entry, typed_steps

from moleflow.results.schema import forgetting, summarize


def test_forgetting_is_best_earlier_minus_final():
    m = [[0.9], [0.95, 0.8], [0.85, 0.7, 0.6]]
    # task 0: best earlier 0.95, final 0.85 -> 0.10; task 1: best earlier 0.8, final 0.7 -> 0.10
    assert forgetting(m) == pytest.approx(0.10)
    assert forgetting([[0.9]]) == 0.0
    assert forgetting([[0.9], [0.9, 0.5]]) == 0.0


def test_summarize_final_row_and_routing():
    steps = typed_steps([{"after_task": 0, "per_task": [task_entry(0, ["a"], 0.9)]},
                         {"after_task": 1, "per_task": [task_entry(0, ["a"], 0.8, routing=0.5), task_entry(1, ["b"], 0.7, n_test=30)]}])
    f = summarize(steps)
    assert f.routed.get("image_auroc") == pytest.approx(0.75)
    assert f.routed.get("pixel_ap") is None
    assert f.routing_accuracy == pytest.approx((0.5 * 10 + 30) / 40)  # weighted by test images
    assert f.forgetting.get("image_auroc") == pytest.approx(0.1)
    assert f.matrices["image_auroc"] == ((0.9,), (0.8, 0.7))


def test_summary_of_baselines_has_no_routing_and_uses_the_oracle_block():
    steps = typed_steps([{"after_task": 0, "per_task": [task_entry(0, ["a"], 0.6, routing=None, oracle_auroc=0.9)]}])
    f = summarize(steps)
    assert f.routing_accuracy is None
    assert f.oracle.get("image_auroc") == 0.9 and f.routed.get("image_auroc") == 0.6
    assert f.forgetting.get("image_auroc") == 0.0  # one step: nothing to forget
