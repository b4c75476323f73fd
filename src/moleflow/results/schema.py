"""The typed results of a run (`results.json`) and the one registry of metric names.

Layout of results.json, keys in the order written (`RunResults.to_json`):

    format_version  4: each task's memory weight; 3: k-fold calibration (folds, seconds); 2: false-alarm /
                    miss rates, calibration images; 1: before the field existed. All four are read.
    method          "moleflow" | "finetune" | "joint"; absent in `evaluate` and first `add-task` runs
    tasks           class names per task: [["bottle"], ["grid"]]
    task_specs      class specs per task ("mvtec:bottle"); absent in `evaluate` runs
    steps           one `Step` per training step: after_task, per_task (a `TaskEval` per task seen),
                    train (the `TrainLog`; absent in `evaluate` runs, {} for a step evaluated on resume)
    timings         `Timings`; absent in `evaluate` runs
    final           `Final`: means of the last step, forgetting, the matrices R[t][j]
    skipped_files   only when data.skip_bad left images out: [{"path", "reason"}]

Reading is strict: a missing or unknown key, or an unknown format_version, raises `ResultsFormatError`
(a ValueError) naming the place, so nothing is dropped silently on a round trip: a new key needs a field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 4  # what this moleflow writes
READABLE_VERSIONS = (1, 2, 3, 4)  # what it reads (each lacks the optional fields of the later ones)
FORMAT_KEY = "format_version"


class ResultsFormatError(ValueError):
    """results.json (or a part of it) does not have the layout of `FORMAT_VERSION`."""


# --------------------------------------------------------------------------- the metric registry


@dataclass(frozen=True)
class Metric:
    key: str  # the key in results.json
    label: str  # table header ("Img AUROC")
    title: str  # plot titles and prose ("Image AUROC")
    short: str  # header of the run comparison (`moleflow report`), without a parameter ("AUPRO")


METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "Img AUROC", "Image AUROC", "Img AUROC"),
    Metric("pixel_auroc", "Pix AUROC", "Pixel AUROC", "Pix AUROC"),
    Metric("pixel_ap", "Pix AP", "Pixel AP", "Pix AP"),
    Metric("aupro", "AUPRO@0.3", "AUPRO@0.3", "AUPRO"),
)
METRIC_KEYS: tuple[str, ...] = tuple(m.key for m in METRICS)
# Not a metric of the images: the share of test images routed to their own task.
ROUTING = Metric("routing_accuracy", "Routing", "Routing accuracy", "Routing")


def get_metric(key: str) -> Metric:
    """The registry entry of `key` (one of METRICS, or ROUTING)."""
    for m in (*METRICS, ROUTING):
        if m.key == key:
            return m
    raise KeyError(f"unknown metric '{key}'; known: {', '.join(m.key for m in (*METRICS, ROUTING))}")


# --------------------------------------------------------------------------- reading helpers


def _mapping(data: Any, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(data, dict):
        raise ResultsFormatError(f"{where}: expected a mapping, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ResultsFormatError(f"{where}: missing key(s) {', '.join(missing)}")
    unknown = [k for k in data if k not in required and k not in optional]
    if unknown:
        raise ResultsFormatError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                                 f"(format_version {FORMAT_VERSION} has {', '.join((*required, *optional))})")
    return data


def _seq(data: Any, where: str) -> tuple:
    if not isinstance(data, list | tuple):
        raise ResultsFormatError(f"{where}: expected a list, got {type(data).__name__}")
    return tuple(data)


def _nested(data: Any, where: str) -> tuple[tuple, ...]:
    """A list of lists (class names per task, a metric matrix) as tuples."""
    return tuple(_seq(item, f"{where}[{i}]") for i, item in enumerate(_seq(data, where)))


def check_format_version(data: Mapping, where: str = "results.json") -> int:
    """The format version of a results mapping (1 when the field is absent); any other is refused."""
    version = data.get(FORMAT_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ResultsFormatError(f"{where}: {FORMAT_KEY} must be an integer, got {version!r}")
    if version not in READABLE_VERSIONS:
        hint = "written by a newer moleflow; update moleflow to read it" if version > FORMAT_VERSION else "not a known version"
        known = ", ".join(map(str, READABLE_VERSIONS[:-1])) + f" and {READABLE_VERSIONS[-1]}"
        raise ResultsFormatError(f"{where}: {FORMAT_KEY} {version} cannot be read: this moleflow reads "
                                 f"{FORMAT_KEY} {known} (or files without the field), and {version} is {hint}")
    return version


# --------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class Metrics:
    """One value per metric of METRICS, in registry order; None where the data cannot give it
    (pixel metrics without masks)."""

    values: tuple[float | None, ...] = (None,) * len(METRICS)

    def __post_init__(self) -> None:
        if len(self.values) != len(METRICS):
            raise ValueError(f"Metrics needs {len(METRICS)} values ({', '.join(METRIC_KEYS)}), got {len(self.values)}")

    @classmethod
    def build(cls, value: Callable[[str], float | None]) -> Metrics:
        """`value(key)` for every metric key."""
        return cls(tuple(value(k) for k in METRIC_KEYS))

    def get(self, key: str) -> float | None:
        if key not in METRIC_KEYS:
            raise KeyError(f"unknown metric '{key}'; known: {', '.join(METRIC_KEYS)}")
        return self.values[METRIC_KEYS.index(key)]

    def to_json(self) -> dict[str, float | None]:
        return dict(zip(METRIC_KEYS, self.values))

    @classmethod
    def from_json(cls, data: Any, where: str = "metrics") -> Metrics:
        d = _mapping(data, where, METRIC_KEYS)
        return cls(tuple(d[k] for k in METRIC_KEYS))


_EVALUATED_KEYS = ("task", *METRIC_KEYS, "routing_accuracy", "oracle", "per_class", "n_test", "n_defective", "classes")
_DECISION_KEYS = ("false_alarm_rate", "miss_rate")  # format_version 2; absent in version 1 files
_SKIPPED_KEYS = ("task", "classes", "skipped")


@dataclass(frozen=True)
class TaskEval:
    """One task's evaluation in one step: either evaluated (metrics set, `skipped` None) or skipped
    (`skipped` holds the reason, e.g. "test data not available", and every metric field is None)."""

    task: int
    classes: tuple[str, ...]
    skipped: str | None = None
    routed: Metrics | None = None  # routing on: each image scored under the task the router chose
    routing_accuracy: float | None = None  # None for the baselines (one model task, no router)
    oracle: Metrics | None = None  # each image scored under its true task
    per_class: Mapping[str, Metrics] | None = None  # routing on, per class of the task
    n_test: int | None = None
    n_defective: int | None = None
    # The shipped decision (score > the routed task's threshold) on the test images: share of good ones
    # called defective, share of defective ones called good (None: no such images, or a version 1 file).
    false_alarm_rate: float | None = None
    miss_rate: float | None = None

    def __post_init__(self) -> None:
        parts = {"routed": self.routed, "oracle": self.oracle, "per_class": self.per_class,
                 "n_test": self.n_test, "n_defective": self.n_defective}
        if self.skipped is None and any(v is None for v in parts.values()):
            raise ValueError(f"task {self.task}: an evaluated task needs {', '.join(k for k, v in parts.items() if v is None)}")
        if self.skipped is not None and (self.routing_accuracy is not None or any(v is not None for v in parts.values())):
            raise ValueError(f"task {self.task}: a skipped task ({self.skipped}) has no metrics")

    @property
    def evaluated(self) -> bool:
        return self.skipped is None

    def value(self, key: str, oracle: bool = False) -> float | None:
        """The metric `key` (routed, or with the oracle task); None for a skipped task."""
        if self.skipped is not None:
            return None
        return (self.oracle if oracle else self.routed).get(key)

    def to_json(self) -> dict:
        if self.skipped is not None:
            return {"task": self.task, "classes": list(self.classes), "skipped": self.skipped}
        return {"task": self.task, **self.routed.to_json(), "routing_accuracy": self.routing_accuracy,
                "oracle": self.oracle.to_json(), "per_class": {c: m.to_json() for c, m in self.per_class.items()},
                "n_test": self.n_test, "n_defective": self.n_defective,
                **{k: getattr(self, k) for k in _DECISION_KEYS if getattr(self, k) is not None}, "classes": list(self.classes)}

    @classmethod
    def from_json(cls, data: Any, where: str = "task") -> TaskEval:
        if isinstance(data, dict) and "skipped" in data:
            d = _mapping(data, where, _SKIPPED_KEYS)
            return cls(d["task"], _seq(d["classes"], f"{where}.classes"), skipped=d["skipped"])
        d = _mapping(data, where, _EVALUATED_KEYS, _DECISION_KEYS)
        per_class = d["per_class"]
        if not isinstance(per_class, dict):
            raise ResultsFormatError(f"{where}.per_class: expected a mapping, got {type(per_class).__name__}")
        return cls(
            task=d["task"], classes=_seq(d["classes"], f"{where}.classes"),
            routed=Metrics(tuple(d[k] for k in METRIC_KEYS)), routing_accuracy=d["routing_accuracy"],
            oracle=Metrics.from_json(d["oracle"], f"{where}.oracle"),
            per_class={c: Metrics.from_json(m, f"{where}.per_class.{c}") for c, m in per_class.items()},
            n_test=d["n_test"], n_defective=d["n_defective"], **{k: d[k] for k in _DECISION_KEYS if k in d},
        )


@dataclass(frozen=True)
class TrainLog:
    """What training a task recorded; every field is absent (None) for a step evaluated on resume."""

    epoch_loss: tuple[float, ...] | None = None  # mean loss per epoch
    seconds: float | None = None
    steps: int | None = None  # optimiser steps
    n_train: int | None = None  # images the flow trained on
    n_calibration: int | None = None  # held-out training images the threshold was calibrated on (version 2)
    calibration_folds: int | None = None  # held-out shares pooled for it, each scored by a fold model (version 3)
    calibration_seconds: float | None = None  # training and scoring the fold models (version 3)
    ogp_directions: int | None = None  # OGP memory size after the task (finetune with train.ogp)
    grad_norms: tuple[dict[str, float], ...] | None = None  # per epoch, per coupling block (train.record_grad_norms)
    memory_weight: float | None = None  # the blend weight the task chose on synthetic defects (version 4)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "train") -> TrainLog:
        names = [f.name for f in dataclasses.fields(cls)]
        d = _mapping(data, where, (), names)
        return cls(**{k: _seq(v, f"{where}.{k}") if k in ("epoch_loss", "grad_norms") else v for k, v in d.items()})


@dataclass(frozen=True)
class Step:
    after_task: int  # the last task trained in this step
    per_task: tuple[TaskEval, ...]  # every task seen so far, in task order
    train: TrainLog | None = None  # None: no training in this run (`evaluate`)

    def to_json(self) -> dict:
        out = {"after_task": self.after_task, "per_task": [e.to_json() for e in self.per_task]}
        if self.train is not None:
            out["train"] = self.train.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "step") -> Step:
        d = _mapping(data, where, ("after_task", "per_task"), ("train",))
        per_task = tuple(TaskEval.from_json(e, f"{where}.per_task[{i}]") for i, e in enumerate(_seq(d["per_task"], f"{where}.per_task")))
        train = TrainLog.from_json(d["train"], f"{where}.train") if "train" in d else None
        return cls(d["after_task"], per_task, train)


@dataclass(frozen=True)
class Timings:
    features_s: float
    train_s_per_task: tuple[float, ...]
    eval_s: float

    def to_json(self) -> dict:
        return {"features_s": self.features_s, "train_s_per_task": list(self.train_s_per_task), "eval_s": self.eval_s}

    @classmethod
    def from_json(cls, data: Any, where: str = "timings") -> Timings:
        d = _mapping(data, where, ("features_s", "train_s_per_task", "eval_s"))
        return cls(d["features_s"], _seq(d["train_s_per_task"], f"{where}.train_s_per_task"), d["eval_s"])


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


Matrix = tuple[tuple[float | None, ...], ...]  # R[t][j]: row per step, column per task seen by then


@dataclass(frozen=True)
class Final:
    """The summary after the last step (see `summarize`)."""

    routed: Metrics  # mean over the evaluated tasks of the last step, routing on
    routing_accuracy: float | None  # over all routed test images of the last step
    oracle: Metrics
    forgetting: Metrics  # per metric: mean over earlier tasks of (best earlier - final)
    matrices: Mapping[str, Matrix] = field(default_factory=dict)  # metric key -> R[t][j], routing on

    def to_json(self) -> dict:
        return {**self.routed.to_json(), "routing_accuracy": self.routing_accuracy, "oracle": self.oracle.to_json(),
                "forgetting": self.forgetting.to_json(),
                "matrices": {k: [list(row) for row in self.matrices[k]] for k in METRIC_KEYS}}

    @classmethod
    def from_json(cls, data: Any, where: str = "final") -> Final:
        d = _mapping(data, where, (*METRIC_KEYS, "routing_accuracy", "oracle", "forgetting", "matrices"))
        m = _mapping(d["matrices"], f"{where}.matrices", METRIC_KEYS)
        return cls(Metrics(tuple(d[k] for k in METRIC_KEYS)), d["routing_accuracy"],
                   Metrics.from_json(d["oracle"], f"{where}.oracle"), Metrics.from_json(d["forgetting"], f"{where}.forgetting"),
                   {k: _nested(m[k], f"{where}.matrices.{k}") for k in METRIC_KEYS})


_OPTIONAL_TOP = (FORMAT_KEY, "method", "task_specs", "timings", "final", "skipped_files")


@dataclass(frozen=True)
class RunResults:
    """A run's results.json (see the module docstring for the layout)."""

    tasks: tuple[tuple[str, ...], ...]  # class names per task
    steps: tuple[Step, ...]
    method: str | None = None
    task_specs: tuple[tuple[str, ...], ...] | None = None
    timings: Timings | None = None
    final: Final | None = None
    skipped_files: tuple[SkippedFile, ...] = ()

    @property
    def task_names(self) -> list[str]:
        """"bottle", or "bottle+cable" for a task of two classes."""
        return ["+".join(t) for t in self.tasks]

    def has_values(self, key: str) -> bool:
        """Whether any step holds a value of metric `key` (pixel metrics need masks)."""
        return any(e.value(key) is not None for s in self.steps for e in s.per_task)

    def to_json(self) -> dict:
        out: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION}
        if self.method is not None:
            out["method"] = self.method
        out["tasks"] = [list(t) for t in self.tasks]
        if self.task_specs is not None:
            out["task_specs"] = [list(t) for t in self.task_specs]
        out["steps"] = [s.to_json() for s in self.steps]
        if self.timings is not None:
            out["timings"] = self.timings.to_json()
        if self.final is not None:
            out["final"] = self.final.to_json()
        if self.skipped_files:
            out["skipped_files"] = [{"path": s.path, "reason": s.reason} for s in self.skipped_files]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "results.json") -> RunResults:
        d = _mapping(data, where, ("tasks", "steps"), _OPTIONAL_TOP)
        check_format_version(d, where)
        steps = tuple(Step.from_json(s, f"{where}: steps[{i}]") for i, s in enumerate(_seq(d["steps"], f"{where}: steps")))
        skipped = tuple(SkippedFile(**_mapping(s, f"{where}: skipped_files[{i}]", ("path", "reason")))
                        for i, s in enumerate(_seq(d.get("skipped_files", []), f"{where}: skipped_files")))
        return cls(
            tasks=_nested(d["tasks"], f"{where}: tasks"), steps=steps, method=d.get("method"),
            task_specs=_nested(d["task_specs"], f"{where}: task_specs") if "task_specs" in d else None,
            timings=Timings.from_json(d["timings"], f"{where}: timings") if "timings" in d else None,
            final=Final.from_json(d["final"], f"{where}: final") if "final" in d else None,
            skipped_files=skipped,
        )


# --------------------------------------------------------------------------- the summary


def forgetting(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Mean over j < T of (best earlier R[.][j] − final R[T][j]); `matrix[t][j]` for j <= t."""
    if len(matrix) < 2:
        return 0.0 if matrix else None
    final = matrix[-1]
    drops = []
    for j in range(len(matrix) - 1):
        earlier = [matrix[t][j] for t in range(j, len(matrix) - 1) if matrix[t][j] is not None]
        if earlier and final[j] is not None:
            drops.append(max(earlier) - final[j])
    return float(np.mean(drops)) if drops else None


def metric_matrix(steps: Sequence[Step], key: str, oracle: bool = False) -> list[list[float | None]]:
    """R[t][j] of metric `key`: a row per step, a column per task evaluated in it (None: skipped or n/a)."""
    return [[e.value(key, oracle) for e in step.per_task] for step in steps]


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(steps: Sequence[Step]) -> Final:
    """The final block: mean of the last row (skipped tasks drop out), routing accuracy over all routed
    test images, forgetting and the matrices of every metric."""
    last = [e for e in steps[-1].per_task if e.evaluated]
    routed = [e for e in last if e.routing_accuracy is not None]
    n = sum(e.n_test for e in routed)
    return Final(
        routed=Metrics.build(lambda k: _mean([e.routed.get(k) for e in last])),
        routing_accuracy=float(sum(e.routing_accuracy * e.n_test for e in routed) / n) if n else None,
        oracle=Metrics.build(lambda k: _mean([e.oracle.get(k) for e in last])),
        forgetting=Metrics.build(lambda k: forgetting(metric_matrix(steps, k))),
        matrices={k: tuple(tuple(row) for row in metric_matrix(steps, k)) for k in METRIC_KEYS},
    )
