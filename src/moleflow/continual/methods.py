"""The methods a scenario can be learned with: which modules train on which features, and when.

    moleflow   a new task per scenario task: its own LoRA experts, whitening and DIA; every earlier
               task's tensors stay as they are (complete separation). Routes; resumes; takes add-task.
    finetune   one set of modules, shared weights included, trained on each scenario task in turn
               (it forgets; `train.ogp` projects gradients away from earlier tasks' subspaces).
    joint      one set of modules trained once on every task's images (the non-continual upper bound).

The baselines have one model task (0) under which every image is scored; they have no router.
"""
from __future__ import annotations

from dataclasses import dataclass

from moleflow.continual.system import System, learn_new_task, retrain_task
from moleflow.features.cache import FeatureSet
from moleflow.results.schema import TrainLog


@dataclass(frozen=True)
class MoLEFlowMethod:
    name: str = "moleflow"
    resumable: bool = True  # `fit --resume` continues from the last saved task
    extendable: bool = True  # `add-task` may add a product to a saved model
    scoring_task: int | None = None  # None: each image is routed to its task

    def learn(self, system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog | None:
        """Train for scenario step `step`; `trains` holds the training features of the steps extracted in
        this process (a resumed run lacks the completed ones). The log, or None if nothing trains now."""
        return learn_new_task(system, tasks[step], trains[step], progress, step)[1]


@dataclass(frozen=True)
class FinetuneMethod:
    name: str = "finetune"
    resumable: bool = False
    extendable: bool = False
    scoring_task: int | None = 0

    def learn(self, system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog | None:
        seen = sum(tasks[: step + 1], [])  # the one model task answers for every class seen so far
        if step == 0:
            return learn_new_task(system, seen, trains[step], progress, step)[1]
        return retrain_task(system, 0, seen, trains[step], progress, step)[1]


@dataclass(frozen=True)
class JointMethod:
    name: str = "joint"
    resumable: bool = False
    extendable: bool = False
    scoring_task: int | None = 0

    def learn(self, system: System, step: int, tasks: list[list[str]], trains: dict[int, FeatureSet], progress: bool) -> TrainLog | None:
        if step < len(tasks) - 1:
            return None  # joint learns once, from every task's images
        return learn_new_task(system, sum(tasks, []), FeatureSet.concat([trains[k] for k in sorted(trains)]), progress, 0)[1]


Method = MoLEFlowMethod | FinetuneMethod | JointMethod
METHODS: dict[str, Method] = {m.name: m for m in (MoLEFlowMethod(), FinetuneMethod(), JointMethod())}
