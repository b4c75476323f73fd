import dataclasses

import pytest
import torch

from moleflow.config import ModelConfig
from moleflow.model.flow import BaseFlow, CouplingBlock, MoLEContextSubnet
from moleflow.model.lora import LoRALinear

TINY = ModelConfig(coupling_blocks=2, lora_rank=2, context_kernel=3, subnet_hidden_ratio=2.0)


def with_task(module: torch.nn.Module, key: str = "0") -> None:
    """Add a task to every LoRA layer and make it active (what MoLEFlow.use_task does)."""
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.add_task(key)
            m.active_task = key


def randomize_(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Non-zero random values everywhere (LoRA B, task biases, α too): no identity shortcuts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


VARIANTS = {
    "default": {},
    "no_context": {"scale_context": False},
    "gate": {"context_gate": True, "context_gate_hidden": 4},
    "kernel5": {"context_kernel": 5},
    "no_lora": {"lora": False, "task_bias": False},
    "odd_width": {"subnet_hidden_ratio": 1.5, "coupling_blocks": 3},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_coupling_block_and_base_flow_are_invertible(variant):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, **VARIANTS[variant])
    flow = BaseFlow(9, cfg)  # odd channel count: unequal halves
    with_task(flow)
    randomize_(flow)
    x = torch.randn(2, 4, 5, 9)
    for module in [flow.blocks[0], flow]:
        y, ld = module(x)
        assert y.shape == x.shape and ld.shape == (2, 4, 5)
        assert ld.abs().max() > 1e-2  # not the identity
        x2, ld_inv = module.inverse(y)
        torch.testing.assert_close(x2, x, atol=1e-4, rtol=0)
        torch.testing.assert_close(ld_inv, -ld, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_per_patch_logdet_is_exact(gate):
    """Σ per-patch log-dets == log|det J| of the whole (1, 3, 3, 8) -> (1, 3, 3, 8) map (float64)."""
    torch.manual_seed(1)
    cfg = dataclasses.replace(TINY, context_gate=gate, context_gate_hidden=4)
    flow = BaseFlow(8, cfg).double()
    with_task(flow)
    randomize_(flow, scale=0.8)
    x = torch.randn(1, 3, 3, 8, dtype=torch.float64)

    def f(v):
        return flow(v.reshape(1, 3, 3, 8))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))  # (72, 72)
    sign, logabsdet = torch.linalg.slogdet(jac)
    _, ld = flow(x)
    assert ld.abs().sum() > 0.1
    torch.testing.assert_close(ld.sum(), logabsdet, atol=1e-9, rtol=1e-9)
    # The test is only meaningful if the context really couples neighbouring patches.
    j = jac.reshape(9, 8, 9, 8)
    off_patch = j.clone()
    off_patch[torch.arange(9), :, torch.arange(9), :] = 0
    assert off_patch.abs().max() > 1e-3


def test_permutation_is_a_seeded_buffer():
    a, b = CouplingBlock(10, TINY, index=3), CouplingBlock(10, TINY, index=3)
    names = dict(a.named_buffers())
    assert "perm" in names and "inv_perm" in names
    assert all("perm" not in n for n, _ in a.named_parameters())
    assert torch.equal(a.perm, b.perm)
    assert torch.equal(torch.sort(a.perm).values, torch.arange(10))
    assert not torch.equal(a.perm, CouplingBlock(10, TINY, index=4).perm)
    assert torch.equal(a.perm[a.inv_perm], torch.arange(10))


def test_context_alpha_and_gate_init():
    sub = MoLEContextSubnet(4, 6, TINY)
    assert float(sub.context_alpha().detach()) == pytest.approx(0.1)
    with torch.no_grad():
        sub.context_logit.fill_(50.0)
    assert float(sub.context_alpha().detach()) <= TINY.context_max + 1e-7
    assert sub.fc1.in_features == 8 and sub.fc1.out_features == 16 and sub.fc2.out_features == 6

    gated = MoLEContextSubnet(4, 6, dataclasses.replace(TINY, context_gate=True, context_gate_hidden=5))
    assert gated.context_alpha() is None
    with_task(gated)
    gated(torch.randn(2, 3, 3, 4))
    assert gated.last_gate.shape == (2, 3, 3, 1)
    torch.testing.assert_close(gated.last_gate, torch.full_like(gated.last_gate, 0.5))
    # the first layer is live (see the class docstring), so the gate can become patch-wise
    assert torch.count_nonzero(gated.context_gate_net[0].weight) > 0

    plain = MoLEContextSubnet(4, 6, dataclasses.replace(TINY, scale_context=False))
    assert plain.fc1.in_features == 4 and not hasattr(plain, "context_conv")


def test_flow_with_tasks_needs_an_active_task():
    flow = BaseFlow(6, TINY)
    with_task(flow)
    for m in flow.modules():
        if isinstance(m, LoRALinear):
            m.active_task = None
    with pytest.raises(RuntimeError, match="use_task"):
        flow(torch.randn(1, 2, 2, 6))


def test_block_logdets_are_collected():
    flow = BaseFlow(6, TINY)
    randomize_(flow)
    parts: list[torch.Tensor] = []
    _, ld = flow(torch.randn(2, 3, 3, 6), block_logdets=parts)
    assert len(parts) == 2
    torch.testing.assert_close(parts[0] + parts[1], ld)
