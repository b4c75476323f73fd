import pytest
import torch
import torch.nn.functional as F

from moleflow.model.adapters import DIA, SpatialMixer, WhiteningAdapter


def make_whitening(task_index: int, channels: int = 6) -> WhiteningAdapter:
    return WhiteningAdapter(channels, task_index, gamma_min=0.5, gamma_max=2.0, beta_max=2.0)


def test_whitening_initialisation():
    w0, w1 = make_whitening(0), make_whitening(1)
    g0 = 0.5 + 1.5 * torch.sigmoid(torch.tensor(-0.7))
    torch.testing.assert_close(w0.gamma, g0.expand(6))
    assert 0.99 < float(g0) < 1.0
    assert torch.equal(w1.gamma, torch.full((6,), 1.25))  # midpoint of [0.5, 2]
    assert torch.count_nonzero(w0.beta) == 0 and torch.count_nonzero(w1.beta) == 0


def test_whitening_forward_ranges_and_regulariser():
    w = make_whitening(0)
    x = 3.0 + 5.0 * torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        w.gamma_raw.copy_(torch.tensor([-100.0, 100.0, 0.0, 1.0, -1.0, 0.3]))
        w.beta_raw.copy_(torch.tensor([100.0, -100.0, 0.0, 0.5, -0.5, 0.1]))
    assert w.gamma.min() >= 0.5 and w.gamma.max() <= 2.0
    assert w.beta.min() >= -2.0 and w.beta.max() <= 2.0
    expected = w.gamma * F.layer_norm(x, (6,)) + w.beta
    torch.testing.assert_close(w(x), expected)
    y = make_whitening(1)(x)  # beta = 0: per-patch zero mean, std = gamma
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    reg = w.identity_regularization()
    torch.testing.assert_close(reg, ((w.gamma - 1) ** 2).mean() + (w.beta**2).mean())
    fresh = make_whitening(0).identity_regularization().detach()
    assert 0 < float(fresh) < 1e-4


def test_spatial_mixer():
    mixer = SpatialMixer(5)
    assert float(mixer.gate.detach()) == pytest.approx(0.1)
    assert mixer.conv.groups == 5
    const = torch.full((2, 4, 6, 5), 3.0)
    torch.testing.assert_close(mixer(const), const)  # replicate padding: constant stays constant
    x = torch.zeros(1, 5, 5, 5)
    x[0, 2, 2] = 1.0
    y = mixer(x)
    assert y.shape == x.shape
    changed = (y.abs().sum(-1) > 0)[0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True  # a 3x3 neighbourhood, nothing further
    assert torch.equal(changed, expected)
    torch.testing.assert_close(y[0, 2, 2], torch.full((5,), 1 - 0.1 + 0.1 / 9))


def test_dia_starts_as_identity():
    dia = DIA(7, n_blocks=3, hidden_ratio=0.5, clamp=1.9)
    x = torch.randn(2, 3, 3, 7)
    z, ld = dia(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(2, 3, 3))
    assert dia.blocks[0].net[0].out_features == 3  # hidden = int(7 * 0.5)
    assert [b.flip for b in dia.blocks] == [False, True, False]


def _randomize(module, scale=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_dia_invertible_and_alternating():
    dia = DIA(8, n_blocks=4, hidden_ratio=0.5, clamp=1.9)
    _randomize(dia)
    x = torch.randn(2, 3, 4, 8)
    z, ld = dia(x)
    assert ld.abs().max() > 1e-2
    x2, ld_inv = dia.inverse(z)
    torch.testing.assert_close(x2, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-5, rtol=1e-5)
    y0, _ = dia.blocks[0](x)
    y1, _ = dia.blocks[1](x)
    assert torch.equal(y0[..., :4], x[..., :4]) and not torch.equal(y0[..., 4:], x[..., 4:])
    assert torch.equal(y1[..., 4:], x[..., 4:]) and not torch.equal(y1[..., :4], x[..., :4])


def test_dia_logdet_is_exact():
    dia = DIA(6, n_blocks=2, hidden_ratio=1.0, clamp=1.9).double()
    _randomize(dia, scale=0.8)
    x = torch.randn(1, 2, 2, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: dia(v.reshape(1, 2, 2, 6))[0].reshape(-1), x.reshape(-1))
    _, logabsdet = torch.linalg.slogdet(jac)
    _, ld = dia(x)
    torch.testing.assert_close(ld.sum(), logabsdet, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", ["channel", "full"])
def test_stats_whitening_standardises_and_is_an_invertible_affine(mode):
    from moleflow.model.adapters import StatsWhitening

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=g)
    x = (torch.randn(40, 4, 4, 5, generator=g) @ mix.T) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0]) + 7.0
    w = StatsWhitening(5, mode, eps=1e-9)  # no shrinkage to speak of: exact moments
    w.fit(x, chunk=7)  # chunked accumulation gives the whole set's statistics
    u = w(x).reshape(-1, 5).double()
    torch.testing.assert_close(u.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-4, rtol=0)
    cov = torch.cov(u.T)
    if mode == "full":
        torch.testing.assert_close(cov, torch.eye(5, dtype=torch.float64), atol=1e-3, rtol=0)
    else:
        torch.testing.assert_close(torch.diagonal(cov), torch.ones(5, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(w.inverse(w(x)), x, atol=1e-3, rtol=1e-4)
    # the stored log-det is that of the affine map, per patch (autograd's Jacobian of one patch)
    jac = torch.autograd.functional.jacobian(lambda v: w(v.view(1, 1, 1, 5)).view(5), x[0, 0, 0])
    torch.testing.assert_close(w.log_det, torch.logdet(jac), atol=1e-4, rtol=1e-4)


def test_stats_whitening_shrinks_constant_channels():
    from moleflow.model.adapters import StatsWhitening

    x = torch.randn(30, 3, 3, 4)
    x[..., 2] = 5.0  # a channel that never changes on this product (e.g. a black background)
    w = StatsWhitening(4, "full", eps=1e-2)
    w.fit(x)
    u = w(x + torch.tensor([0.0, 0.0, 1e-3, 0.0]))
    assert torch.isfinite(u).all() and u[..., 2].abs().max() < 1.0  # a tiny change is not blown up
