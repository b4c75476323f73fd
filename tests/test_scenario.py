import pytest

from moleflow.config import ConfigError, load_config
from moleflow.continual.scenario import (
    MVTEC_ALPHABETICAL_ORDER,
    MVTEC_ORIGINAL_ORDER,
    display_name,
    resolve_tasks,
    split_scenario,
)


@pytest.mark.parametrize("name, sizes", [("1x1", [1] * 15), ("3x3", [3] * 5), ("5x5", [5] * 3), ("14x1", [14, 1]), ("10-5", [10, 5])])
def test_named_scenarios_on_mvtec(name, sizes):
    tasks = split_scenario(name, MVTEC_ORIGINAL_ORDER)
    assert [len(t) for t in tasks] == sizes
    assert sum(tasks, []) == MVTEC_ORIGINAL_ORDER


def test_orders():
    assert MVTEC_ORIGINAL_ORDER[:3] == ["leather", "grid", "transistor"] and MVTEC_ORIGINAL_ORDER[-1] == "bottle"
    cfg = load_config(None, ["scenario.name=1x1", "scenario.order=[alphabetical]"])
    assert [t[0] for t in resolve_tasks(cfg)] == MVTEC_ALPHABETICAL_ORDER
    cfg = load_config(None, ["scenario.name=5x5"])
    assert resolve_tasks(cfg)[0] == MVTEC_ORIGINAL_ORDER[:5]


def test_bad_scenarios():
    with pytest.raises(ConfigError, match="does not divide"):
        split_scenario("4x4", MVTEC_ORIGINAL_ORDER)
    with pytest.raises(ConfigError, match="not a scenario"):
        split_scenario("abc", MVTEC_ORIGINAL_ORDER)
    with pytest.raises(ConfigError, match="no tasks"):
        resolve_tasks(load_config(None, []))
    with pytest.raises(ConfigError, match="two tasks"):
        resolve_tasks(load_config(None, ["scenario.tasks=[[bottle],[bottle]]"]))


def test_explicit_tasks_and_display_names():
    cfg = load_config(None, ["scenario.tasks=[[bottle],[elpv:mono, elpv:poly]]"])
    assert resolve_tasks(cfg) == [["bottle"], ["elpv:mono", "elpv:poly"]]
    assert display_name("elpv:mono") == "mono" and display_name("bottle") == "bottle"
