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


def test_calibration_folds_are_disjoint_seeded_shares_and_fold_0_is_what_the_shipped_task_does_not_train_on():
    import torch

    from moleflow.continual.system import calibration_index, held_out_folds

    n = 23
    folds = held_out_folds(n, 0.2, 5, seed=5)
    assert [len(f) for f in folds] == [4] * 5  # int(0.2 × 23) each; 3 images are in no share
    flat = torch.cat(folds)
    assert len(set(flat.tolist())) == 20 and 0 <= int(flat.min()) and int(flat.max()) < n
    assert all(bool((f[1:] > f[:-1]).all()) for f in folds)  # sorted
    assert torch.equal(calibration_index(n, 0.2, seed=5), folds[0])
    assert [f.tolist() for f in held_out_folds(n, 0.2, 2, seed=5)] == [f.tolist() for f in folds[:2]]
    assert held_out_folds(n, 0.2, 5, seed=6)[0].tolist() != folds[0].tolist()
    assert held_out_folds(n, 0.0, 5, seed=5) == [] and calibration_index(n, 0.0, seed=5) is None
    assert held_out_folds(4, 0.2, 5, seed=0) == []  # 0.8 image: calibrated on the training images


def test_decision_rates_count_verdicts_against_each_images_own_task_threshold():
    import torch

    from moleflow.continual.evaluate import decision_rates
    from moleflow.features.cache import FeatureSet
    from moleflow.scoring import Scores

    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    fs = FeatureSet(torch.zeros(6, 1, 1, 1), torch.zeros(6, 2), labels, None, [str(i) for i in range(6)], ["a"] * 6)
    image = torch.tensor([1.0, 5.0, 1.0, 9.0, 2.0, 20.0])
    tasks = torch.tensor([0, 0, 1, 1, 0, 1])  # task 0's threshold 4, task 1's 10
    fa, miss = decision_rates(fs, Scores(tasks, image, torch.zeros(6, 1, 1), None), {0: 4.0, 1: 10.0})
    assert fa == 0.25  # of 4 goods only 5.0 > 4 (task 0); 9.0 is under task 1's 10
    assert miss == 0.5  # 2.0 <= 4 is missed, 20 > 10 is found
