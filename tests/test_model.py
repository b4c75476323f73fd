import dataclasses

import pytest
import torch

from moleflow.config import LossConfig, ModelConfig
from moleflow.model.loss import tail_aware_loss
from moleflow.model.mole_flow import MoLEFlow

C = 8
# The seeds' adapter (LayerNorm whitening, added positional encoding): most tests below are about it;
# the statistics whitening of the default model has its variants and its own test at the end.
TINY = ModelConfig(coupling_blocks=2, lora_rank=2, context_kernel=3, dia_blocks=2, dia_hidden_ratio=1.0,
                   whitening_mode="layernorm", pos_encoding="add")
LOSS = LossConfig(tail_weight=0.7, tail_ratio=0.1, lambda_logdet=1e-2)


def make_model(n_tasks: int = 2, seed: int = 0, **overrides) -> MoLEFlow:
    torch.manual_seed(seed)
    model = MoLEFlow(dataclasses.replace(TINY, **overrides), C)
    for t in range(n_tasks):
        model.add_task(t)
    return model


def randomize_(params, scale: float = 0.3, seed: int = 0) -> None:
    """Move every given parameter off its initial value (LoRA B, DIA last layers, ... become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def features(b: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 2.0 * torch.randn(b, 4, 5, C, generator=g)


def params_of(model: MoLEFlow, names: set[str]) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n in names]


VARIANTS = {
    "default": {},
    "no_lora": {"lora": False},
    "no_lora_no_bias": {"lora": False, "task_bias": False},
    "no_dia": {"dia_blocks": 0},
    "no_whitening": {"whitening": False},
    "no_mixer": {"spatial_mixer": False},
    "no_context": {"scale_context": False},
    "gate": {"context_gate": True, "context_gate_hidden": 4},
    "concat_pos": {"pos_encoding": "concat", "pos_encoding_dim": 4},
    "no_pos": {"pos_encoding": "none"},
    "one_block_k5": {"coupling_blocks": 1, "context_kernel": 5, "lora_rank": 3},
    "stats_full": {"whitening_mode": "full", "pos_encoding": "none"},  # the default model's adapter
    "stats_channel": {"whitening_mode": "channel"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_flow_is_invertible_for_two_tasks(variant):
    model = make_model(**VARIANTS[variant])
    randomize_(model.parameters())
    x = features()
    for t in (0, 1):
        model.fit_statistics(t, features(b=5, seed=10 + t))  # statistics whitening: each task its own
    c_out = C + 4 if variant == "concat_pos" else C
    assert model.channels == c_out
    for t in (0, 1):
        with model.use_task(t):
            u = model.prepare(x)
            z, ld = model.flow_forward(u)
            assert z.shape == (3, 4, 5, c_out) and ld.shape == (3, 4, 5)
            u2, ld_inv = model.flow_inverse(z)
            torch.testing.assert_close(u2, u, atol=1e-4, rtol=0)
            torch.testing.assert_close(ld_inv, -ld, atol=1e-4, rtol=1e-5)
            z2, ld2 = model(x)
            const = model.whitening[str(t)].log_det if model.stats_whitening else 0.0  # counted in the score
            assert torch.equal(z2, z) and torch.equal(ld2, ld + const)


def test_fresh_task_starts_at_the_shared_flow():
    """What is compared, precisely:
    - flow level (base flow + DIA): a fresh task's flow_forward equals, bitwise, the shared flow
      alone (a model with LoRA, task biases and DIA switched off, loaded with the same shared
      tensors), although task 0's experts are non-zero;
    - whitening level: the fresh adapter is the midpoint, 1.25·LayerNorm(x), not task 0's adapter;
    - therefore prepare() differs from task 0's by design, and the full forward of the fresh task is
      the shared flow applied to its own (midpoint-whitened) input.
    """
    model = make_model(n_tasks=1)
    randomize_(model.parameters())  # task 0 and the shared part have "trained"
    model.add_task(1)
    ref = MoLEFlow(dataclasses.replace(TINY, lora=False, task_bias=False, dia_blocks=0), C)
    ref.load_shared_state_dict(model.shared_state_dict())
    ref.add_task(0)
    x = features()
    with torch.no_grad(), model.use_task(0):
        u = model.prepare(x)
        z0, _ = model.flow_forward(u)
    with torch.no_grad(), model.use_task(1), ref.use_task(0):
        z1, ld1 = model.flow_forward(u)
        z_ref, ld_ref = ref.flow_forward(u)
        assert torch.equal(z1, z_ref) and torch.equal(ld1, ld_ref)
        assert not torch.allclose(z0, z1)  # task 0's experts do change the flow
        w = model.whitening["1"](u)
        assert torch.equal(w, 1.25 * torch.nn.functional.layer_norm(u, (C,)))
        z_full, ld_full = model(x)
        z_expect, ld_expect = ref.flow_forward(model.prepare(x))
        assert torch.equal(z_full, z_expect) and torch.equal(ld_full, ld_expect)


def test_training_task1_leaves_shared_and_task0_bitwise_unchanged():
    model = make_model(n_tasks=1, memory_share=0.05)  # with a patch memory: filling task 1's leaves the rest too
    x0, x1 = features(seed=1), features(seed=2) * 0.5 - 1.0
    # a few real task-0 steps so that task 0 and the shared part are not at their initial values
    opt = torch.optim.AdamW(model.set_trainable(0), lr=1e-2, weight_decay=0.1)
    with model.use_task(0):
        for _ in range(3):
            loss, _ = tail_aware_loss(*model(x0), LOSS, reg=model.regularization(0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.add_task(1)
    shared_before = {k: v.clone() for k, v in model.shared_state_dict().items()}
    task0_before = {k: v.clone() for k, v in model.task_state_dict(0).items()}
    task1_before = {k: v.clone() for k, v in model.task_state_dict(1).items()}
    with torch.no_grad(), model.use_task(0):
        z_before, ld_before = model(x0)

    params = model.set_trainable(1)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # weight decay must not touch frozen tensors
    with model.use_task(1):
        for _ in range(4):
            loss, _ = tail_aware_loss(*model(x1), LOSS, reg=model.regularization(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.fit_memory(1, x1, seed=0)  # after training, as continual.system does: task 1's patch memory
    model.set_memory_weight(1, 0.9)  # then its blend weight, as continual.system does after choosing it

    for name, value in model.shared_state_dict().items():
        assert torch.equal(value, shared_before[name]), name
    for name, value in model.task_state_dict(0).items():
        assert torch.equal(value, task0_before[name]), name
    after = model.task_state_dict(1)
    changed = [n for n, v in after.items() if v.shape != task1_before[n].shape or not torch.equal(v, task1_before[n])]
    assert len(changed) == len(task1_before)  # every task-1 tensor trained (and weight decay moved it), memory filled
    assert after["memory.1.bank"].shape[0] == max(1, int(model.cfg.memory_share * x1[..., 0].numel()))
    with torch.no_grad(), model.use_task(0):
        z_after, ld_after = model(x0)
    assert torch.equal(z_after, z_before) and torch.equal(ld_after, ld_before)


@pytest.mark.parametrize("task", [0, 1])
def test_gradients_reach_only_the_trainable_parameters(task):
    model = make_model(n_tasks=3, context_gate=False)
    randomize_(model.parameters())
    trainable = model.set_trainable(task)
    ids = {id(p) for p in trainable}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    if task == 0:
        expected = set(model.shared_state_dict()) | set(model.task_state_dict(0))
    else:
        expected = set(model.task_state_dict(1))
    expected &= {n for n, _ in model.named_parameters()}
    assert names == expected
    assert all(p.requires_grad == (id(p) in ids) for p in model.parameters())
    with model.use_task(task):
        loss, _ = tail_aware_loss(*model(features()), LOSS, reg=model.regularization(task))
    loss.backward()
    for n, p in model.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        else:
            assert p.grad is None, n


def test_trainable_sets_follow_complete_separation():
    model = make_model(n_tasks=2, memory_share=0.05)
    t0 = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.set_trainable(0)}}
    assert any(n.endswith("context_conv.weight") for n in t0) and any(n.endswith("context_logit") for n in t0)
    assert any(n.startswith("mixer.") for n in t0) and "flow.blocks.0.subnet.fc1.weight" in t0
    assert all(".1" not in n.split("lora_")[-1] for n in t0 if "lora_" in n)
    assert not any(n.startswith(("whitening.1", "dia.1")) for n in t0)
    t1 = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.set_trainable(1)}}
    own = set(model.task_state_dict(1))
    assert {"memory.1.bank", "memory.1.scale"} <= own  # the task's patch memory: its own, filled, never trained
    assert t1 == {n for n in own if not n.startswith("memory.")}
    assert all(n.startswith(("whitening.1.", "dia.1.")) or n.endswith((".lora_A.1", ".lora_B.1", ".task_bias.1")) for n in t1)


def test_forward_routed_matches_per_image_and_groups_by_task():
    model = make_model(n_tasks=3)
    randomize_(model.parameters())
    x = features(b=6)
    ids = torch.tensor([2, 0, 1, 0, 2, 1])
    calls = []
    handle = model.flow.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        z, ld = model.forward_routed(x, ids)
    handle.remove()
    assert sorted(calls) == [2, 2, 2]  # one flow call per task, never one per image
    with torch.no_grad():
        for i, t in enumerate(ids.tolist()):
            with model.use_task(t):
                zi, ldi = model(x[i : i + 1])
            torch.testing.assert_close(z[i : i + 1], zi, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ld[i : i + 1], ldi, atol=1e-5, rtol=1e-5)
    assert model.active_task is None
    with pytest.raises(KeyError, match="task 5"):
        model.forward_routed(x, torch.tensor([0, 1, 2, 5, 0, 1]))
    with pytest.raises(ValueError, match="task_ids"):
        model.forward_routed(x, torch.tensor([0, 1]))


def test_state_dict_partition_and_roundtrip():
    model = make_model(n_tasks=2)
    randomize_(model.parameters())
    shared, t0, t1 = model.shared_state_dict(), model.task_state_dict(0), model.task_state_dict(1)
    full = model.state_dict()
    assert set(shared) | set(t0) | set(t1) == set(full)
    assert len(shared) + len(t0) + len(t1) == len(full)
    assert "flow.blocks.0.perm" in shared and "mixer.gate_logit" in shared
    assert "flow.blocks.1.subnet.fc2.lora_B.1" in t1 and "dia.0.blocks.0.net.4.weight" in t0
    assert model.shared_parameter_count() + model.task_parameter_count(0) + model.task_parameter_count(1) == sum(
        p.numel() for p in model.parameters()
    )

    clone = MoLEFlow(TINY, C)
    clone.load_shared_state_dict(shared)
    clone.load_task_state_dict(1, t1)  # creates the tasks, in any order
    clone.load_task_state_dict(0, t0)
    x = features()
    for t in (0, 1):
        with torch.no_grad(), model.use_task(t), clone.use_task(t):
            a, b = model(x), clone(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    fresh = MoLEFlow(TINY, C)
    with pytest.raises(KeyError, match="missing"):
        fresh.load_shared_state_dict({k: v for k, v in shared.items() if k != "mixer.gate_logit"})
    with pytest.raises(KeyError, match="unexpected"):
        fresh.load_shared_state_dict({**shared, "flow.extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected"):
        fresh.load_task_state_dict(3, t0)  # task 0's names are not task 3's
    assert fresh.num_tasks == 0  # the failed load left no half-created task behind
    bad = dict(t1)
    bad["whitening.1.gamma_raw"] = torch.zeros(C + 1)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_task_state_dict(1, bad)
    assert fresh.num_tasks == 0


def test_task_management_and_errors():
    model = make_model(n_tasks=2)
    assert model.task_keys == ["0", "1"] and model.tasks == [0, 1] and model.num_tasks == 2
    with pytest.raises(ValueError, match="already exists"):
        model.add_task(1)
    with pytest.raises(RuntimeError, match="use_task"):
        model(features())
    with pytest.raises(KeyError, match="add_task"):
        with model.use_task(4):
            pass
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        with model.use_task(0):
            model(torch.randn(1, 3, 3, 5))
    with model.use_task(0):
        with model.use_task(1):
            assert model.active_task == 1
            assert model.flow.blocks[0].subnet.fc1.active_task == "1"
        assert model.active_task == 0
    assert model.active_task is None
    model.remove_task(1)
    assert model.tasks == [0] and "1" not in model.dia and "1" not in model.whitening
    assert not any(".1" in n[-2:] for n in model.state_dict())


def test_regularization():
    model = make_model(n_tasks=2)
    with torch.no_grad():
        model.whitening["0"].beta_raw.fill_(0.5)
    torch.testing.assert_close(model.regularization(0), model.whitening["0"].identity_regularization())
    assert float(model.regularization(0).detach()) > 0.1
    assert float(model.regularization(1)) == 0.0
    assert float(make_model(n_tasks=1, whitening=False).regularization(0).detach()) == 0.0


def test_positional_encoding_modes():
    from moleflow.model.positional import PositionalEncoding, sinusoidal_encoding_2d

    pe = sinusoidal_encoding_2d(3, 4, 8)  # channels 0-3: row, 4-7: column
    assert pe.shape == (3, 4, 8)
    torch.testing.assert_close(pe[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0] * 2))
    torch.testing.assert_close(pe[2, 1, :2], torch.tensor([torch.sin(torch.tensor(2.0)), torch.cos(torch.tensor(2.0))]))
    torch.testing.assert_close(pe[2, 1, 4:6], torch.tensor([torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))]))
    assert torch.equal(pe[:, 0, :4], pe[:, 3, :4]) and torch.equal(pe[0, :, 4:], pe[2, :, 4:])
    assert torch.unique(pe.reshape(12, 8), dim=0).shape[0] == 12  # every patch position is distinct
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(PositionalEncoding("add", 6, 32)(x), x + sinusoidal_encoding_2d(3, 4, 6))
    cat = PositionalEncoding("concat", 6, 5)
    y = cat(x)
    assert cat.out_channels == 11 and torch.equal(y[..., :6], x) and torch.equal(y[1, ..., 6:], sinusoidal_encoding_2d(3, 4, 5))
    assert PositionalEncoding("none", 6, 5)(x) is x
    assert len(cat.state_dict()) == 0  # deterministic: nothing to checkpoint
    with pytest.raises(ValueError, match="pos_encoding"):
        PositionalEncoding("learned", 6, 5)


@pytest.mark.parametrize("mode", ["channel", "full"])
def test_statistics_whitening_is_per_task_counted_and_never_changes_old_tasks(mode):
    from moleflow.config import TrainConfig
    from moleflow.features.cache import FeatureSet
    from moleflow.continual.train import fit_task

    def feature_set(x: torch.Tensor) -> FeatureSet:
        n = len(x)
        return FeatureSet(x, x.mean(dim=(1, 2)), torch.zeros(n, dtype=torch.long), None, [f"i{i}" for i in range(n)], ["c"] * n)

    torch.manual_seed(0)
    model = MoLEFlow(dataclasses.replace(TINY, whitening_mode=mode), C)
    x0, x1 = features(b=6, seed=1), features(b=6, seed=2) * 0.3 + 4.0  # two products, far apart
    train = TrainConfig(epochs=2, batch_size=3, lr=1e-2)
    model.add_task(0)
    fit_task(model, 0, feature_set(x0), train, LOSS, torch.device("cpu"), progress=False)
    shared_before = {k: v.clone() for k, v in model.shared_state_dict().items()}
    task0_before = {k: v.clone() for k, v in model.task_state_dict(0).items()}
    assert {"whitening.0.mean", "whitening.0.matrix", "whitening.0.log_det"} <= set(task0_before)  # saved with the task
    model.add_task(1)
    fit_task(model, 1, feature_set(x1), train, LOSS, torch.device("cpu"), progress=False)
    for name, value in model.shared_state_dict().items():
        assert torch.equal(value, shared_before[name]), name
    for name, value in model.task_state_dict(0).items():
        assert torch.equal(value, task0_before[name]), name
    # each task standardises with its own product's statistics
    for t, x in ((0, x0), (1, x1)):
        u = model.whitening[str(t)](x).reshape(-1, C)
        torch.testing.assert_close(u.mean(0), torch.zeros(C), atol=1e-4, rtol=0)
    # the score is the NLL of the features: the flow's log-det plus the whitening's constant
    with torch.no_grad(), model.use_task(1):
        z, ld = model(x1)
        z_flow, ld_flow = model.flow_forward(model.prepare(x1))
    assert torch.equal(z, z_flow)
    torch.testing.assert_close(ld - ld_flow, model.whitening["1"].log_det.expand_as(ld))
