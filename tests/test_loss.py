import dataclasses
import math

import pytest
import torch

from moleflow.config import LossConfig, ModelConfig
from moleflow.model.flow import BaseFlow
from moleflow.model.loss import patch_nll, tail_aware_loss, tail_count, tail_mean
from moleflow.model.mole_flow import MoLEFlow

PLAIN = LossConfig(tail_weight=0.0, lambda_logdet=0.0, whitening_reg=0.0)


def from_nll(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, log_det) whose per-patch NLL is exactly `values` (B, H, W): z = 0, C = 2."""
    z = torch.zeros(*values.shape, 2)
    return z, -2.0 * values


def test_patch_nll_is_the_per_dimension_negative_log_likelihood():
    z = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    ld = torch.randn(2, 3, 4, dtype=torch.float64)
    # change of variables against torch.distributions, per dimension, up to the constant ½·log(2π)
    nll = -(torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ld) / 6
    torch.testing.assert_close(patch_nll(z, ld) + 0.5 * math.log(2 * math.pi), nll)
    with pytest.raises(ValueError, match="log_det"):
        patch_nll(z, ld[0])


def test_tail_counts():
    assert tail_count(30, 0.1) == 3  # not 4, although 0.1 * 30 = 3.0000000000000004
    assert tail_count(1024, 0.02) == 21  # ceil(20.48)
    assert tail_count(8 * 1024, 0.02) == 164
    assert tail_count(10, 0.001) == 1
    assert tail_count(5, 1.0) == 5


def test_tail_term_is_the_mean_of_the_top_patches():
    values = torch.arange(30, dtype=torch.float32).reshape(1, 5, 6)[:, torch.randperm(5)]
    z, ld = from_nll(values)
    cfg = dataclasses.replace(PLAIN, tail_weight=1.0, tail_ratio=0.1)
    loss, parts = tail_aware_loss(z, ld, cfg)
    assert float(loss) == pytest.approx((29 + 28 + 27) / 3)
    assert parts["nll_tail"] == pytest.approx(28.0) and parts["nll"] == pytest.approx(14.5)
    cfg = dataclasses.replace(cfg, tail_weight=0.7)
    loss, _ = tail_aware_loss(z, ld, cfg)
    assert float(loss) == pytest.approx(0.3 * 14.5 + 0.7 * 28.0)


def test_zero_tail_weight_is_the_mean_nll():
    z, ld = torch.randn(2, 4, 4, 5), torch.randn(2, 4, 4)
    loss, parts = tail_aware_loss(z, ld, PLAIN)
    assert torch.equal(loss, patch_nll(z, ld).mean())
    assert set(parts) == {"nll", "nll_tail", "loss"} and all(isinstance(v, float) for v in parts.values())


def test_logdet_regulariser():
    z, ld = torch.randn(2, 4, 4, 5), 3.0 * torch.randn(2, 4, 4)
    base, _ = tail_aware_loss(z, ld, PLAIN)
    with_reg, parts = tail_aware_loss(z, ld, dataclasses.replace(PLAIN, lambda_logdet=0.5))
    torch.testing.assert_close(with_reg - base, 0.5 * ((ld / 5) ** 2).mean())
    assert parts["logdet_reg"] == pytest.approx(float(((ld / 5) ** 2).mean()))


def test_tail_scope_batch_vs_image():
    # image 0 holds every large value: the batch tail only sees image 0, the image tail sees both
    values = torch.stack([torch.arange(100.0, 110.0), torch.arange(0.0, 10.0)]).reshape(2, 2, 5)
    z, ld = from_nll(values)
    batch = dataclasses.replace(PLAIN, tail_weight=1.0, tail_ratio=0.1, tail_scope="batch")
    image = dataclasses.replace(batch, tail_scope="image")
    assert float(tail_aware_loss(z, ld, batch)[0]) == pytest.approx((109 + 108) / 2)  # ceil(0.1 * 20) = 2
    assert float(tail_aware_loss(z, ld, image)[0]) == pytest.approx((109 + 9) / 2)  # 1 per image
    with pytest.raises(ValueError, match="tail_scope"):
        tail_mean(values, 0.1, "pixel")


def test_focal_centre_and_whitening_terms():
    values = torch.tensor([[[-1.0, 0.0, 0.5, 2.0]]])
    z, ld = from_nll(values)
    loss, _ = tail_aware_loss(z, ld, dataclasses.replace(PLAIN, focal_gamma=2.0))
    weights = (1 - torch.exp(-values.clamp(min=0))) ** 2  # 0 where the NLL is <= 0
    torch.testing.assert_close(loss, (weights * values).mean())

    z = torch.randn(1, 2, 2, 3)
    ld = torch.zeros(1, 2, 2)
    base, _ = tail_aware_loss(z, ld, PLAIN)
    centred, parts = tail_aware_loss(z, ld, dataclasses.replace(PLAIN, center_weight=0.05))
    torch.testing.assert_close(centred - base, 0.05 * (z**2).sum(-1).mean())
    reg = torch.tensor(0.3, requires_grad=True)
    total, parts = tail_aware_loss(z, ld, dataclasses.replace(PLAIN, whitening_reg=0.1), reg=reg)
    torch.testing.assert_close(total - base, torch.tensor(0.03))
    total.backward()
    assert float(reg.grad) == pytest.approx(0.1) and parts["whitening_reg"] == pytest.approx(0.3)


def identity_flow(cfg: ModelConfig, channels: int) -> BaseFlow:
    flow = BaseFlow(channels, cfg)
    with torch.no_grad():
        for block in flow.blocks:
            block.subnet.fc2.weight.zero_()
            block.subnet.fc2.bias.zero_()
    return flow


def test_identity_flow_gives_the_analytic_nll():
    torch.manual_seed(0)
    cfg = ModelConfig(coupling_blocks=3, lora_rank=2, context_kernel=3)
    flow = identity_flow(cfg, 8)
    x = torch.randn(16, 32, 32, 8)  # standard normal
    with torch.no_grad():
        z, ld = flow(x)
    assert torch.equal(ld, torch.zeros_like(ld))
    assert torch.equal(torch.sort(z, -1).values, torch.sort(x, -1).values)  # a channel permutation
    n = patch_nll(z, ld)
    torch.testing.assert_close(n, 0.5 * x.pow(2).mean(-1), rtol=1e-6, atol=0)
    # E[½ x²] = ½; 131072 dims, std of the mean ≈ 0.002
    assert abs(float(n.mean()) - 0.5) < 0.01
    # the per-dimension NLL including the constant is the standard normal's entropy, ½ log(2πe)
    assert abs(float(n.mean()) + 0.5 * math.log(2 * math.pi) - 0.5 * math.log(2 * math.pi * math.e)) < 0.01


def test_identity_model_gives_the_analytic_nll():
    torch.manual_seed(0)
    cfg = ModelConfig(
        coupling_blocks=2, lora_rank=2, context_kernel=3, dia_blocks=2, whitening=False, spatial_mixer=False, pos_encoding="none"
    )
    model = MoLEFlow(cfg, 6)
    model.add_task(0)
    with torch.no_grad():
        for block in model.flow.blocks:
            block.subnet.fc2.weight.zero_()
            block.subnet.fc2.bias.zero_()
    x = torch.randn(4, 16, 16, 6)
    with torch.no_grad(), model.use_task(0):
        z, ld = model(x)  # fresh LoRA (B = 0), zero task bias, identity DIA
    assert torch.equal(ld, torch.zeros_like(ld))
    torch.testing.assert_close(patch_nll(z, ld), 0.5 * x.pow(2).mean(-1), rtol=1e-6, atol=0)
