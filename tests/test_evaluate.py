import pytest

from moleflow.results.summary import forgetting, summarize


def test_forgetting_is_best_earlier_minus_final():
    m = [[0.9], [0.95, 0.8], [0.85, 0.7, 0.6]]
    # task 0: best earlier 0.95, final 0.85 -> 0.10; task 1: best earlier 0.8, final 0.7 -> 0.10
    assert forgetting(m) == pytest.approx(0.10)
    assert forgetting([[0.9]]) == 0.0
    assert forgetting([[0.9], [0.9, 0.5]]) == 0.0


def _entry(t, auc, n=10, routing=1.0):
    m = {"image_auroc": auc, "pixel_auroc": None, "pixel_ap": None, "aupro": None}
    return {"task": t, **m, "routing_accuracy": routing, "oracle": dict(m), "n_test": n}


def test_summarize_final_row_and_routing():
    steps = [{"after_task": 0, "per_task": [_entry(0, 0.9)]},
             {"after_task": 1, "per_task": [_entry(0, 0.8, routing=0.5), _entry(1, 0.7, n=30)]}]
    f = summarize(steps)
    assert f["image_auroc"] == pytest.approx(0.75)
    assert f["pixel_ap"] is None
    assert f["routing_accuracy"] == pytest.approx((0.5 * 10 + 30) / 40)
    assert f["forgetting"]["image_auroc"] == pytest.approx(0.1)
    assert f["matrices"]["image_auroc"] == [[0.9], [0.8, 0.7]]
