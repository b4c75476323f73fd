"""The decision threshold's k-fold calibration (continual/system.py `_train`): fold models are
throwaway copies; the shipped task learns from every training image, untouched by them."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.config import load_config
from moleflow.continual.system import build_system, held_out_folds, held_out_scores, learn_new_task
from moleflow.continual.train import fit_task, seed_everything
from moleflow.features.cache import FeatureSet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _features(system, n: int, seed: int, folder: Path) -> FeatureSet:
    """Random features of n images; the image files exist (the task's blend weight is chosen on
    synthetic defects pasted on them) but are noise of their own."""
    g = torch.Generator().manual_seed(seed)
    h, w = system.extractor.grid
    c = system.extractor.out_channels
    patches = torch.randn(n, h, w, c, generator=g) * (1 + torch.rand(n, 1, 1, 1, generator=g))
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{seed}_{i}.png"))
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(paths[-1])
    return FeatureSet(patches, torch.randn(n, 2 * c, generator=g), torch.zeros(n, dtype=torch.long), None,
                      paths, ["a"] * n)


def _learn(folds: int, train: FeatureSet, holdout: float = 0.25):
    cfg = load_config(CONFIGS / "smoke.yaml", [f"scoring.calibration_folds={folds}", f"scoring.calibration_holdout={holdout}"])
    seed_everything(cfg.train.seed)
    system = build_system(cfg)
    _, log = learn_new_task(system, ["a"], train, progress=False, step=0)
    return system, log


def test_the_threshold_pools_every_fold_models_out_of_fold_scores_and_the_shipped_task_is_unchanged(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml")
    seed_everything(cfg.train.seed)
    train = _features(build_system(cfg), 16, seed=0, folder=tmp_path)
    none, log0 = _learn(1, train, holdout=0.0)
    one, log1 = _learn(1, train)
    four, log4 = _learn(4, train)
    # the shipped task trained on all the images from the same state: bitwise the same tensors
    for other in (none, one):
        a, b = other.model.task_state_dict(0), four.model.task_state_dict(0)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert other.model.shared_state_dict().keys() == four.model.shared_state_dict().keys()
        assert all(torch.equal(v, four.model.shared_state_dict()[k]) for k, v in other.model.shared_state_dict().items())
        assert other.tasks[0].map_low == four.tasks[0].map_low  # the colour scale is the shipped modules' own
    assert (log0.n_train, log0.n_calibration, log0.calibration_folds) == (16, None, None)
    assert (log1.n_train, log1.n_calibration, log1.calibration_folds) == (16, 4, 1)
    assert (log4.n_train, log4.n_calibration, log4.calibration_folds) == (16, 16, 4)
    assert log1.calibration_seconds > 0 and log4.calibration_seconds > 0
    # the shipped task chose its blend weight before any fold model trained: the same with any folds
    assert log0.memory_weight == log1.memory_weight == log4.memory_weight in four.cfg.scoring.memory_weights

    # rebuild the fold models independently: task 0 from the initial state, trained without its share
    folds = held_out_folds(16, 0.25, 4, seed=four.cfg.train.seed * 1000)
    pooled = []
    for held in folds:
        seed_everything(four.cfg.train.seed)
        fresh = build_system(four.cfg)
        seed_everything(four.cfg.train.seed)  # learn_new_task's seeding of step 0
        fresh.model.add_task(0)
        keep = torch.ones(16, dtype=torch.bool)
        keep[held] = False
        seed_everything(four.cfg.train.seed)
        fit_task(fresh.model, 0, train.subset(keep), four.cfg.train, four.cfg.loss, fresh.device, progress=False)
        fresh.model.fit_memory(0, train.subset(keep).patches, seed=four.cfg.train.seed)  # the default blend reads it
        fresh.model.set_memory_weight(0, log4.memory_weight)  # the shipped task's choice scores its folds
        pooled.append(held_out_scores(fresh, 0, train.subset(held))[0])
    assert one.tasks[0].threshold == pytest.approx(float(np.quantile(pooled[0], 0.99)), rel=1e-5)
    assert four.tasks[0].threshold == pytest.approx(float(np.quantile(np.concatenate(pooled), 0.99)), rel=1e-5)
    assert four.tasks[0].threshold != pytest.approx(one.tasks[0].threshold)
    in_sample = float(np.quantile(held_out_scores(none, 0, train)[0], 0.99))
    assert none.tasks[0].threshold == pytest.approx(in_sample)
    assert in_sample < four.tasks[0].threshold  # images the flow trained on score lower than unseen ones


def test_without_a_held_out_share_the_threshold_is_in_sample_and_no_fold_model_trains(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", ["scoring.calibration_holdout=0"])
    seed_everything(cfg.train.seed)
    system = build_system(cfg)
    train = _features(system, 8, seed=1, folder=tmp_path)
    _, log = learn_new_task(system, ["a"], train, progress=False, step=0)
    assert (log.n_train, log.n_calibration, log.calibration_folds, log.calibration_seconds) == (8, None, None, None)
    assert system.tasks[0].threshold == pytest.approx(float(np.quantile(held_out_scores(system, 0, train)[0], 0.99)))


def test_with_memory_scores_alone_the_fold_models_are_memories_of_the_other_images(tmp_path):
    from moleflow.model.memory import PatchMemory, greedy_coreset

    over = ["scoring.calibration_folds=4", "scoring.calibration_holdout=0.25", "scoring.patch_score=blend",
            "scoring.memory_weight_from=fixed", "scoring.memory_weight=1.0", "model.memory_share=0.05"]
    cfg = load_config(CONFIGS / "smoke.yaml", over)
    seed_everything(cfg.train.seed)
    system = build_system(cfg)
    train = _features(system, 16, seed=2, folder=tmp_path)
    _, log = learn_new_task(system, ["a"], train, progress=False, step=0)
    folds = held_out_folds(16, 0.25, 4, seed=cfg.train.seed * 1000)
    pooled = []
    c = train.patches.shape[-1]
    for held in folds:  # independently: a coreset of the other images' patches, distance over its median
        keep = torch.ones(16, dtype=torch.bool)
        keep[held] = False
        rest = train.patches[keep].float()
        bank = rest.reshape(-1, c)
        mem = PatchMemory(c)
        mem.bank = bank[greedy_coreset(bank, int(0.05 * len(bank)), seed=cfg.train.seed)]
        sample = rest[torch.linspace(0, len(rest) - 1, min(32, len(rest))).long()]
        d = mem.distance(train.patches[held].float()) / mem.distance(sample).median()
        pooled.append(d.flatten(1).topk(cfg.scoring.top_k, dim=1).values.mean(1).numpy())
    assert system.tasks[0].threshold == pytest.approx(float(np.quantile(np.concatenate(pooled), 0.99)), rel=1e-4)
    assert log.n_calibration == 16
