import math

import pytest
import torch
import torch.nn.functional as F

from moleflow.model.lora import LoRALinear


def make_layer(**kw) -> LoRALinear:
    torch.manual_seed(0)
    args = dict(in_features=6, out_features=5, rank=3, alpha=2.0)
    args.update(kw)
    return LoRALinear(**args)


def test_shapes_init_and_scaling():
    layer = make_layer()
    layer.add_task("0")
    assert layer.weight.shape == (5, 6) and layer.bias.shape == (5,)
    assert layer.lora_A["0"].shape == (3, 6) and layer.lora_B["0"].shape == (5, 3)
    assert layer.scaling == pytest.approx(2.0 / 3)
    assert torch.count_nonzero(layer.lora_B["0"]) == 0
    assert torch.count_nonzero(layer.task_bias["0"]) == 0
    # Xavier uniform bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6.0 / (6 + 3))
    assert layer.lora_A["0"].abs().max() <= bound and torch.count_nonzero(layer.lora_A["0"]) == 18
    # nn.Linear-like shared init
    assert layer.bias.abs().max() <= 1 / math.sqrt(6)


def test_fresh_task_is_exactly_the_shared_layer():
    layer = make_layer()
    layer.add_task("0")
    with torch.no_grad():  # task 0 has trained: its expert is non-zero
        layer.lora_B["0"].normal_()
        layer.task_bias["0"].normal_()
    layer.add_task("1")
    x = torch.randn(2, 3, 4, 6)
    layer.active_task = "1"
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.active_task = "0"
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


def test_output_formula_with_nonzero_expert():
    layer = make_layer().double()
    layer.add_task("0")
    with torch.no_grad():
        layer.lora_B["0"].normal_()
        layer.task_bias["0"].normal_()
    layer.active_task = "0"
    x = torch.randn(7, 6, dtype=torch.float64)
    a, b, bt = layer.lora_A["0"], layer.lora_B["0"], layer.task_bias["0"]
    expected = x @ layer.weight.T + layer.bias + bt + layer.scaling * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected)


def test_active_task_is_required_and_checked():
    layer = make_layer()
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # no tasks yet: the shared layer
    layer.add_task("0")
    with pytest.raises(RuntimeError, match="active task"):
        layer(x)
    layer.active_task = "7"
    with pytest.raises(KeyError, match="'7'"):
        layer(x)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_task("0")


def test_tasks_are_independent():
    layer = make_layer()
    layer.add_task("0")
    layer.add_task("1")
    x = torch.randn(4, 6)
    layer.active_task = "0"
    before = layer(x).detach().clone()
    with torch.no_grad():
        layer.lora_B["1"].normal_()
        layer.task_bias["1"].normal_()
        layer.lora_A["1"].normal_()
    assert torch.equal(layer(x), before)
    assert layer.task_parameters("1") == [layer.lora_A["1"], layer.lora_B["1"], layer.task_bias["1"]]


def test_without_lora_only_task_bias_remains():
    layer = make_layer(use_lora=False)
    layer.add_task("0")
    assert len(layer.lora_A) == 0 and len(layer.lora_B) == 0 and "0" in layer.task_bias
    layer.active_task = "0"
    with torch.no_grad():
        layer.task_bias["0"].fill_(1.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias) + 1.0)

    bare = make_layer(use_lora=False, use_task_bias=False)
    bare.add_task("0")
    assert bare.task_parameters("0") == []
    with pytest.raises(RuntimeError):  # still a known task that must be selected
        bare(x)


def test_remove_task():
    layer = make_layer()
    layer.add_task("0")
    layer.add_task("1")
    layer.active_task = "1"
    layer.remove_task("1")
    assert layer.task_keys == ["0"] and "1" not in layer.lora_A and layer.active_task is None
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A.0", "lora_B.0", "task_bias.0"]


def test_merged_weights_are_cached_for_inference_and_follow_every_change():
    layer = LoRALinear(6, 5, rank=2, alpha=2.0)
    layer.add_task("0")
    layer.active_task = "0"
    x = torch.randn(4, 6)
    with torch.no_grad():
        first = layer.effective_weight_and_bias()
        assert layer.effective_weight_and_bias()[0] is first[0]  # merged once, then reused
        layer.lora_B["0"].add_(1.0)  # an update of the task's tensors (as an optimiser step does it)
        merged = layer.effective_weight_and_bias()[0]
        assert merged is not first[0]
        torch.testing.assert_close(merged, layer.weight + layer.scaling * layer.lora_B["0"] @ layer.lora_A["0"])
        y = layer(x)
    y_grad = layer(x)  # with gradients: merged on the fly, so training sees every step
    torch.testing.assert_close(y, y_grad.detach())
    assert y_grad.requires_grad
