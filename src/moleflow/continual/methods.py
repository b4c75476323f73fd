"""The methods a scenario can be learned with: which modules train on which features, and when.

    moleflow   a new task per scenario task: its own LoRA experts, whitening and DIA; every earlier
               task's tensors stay as they are (complete separation). Routes; resumes; takes add-task.
    finetune   one set of modules, shared weights included, trained on each scenario task in turn
               (it forgets; `train.ogp` projects gradients away from earlier tasks' subspaces).
    joint      one set of modules trained once on every task's images (the non-continual upper bound).

The baselines have one model task (0) under which every image is scored; they have no router.
A method's `learn(system, step, tasks, trains, progress)` trains for scenario step `step`; `trains`
holds the training features of the steps extracted in this process (a resumed run lacks the completed
ones). It returns the training log, or None when nothing trains at this step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moleflow.continual.system import System, learn_new_task, retrain_task
from moleflow.features.cache import FeatureSet
from moleflow.results.schema import TrainLog

Learn = Callable[[System, int, list[list[str]], dict[int, FeatureSet], bool], TrainLog | None]


def _learn_moleflow(system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog:
    return learn_new_task(system, tasks[step], trains[step], progress, step)[1]


def _learn_finetune(system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog:
    seen = sum(tasks[: step + 1], [])  # the one model task answers for every class seen so far
    if step == 0:
        return learn_new_task(system, seen, trains[step], progress, step)[1]
    return retrain_task(system, 0, seen, trains[step], progress, step)[1]


def _learn_joint(system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog | None:
    if step < len(tasks) - 1:
        return None  # joint learns once, from every task's images
    return learn_new_task(system, sum(tasks, []), FeatureSet.concat([trains[k] for k in sorted(trains)]), progress, 0)[1]


@dataclass(frozen=True)
class Method:
    name: str
    learn: Learn
    resumable: bool  # `fit --resume` continues from the last saved task
    extendable: bool  # `add-task` may add a product to a saved model
    scoring_task: int | None  # None: each image is routed to its task; else every image is scored under it


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("moleflow", _learn_moleflow, resumable=True, extendable=True, scoring_task=None),
    Method("finetune", _learn_finetune, resumable=False, extendable=False, scoring_task=0),
    Method("joint", _learn_joint, resumable=False, extendable=False, scoring_task=0),
)}
