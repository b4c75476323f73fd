"""Continual scenarios: the ordered list of tasks, each a list of classes.

A config either lists the tasks (`scenario.tasks: [[bottle], [elpv:mono]]`) or names a scenario over a
class order. Names follow the notes: `AxB` and `A-B` both mean "a first task of A classes, then tasks of B
classes each": `1x1` (one class per task), `3x3`, `5x5`, `14x1`, `10-5`.
"""
from __future__ import annotations

import re

from moleflow.config import Config, ConfigError

# The two MVTec AD orders of the research notes.
MVTEC_ORIGINAL_ORDER = [
    "leather", "grid", "transistor", "carpet", "zipper", "hazelnut", "toothbrush", "metal_nut",
    "screw", "wood", "tile", "capsule", "pill", "cable", "bottle",
]
MVTEC_ALPHABETICAL_ORDER = sorted(MVTEC_ORIGINAL_ORDER)

_NAME = re.compile(r"^(\d+)[x-](\d+)$")


def class_order(cfg: Config) -> list[str]:
    """The class order of a named scenario: explicit, `original`, or `alphabetical`."""
    from moleflow.data import known_classes

    order = list(cfg.scenario.order)
    if order in ([], ["original"]):
        order = known_classes(cfg.data.dataset)
    elif order == ["alphabetical"]:
        order = sorted(known_classes(cfg.data.dataset))
    if not order:
        raise ConfigError(
            f"scenario.order is empty and dataset '{cfg.data.dataset}' has no fixed class list; "
            "list the classes in scenario.order or the tasks in scenario.tasks"
        )
    if len(set(order)) != len(order):
        raise ConfigError(f"scenario.order names a class twice: {order}")
    return order


def split_scenario(name: str, order: list[str]) -> list[list[str]]:
    """`AxB` / `A-B`: a first task of A classes, then tasks of B classes each."""
    m = _NAME.match(name.strip())
    if not m:
        raise ConfigError(f"scenario.name '{name}' is not a scenario; use 1x1, 3x3, 5x5, 14x1 or N-M (e.g. 10-5)")
    first, rest = int(m.group(1)), int(m.group(2))
    if first < 1 or rest < 1:
        raise ConfigError(f"scenario.name '{name}': task sizes must be >= 1")
    if first > len(order) or (len(order) - first) % rest:
        raise ConfigError(
            f"scenario.name '{name}' does not divide {len(order)} classes into a first task of {first} "
            f"and tasks of {rest}; change scenario.order or the scenario"
        )
    tasks = [order[:first]]
    tasks += [order[i : i + rest] for i in range(first, len(order), rest)]
    return tasks


def resolve_tasks(cfg: Config) -> list[list[str]]:
    """The scenario's tasks as lists of class specs (`bottle`, `elpv:mono`)."""
    if cfg.scenario.tasks and cfg.scenario.name:
        raise ConfigError("set either scenario.tasks or scenario.name, not both")
    if cfg.scenario.tasks:
        tasks = [list(t) for t in cfg.scenario.tasks]
    elif cfg.scenario.name:
        tasks = split_scenario(cfg.scenario.name, class_order(cfg))
    else:
        raise ConfigError("the config has no tasks: set scenario.tasks (e.g. [[bottle]]) or scenario.name (e.g. 1x1)")
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        if not task:
            raise ConfigError(f"scenario task {i} has no classes")
        for c in task:
            if c in seen:
                raise ConfigError(f"class '{c}' appears in two tasks; each class belongs to one task")
            seen.add(c)
    return tasks


def display_name(spec: str) -> str:
    """`elpv:mono` -> `mono`: how a class is shown in tables."""
    return spec.split(":", 1)[1] if ":" in spec else spec
